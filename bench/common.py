"""What every benchmark shares: machine facts, CPU and memory readings, the stack, RESULTS.md."""

import argparse
import contextlib
import fcntl
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from deploy.processes import Process, base_env, free_port, python, scratch_dir, wait_http
from deploy.stack import Stack, start_stack

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return f"nproc {os.cpu_count()}, Python {platform.python_version()}, {cpu_model()}"


# ------------------------------------------------------------------------------------ CPU and memory


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (and of its reaped children when asked), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and all its live descendants (e.g. granian's worker processes)."""
    total = 0.0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(member, children=True)
    return total


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_idle(pids: Sequence[int], window: float = 0.5, threshold: float = 0.04, timeout: float = 60.0) -> None:
    """Wait until each process has settled (started up, imported everything): < threshold of a core."""
    deadline = time.monotonic() + timeout
    before = {pid: tree_cpu_seconds(pid) for pid in pids}
    while time.monotonic() < deadline:
        time.sleep(window)
        after = {pid: tree_cpu_seconds(pid) for pid in pids}
        if all(after[pid] - before[pid] <= threshold * window for pid in pids):
            return
        before = after
    raise TimeoutError(f"processes {list(pids)} did not settle within {timeout}s")


def machine_busy_seconds() -> float:
    """CPU-seconds every core spent busy since boot (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def vm_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM ... of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm"):
            name, value = line.split(":", 1)
            parts = value.split()
            out[name] = int(parts[0]) * 1024
    return out


@dataclass
class Contention:
    """How much CPU *other* processes (other developers' test suites ...) used during a window.

    Busy time of the whole machine minus the CPU of this benchmark's own process tree.
    """

    started: float = field(default_factory=time.monotonic)
    busy0: float = field(default_factory=machine_busy_seconds)
    ours0: float = field(default_factory=lambda: tree_cpu_seconds(os.getpid()))

    def foreign_cores(self) -> tuple[float, float]:
        """(cores used by other processes, cores used by us), averaged over the window."""
        wall = max(time.monotonic() - self.started, 1e-6)
        busy = machine_busy_seconds() - self.busy0
        ours = tree_cpu_seconds(os.getpid()) - self.ours0
        return max(0.0, busy - ours) / wall, ours / wall

    def describe(self) -> str:
        other, ours = self.foreign_cores()
        return f"{other:.2f} other / {ours:.2f} bench cores of {os.cpu_count()}"


# ------------------------------------------------------------------------------------ stats


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


# ------------------------------------------------------------------------------------ stack


def start_sleep_emulator(workdir: Path, workers: int, sleep_ms: int) -> tuple[Process, str]:
    """The RunPod emulator with `--sleep-ms`: every run only sleeps (no handler, no Gemini).

    `--full-sleep-ms 0`: a full worker takes its next job as soon as a slot frees, instead of the
    real SDK's 1 s nap (rp_scale.get_jobs), so the benchmarks measure Bunch, not that nap.
    start_stack cannot do this itself: it always passes `--handler`, which argparse refuses
    together with `--sleep-ms` (one mutually exclusive group).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = python(
        "-m",
        "deploy.emulators.runpod",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--api-key",
        "emulator-key",
        "--sleep-ms",
        str(sleep_ms),
        "--full-sleep-ms",
        "0",
        "--log-level",
        "WARNING",
    )
    proc = Process("runpod-sleep", args, base_env(), workdir / "runpod-sleep.log").start()
    wait_http(f"{url}/_emulator/stats", proc)
    return proc, url


@contextlib.contextmanager
def bench_stack(
    prefix: str,
    *,
    sleep_runpod: tuple[int, int] | None = None,
    service_env: Mapping[str, str] | None = None,
    services: tuple[str, ...] = ("gateway", "dispatcher", "packager"),
    runpod_workers: int = 8,
    gemini_args: tuple[str, ...] = (),
    worker_env: Mapping[str, str] | None = None,
    keep: bool = False,
) -> Iterator[Stack]:
    """The real stack as processes; with `sleep_runpod=(workers, ms)` RunPod is the sleep emulator.

    The services are started after the emulators are swapped, so they only ever see the right one.
    """
    workdir = scratch_dir(f"bunch-bench-{prefix}-")
    env = dict(service_env or {})
    sleeper: tuple[Process, str] | None = None
    if sleep_runpod is not None:
        sleeper = start_sleep_emulator(workdir, *sleep_runpod)
        env["BUNCH_RUNPOD_BASE_URL"] = f"{sleeper[1]}/v2"
    try:
        stack = start_stack(
            workdir,
            runpod_workers=1 if sleeper else runpod_workers,
            gemini_args=gemini_args,
            service_env=env,
            worker_env=worker_env,
            services=(),
        )
    except BaseException:
        if sleeper:
            sleeper[0].stop()
        raise
    try:
        if sleeper is not None:
            # The handler emulator and Gemini are not needed: stop them, use the sleeper instead.
            for name in ("runpod", "gemini"):
                stack.processes.pop(name).stop()
            stack.processes["runpod"] = sleeper[0]
            stack.runpod_url = sleeper[1]
        for name in services:
            stack.start_service(name)
        yield stack
    finally:
        stack.stop()
        if sleeper is not None:
            sleeper[0].stop()
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def pid_of(stack: Stack, name: str) -> int:
    proc = stack.processes[name]
    assert proc.popen is not None
    return proc.popen.pid


def service_name(stack: Stack, service: str) -> str:
    return f"{service}-0" if f"{service}-0" in stack.processes else service


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A small valid PNG, different per seed."""
    import io

    from PIL import Image

    image = Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


API_KEY = "dev-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ------------------------------------------------------------------------------------ results


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: no target, reported only

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("pass" if self.ok else "**FAIL**")


TABLE_BEGIN = "<!-- results:begin -->"
TABLE_END = "<!-- results:end -->"
HEADER = [
    "benchmark",
    "figure",
    "value",
    "target",
    "result",
    "command",
    "machine",
    "other load during run",
    "date (UTC)",
]

PREAMBLE = """# Bunch benchmark results

Written by `make bench` (`.venv/bin/python -m bench`); each benchmark replaces its own rows and
notes (`python -m bench.<name>` runs one). Ratios against a baseline measured side by side in the
same run are the figures that count; absolute times are for reference. "other load" is the CPU that
processes outside the benchmark (other developers' test suites ...) used during the measurement,
from /proc/stat minus the benchmark's own process tree: anything well above 0 means the figures of
that row were measured under contention on this 2-core machine.

"""


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip() for c in cells]


def _order(benchmark: str) -> tuple[int, str]:
    match = re.match(r"(\d+)", benchmark)
    return (int(match.group(1)) if match else 99, benchmark)


def update_results(
    benchmarks: Sequence[str],
    rows: Sequence[tuple[str, Figure]],
    command: str,
    notes: Mapping[str, str],
    contention: str,
    path: Path = RESULTS,
) -> None:
    """Replace the rows of `benchmarks` and their notes sections in RESULTS.md (file-locked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "bunch-bench-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else ""
        if TABLE_BEGIN not in text:
            text = PREAMBLE + f"{TABLE_BEGIN}\n{TABLE_END}\n\n## Notes\n"
        head, rest = text.split(TABLE_BEGIN, 1)
        table, tail = rest.split(TABLE_END, 1)
        kept = []
        for line in table.strip().splitlines():
            cells = _split_row(line)
            if not line.startswith("|") or cells[0] in ("benchmark", "") or set(cells[0]) <= {"-"}:
                continue
            if cells[0] not in benchmarks:
                kept.append(cells)
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        for benchmark, figure in rows:
            kept.append(
                [
                    benchmark,
                    figure.name,
                    figure.value,
                    figure.target,
                    figure.verdict,
                    f"`{command}`",
                    machine(),
                    contention,
                    now,
                ]
            )
        kept.sort(key=lambda cells: _order(cells[0]))  # stable: figure order inside a benchmark stays
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(_escape(c) for c in cells) + " |" for cells in kept]
        text = f"{head}{TABLE_BEGIN}\n" + "\n".join(lines) + f"\n{TABLE_END}{tail}"
        for name, body in notes.items():
            begin, end = f"<!-- notes:{name}:begin -->", f"<!-- notes:{name}:end -->"
            section = f"{begin}\n{body.strip()}\n\n_{now} UTC, {machine()}; other load: {contention}._\n{end}"
            if begin in text:
                before, after = text.split(begin, 1)
                text = before + section + after.split(end, 1)[1]
            else:
                text = text.rstrip("\n") + "\n\n" + section + "\n"
        path.write_text(_sort_notes(text))


def _sort_notes(text: str) -> str:
    """Keep the notes sections in benchmark order whatever order they were first written in."""
    pattern = re.compile(r"<!-- notes:(.+?):begin -->.*?<!-- notes:\1:end -->", re.S)
    sections = [(m.group(1), m.group(0)) for m in pattern.finditer(text)]
    if not sections:
        return text
    start = text.index(sections[0][1])
    body = pattern.sub("", text[start:]).strip()
    ordered = "\n\n".join(s for _, s in sorted(sections, key=lambda s: _order(s[0])))
    return text[:start] + ordered + ("\n\n" + body if body else "") + "\n"


@dataclass
class Report:
    """Figures of one benchmark module: printed as they come, written and judged at the end."""

    args: argparse.Namespace
    rows: list[tuple[str, Figure]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    contention: Contention = field(default_factory=Contention)

    def add(self, benchmark: str, name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        figure = Figure(name, value, target, ok)
        self.rows.append((benchmark, figure))
        verdict = f"  [{figure.verdict.strip('*')}]" if figure.ok is not None else ""
        print(f"  {benchmark:<22} {name:<52} {value:>18}  {target}{verdict}", flush=True)

    def note(self, benchmark: str, text: str) -> None:
        self.notes[benchmark] = text

    def finish(self, benchmarks: Sequence[str]) -> int:
        contention = self.contention.describe()
        print(f"  other load during the measurements: {contention}", flush=True)
        if self.args.record:
            update_results(benchmarks, self.rows, command(), self.notes, contention, Path(self.args.results))
            print(f"  written to {self.args.results}", flush=True)
        failed = [f"{b}: {f.name}" for b, f in self.rows if f.ok is False]
        if failed:
            print("  targets missed: " + "; ".join(failed), flush=True)
            return 1
        return 0


def command() -> str:
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else sys.argv[0]
    return " ".join([".venv/bin/python -m", name.removesuffix(".__main__"), *map(shlex.quote, sys.argv[1:])])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--results", default=str(RESULTS), help="the Markdown file to update")
    p.add_argument("--no-record", dest="record", action="store_false", help="print only, leave RESULTS.md alone")
    p.add_argument("--keep", action="store_true", help="keep the stack's scratch directory (logs)")
    return p


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def fmt_pct(ratio: float) -> str:
    return f"{ratio * 100:.1f} %"


def fmt_mb(n: float) -> str:
    return f"{n / 1024 / 1024:.0f} MB"
