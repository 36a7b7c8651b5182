"""Bunch benchmarks: `make bench` runs all of them and writes bench/RESULTS.md.

One module per benchmark, each runnable alone (`python -m bench.<name> --help`):

    bench.dispatch    1. dispatch efficiency vs arq and vs RunPod's own queue, 2. dispatcher CPU per run
    bench.packaging   3. ZIP build vs raw copy, peak RSS of the packager vs an in-memory zipfile build
    bench.gateway     4. gateway requests/s and latency vs a bare FastAPI + Redis endpoint (uvicorn, granian)
    bench.scale       5. a 10,000-input automatic job: accept time, Redis memory per run, status latency
    bench.e2e         6. images/s through the whole pipeline with the real handler, and a profile
    bench.redis_wait  what BUNCH_REDIS_WAIT_REPLICAS=1 costs per run, with a replica up and with it lost

Each prints its figures, replaces its rows in bench/RESULTS.md and exits 1 when a target is missed.
"""
