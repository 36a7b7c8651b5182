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


def machine_type() -> str:
    """What absolute figures depend on, so RESULTS.md has a section per type: the CPU model and the core count."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


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
MACHINE_COLUMN = HEADER.index("machine")
NOTES_HEADING = "### Notes"

PREAMBLE = """# Bunch benchmark results

Written by `make bench` (`.venv/bin/python -m bench`); each benchmark replaces its own rows and
notes (`python -m bench.<name>` runs one). Only ratios against a baseline measured side by side in
the same run, on the same machine, are judged (the target and result columns); absolute times,
rates and sizes depend on the CPU and are reported for reference only. So there is one section per
machine type (CPU model and core count): a run replaces rows and notes in its own machine's section
only, every row names the machine it was measured on, and figures from different sections are not
to be compared with each other. "other load" is the CPU that processes outside the benchmark (other
developers' test suites ...) used during the measurement, from /proc/stat minus the benchmark's own
process tree: anything well above 0 means the figures of that row were measured under contention.

"""

_MACHINE_SECTION = re.compile(r"<!-- machine:(.+?):begin -->(.*?)<!-- machine:\1:end -->", re.S)
_NOTES_SECTION = re.compile(r"<!-- notes:(.+?):begin -->.*?<!-- notes:\1:end -->", re.S)
_NOTE_FOOTER = re.compile(r"^_\d{4}-\d\d-\d\d \d\d:\d\d UTC, (.+?); other load:", re.M)


def machine_type_of(description: str) -> str:
    """The section a `machine()` description is under: "nproc 2, Python 3.11.7, AMD EPYC" -> "AMD EPYC, 2 cores"."""
    match = re.fullmatch(r"nproc (\S+), Python [^,]*, (.+)", description.strip())
    if match:
        return f"{match.group(2)}, {match.group(1)} cores"
    return description.strip() or "unknown machine"


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]  # unescaped, so that writing it back escapes it once


def _order(benchmark: str) -> tuple[int, str]:
    match = re.match(r"(\d+)", benchmark)
    return (int(match.group(1)) if match else 99, benchmark)


def _new_section(kind: str) -> str:
    return f"## {kind}\n\n{TABLE_BEGIN}\n{TABLE_END}\n"


def _table_rows(body: str) -> list[list[str]]:
    """The figure rows (not the header) of the results table in `body`."""
    if TABLE_BEGIN not in body:
        return []
    table = body.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0]
    rows = []
    for line in table.strip().splitlines():
        cells = _split_row(line)
        if line.startswith("|") and cells[0] not in ("benchmark", "") and not set(cells[0]) <= {"-"}:
            rows.append(cells)
    return rows


def _row_machine_type(cells: Sequence[str]) -> str:
    return machine_type_of(cells[MACHINE_COLUMN] if len(cells) > MACHINE_COLUMN else "")


def _with_rows(body: str, benchmarks: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """`body` with the table rows of `benchmarks` replaced by `rows`, the table in benchmark order."""
    kept = [cells for cells in _table_rows(body) if cells[0] not in benchmarks]
    kept += [list(cells) for cells in rows]
    kept.sort(key=lambda cells: _order(cells[0]))  # stable: figure order inside a benchmark stays
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_escape(c) for c in cells) + " |" for cells in kept]
    table = f"{TABLE_BEGIN}\n" + "\n".join(lines) + f"\n{TABLE_END}"
    if TABLE_BEGIN not in body:
        return body.rstrip("\n") + "\n\n" + table + "\n"
    before, rest = body.split(TABLE_BEGIN, 1)
    return before + table + rest.split(TABLE_END, 1)[1]


def _with_note(body: str, name: str, section: str) -> str:
    """`body` with the notes section `name` replaced by `section` (a whole notes:NAME section), or added."""
    begin, end = f"<!-- notes:{name}:begin -->", f"<!-- notes:{name}:end -->"
    if begin in body:
        before, after = body.split(begin, 1)
        return before + section + after.split(end, 1)[1]
    if NOTES_HEADING not in body:
        body = body.rstrip("\n") + f"\n\n{NOTES_HEADING}"
    return _sort_notes(body.rstrip("\n") + "\n\n" + section + "\n")


def _sort_notes(text: str) -> str:
    """Keep the notes sections in benchmark order whatever order they were first written in."""
    sections = [(m.group(1), m.group(0)) for m in _NOTES_SECTION.finditer(text)]
    if not sections:
        return text
    start = text.index(sections[0][1])
    body = _NOTES_SECTION.sub("", text[start:]).strip()
    ordered = "\n\n".join(s for _, s in sorted(sections, key=lambda s: _order(s[0])))
    return text[:start] + ordered + ("\n\n" + body if body else "") + "\n"


def _split_layout(text: str) -> tuple[str, dict[str, str], str]:
    """RESULTS.md as its preamble, machine type -> the body of that machine's section, and the prose after them.

    A file in the old layout (one table for every machine, then every note) is converted on the way."""
    found = list(_MACHINE_SECTION.finditer(text))
    if found:
        start = found[0].start()
        return text[:start], {m.group(1): m.group(2) for m in found}, _MACHINE_SECTION.sub("", text[start:])
    if TABLE_BEGIN not in text:
        return PREAMBLE, {}, text
    return _convert_single_table(text)


def _convert_single_table(text: str) -> tuple[str, dict[str, str], str]:
    """The old layout: each row goes to the section of its machine column, each note to the machine in its footer."""
    table, tail = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)
    rows = _table_rows(TABLE_BEGIN + table + TABLE_END)
    sections: dict[str, str] = {}
    for kind in dict.fromkeys(_row_machine_type(cells) for cells in rows):
        sections[kind] = _with_rows(_new_section(kind), [], [c for c in rows if _row_machine_type(c) == kind])
    for match in _NOTES_SECTION.finditer(tail):
        name, note = match.group(1), match.group(0)
        footers = _NOTE_FOOTER.findall(note)
        measured_on = [machine_type_of(footers[-1])] if footers else []
        measured_on += [_row_machine_type(cells) for cells in rows if cells[0] == name] + [*sections, machine_type()]
        kind = measured_on[0]
        sections[kind] = _with_note(sections.get(kind) or _new_section(kind), name, note)
    prose = re.sub(r"^## Notes\n", "", _NOTES_SECTION.sub("", tail), count=1, flags=re.M)
    return PREAMBLE, sections, prose


def _join_layout(head: str, sections: Mapping[str, str], prose: str) -> str:
    parts = [head.strip()]
    for kind in sorted(sections):
        parts.append(f"<!-- machine:{kind}:begin -->\n{sections[kind].strip()}\n<!-- machine:{kind}:end -->")
    parts.append(prose.lstrip("\n").rstrip())
    return "\n\n".join(part for part in parts if part) + "\n"


def update_results(
    benchmarks: Sequence[str],
    rows: Sequence[tuple[str, Figure]],
    command: str,
    notes: Mapping[str, str],
    contention: str,
    path: Path = RESULTS,
    on_machine: str | None = None,
) -> None:
    """Replace the rows of `benchmarks` and the notes sections `notes` names in this machine type's section of
    RESULTS.md (file-locked); other machines' sections stay as they are.

    `on_machine` is a `machine()` description, the real one unless given; its section is `machine_type_of` it.
    A file in the old single-table layout is converted first."""
    description = on_machine or machine()
    kind = machine_type_of(on_machine) if on_machine else machine_type()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "bunch-bench-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        head, sections, prose = _split_layout(path.read_text() if path.exists() else "")
        if rows or notes or kind in sections:
            now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
            new_rows = [
                [
                    benchmark,
                    figure.name,
                    figure.value,
                    figure.target,
                    figure.verdict,
                    f"`{command}`",
                    description,
                    contention,
                    now,
                ]
                for benchmark, figure in rows
            ]
            body = _with_rows(sections.get(kind) or _new_section(kind), benchmarks, new_rows)
            for name, text in notes.items():
                begin, end = f"<!-- notes:{name}:begin -->", f"<!-- notes:{name}:end -->"
                footer = f"_{now} UTC, {description}; other load: {contention}._"
                body = _with_note(body, name, f"{begin}\n{text.strip()}\n\n{footer}\n{end}")
            sections[kind] = body
        path.write_text(_join_layout(head, sections, prose))


@dataclass
class Report:
    """Figures of one benchmark module: printed as they come, written and judged at the end."""

    args: argparse.Namespace
    rows: list[tuple[str, Figure]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    contention: Contention = field(default_factory=Contention)

    def add(self, benchmark: str, name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        """A figure; `target` and `ok` only for a ratio against a baseline measured in this run."""
        if getattr(self.args, "smoke", False):
            ok = None  # tiny sizes say whether the benchmark works, not whether a target holds
        figure = Figure(name, value, target, ok)
        self.rows.append((benchmark, figure))
        verdict = f"  [{figure.verdict.strip('*')}]" if figure.ok is not None else ""
        print(f"  {benchmark:<22} {name:<52} {value:>18}  {target}{verdict}", flush=True)

    def note(self, benchmark: str, text: str) -> None:
        self.notes[benchmark] = text

    def finish(self, benchmarks: Sequence[str]) -> int:
        contention = self.contention.describe()
        print(f"  other load during the measurements: {contention}", flush=True)
        if self.args.record and not getattr(self.args, "smoke", False):
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
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (bench/run.py SMOKE): checks it runs; nothing judged or recorded",
    )
    return p


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def fmt_pct(ratio: float) -> str:
    return f"{ratio * 100:.1f} %"


def fmt_mb(n: float) -> str:
    return f"{n / 1024 / 1024:.0f} MB"
