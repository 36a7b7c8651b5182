# The RunPod emulator with the real worker handler inside (local profile only).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY deploy deploy
COPY worker worker
RUN pip install . -r worker/requirements.txt
CMD ["python", "-m", "deploy.emulators.runpod", "--host", "0.0.0.0", "--port", "8100", "--handler", "worker/handler.py"]
