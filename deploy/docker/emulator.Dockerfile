# The local stand-ins for RunPod and Gemini (docker compose's `local` profile): the emulators of
# deploy/emulators/ and the real worker (worker/*.py), which the RunPod emulator runs as subprocesses
# under the runpod SDK. Not for production: Bunch's services have their own image (./Dockerfile).
#   docker build -f deploy/docker/emulator.Dockerfile -t bunch-emulators:latest .
#
# The same pinned base as deploy/docker/Dockerfile (where its source is given).
FROM python:3.11-slim-bookworm@sha256:b18992999dbe963a45a8a4da40ac2b1975be1a776d939d098c647482bcad5cba

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# The emulators' and the worker's hashed lock (requirements/emulators.txt), before any source.
COPY requirements/emulators.txt /tmp/requirements.txt
RUN pip install --require-hashes -r /tmp/requirements.txt \
    && pip check \
    && rm /tmp/requirements.txt \
    && groupadd --system --gid 10001 bunch \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin bunch

# Only what the emulators import (deploy/processes.py is the Gemini emulator's helper) and the worker.
COPY deploy/__init__.py deploy/processes.py deploy/
COPY deploy/emulators deploy/emulators
COPY worker/*.py worker/
RUN python -m compileall -q --invalidation-mode checked-hash deploy worker

USER 10001:10001
EXPOSE 8090 8100
# For the default command, the RunPod emulator; compose gives the Gemini emulator its own check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/_emulator/stats', timeout=3)"]
CMD ["python", "-m", "deploy.emulators.runpod", "--host", "0.0.0.0", "--port", "8100", "--handler", "worker/handler.py"]
