"""Bunch benchmarks: `make bench` runs all of them (bench/run.py) and writes bench/RESULTS.md.

One module per benchmark, each runnable alone (`python -m bench.<name> --help`, `--smoke` for a tiny
size that judges nothing):

    bench.dispatch        1. dispatch vs arq and vs RunPod's own queue, 2. dispatcher CPU vs a minimal loop's
    bench.packaging       3. ZIP build vs raw copy, packager peak RSS vs an in-memory zipfile build
    bench.gateway         4. gateway throughput, latency and CPU per request vs a bare FastAPI + Redis endpoint
    bench.scale           5. a 10,000-input automatic job vs a 1,000-input one: accept, Redis memory, status
    bench.e2e             6. images/s through the whole pipeline with the real handler, and a profile
    bench.tenants         Redis time per claim and status read, 1,000 projects vs 1
    bench.memory          Redis bytes per finished image as history grows, and vs a queued image
    bench.redis_wait      what BUNCH_REDIS_WAIT_REPLICAS=1 costs per run, with a replica up and with it lost
    bench.worker_seconds  9. RunPod worker-seconds per image vs the bound the Gemini latency sets
    bench.lanes           10. cost per image, batch lane vs realtime lane
    bench.exports         export throughput vs a raw copy between the same S3 servers, peak RSS vs size

Each prints every figure, files its rows under this machine's type in bench/RESULTS.md and exits 1
when a ratio target is missed; absolute figures are reported, never judged.
"""
