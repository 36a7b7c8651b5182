"""RunPod Serverless emulator: the real REST API, and the real runpod SDK running the worker.

RunPod's own `--rp_serve_api` is not the production API (no async /run, no cancel/health, webhooks
only on success), so the stack and its tests talk to this instead. It keeps everything in memory:

- api.py: the endpoint's REST API (/run, /runsync, /status, /stream, /cancel, /retry, /purge-queue,
  /health) with RunPod's bounds (payload sizes, policy ranges) and limits (limits.py), and the
  /_emulator routes (counters, jobs, faults, settings, workers);
- jobs.py: the queue and each job's state: ttl over queue and execution, executionTimeout, results
  kept 30 min (/run) or 1 min (/runsync), stop signals to the worker running a job;
- worker_api.py: the job API RunPod serves its workers (job-take, job-done, ping, job-stop);
- workers.py: worker processes, each `python <handler file>` under the real runpod SDK;
- inprocess.py: workers in the emulator's loop for benchmarks (--sleep-ms) and --in-process;
- webhooks.py: completion webhooks with RunPod's retries. See docs/emulators_runpod.md.
"""

from deploy.emulators.runpod.api import create_app
from deploy.emulators.runpod.cli import build, main, parse_args
from deploy.emulators.runpod.emulator import Emulator
from deploy.emulators.runpod.inprocess import call_handler, load_handler, run_job, sleep_handler
from deploy.emulators.runpod.model import ApiError, Config, Counters, Faults, Job, runpod_error_string

__all__ = [
    "ApiError",
    "Config",
    "Counters",
    "Emulator",
    "Faults",
    "Job",
    "build",
    "call_handler",
    "create_app",
    "load_handler",
    "main",
    "parse_args",
    "run_job",
    "runpod_error_string",
    "sleep_handler",
]
