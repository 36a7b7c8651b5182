"""Following jobs live: one thread per job reads its event stream (or polls /status), the main
thread draws a rich progress bar per job."""

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bunch_cli.client import BunchClient
from bunch_cli.errors import CliError, ExitCode
from bunch_cli.units import eta_text, usd

FINAL = frozenset({"completed", "failed", "canceled"})
ACTIVE = ("queued", "processing", "packaging")
STATUS_STYLE = {
    "queued": "yellow",
    "processing": "cyan",
    "packaging": "blue",
    "completed": "green",
    "failed": "red",
    "canceled": "magenta",
}
PROGRESS_FIELDS = ("images_total", "images_succeeded", "images_failed", "runs_total", "runs_done")


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


@dataclass
class JobState:
    job_id: str
    status: str = "queued"
    group: str = ""
    images_total: int = 0
    images_succeeded: int = 0
    images_failed: int = 0
    runs_total: int = 0
    runs_done: int = 0
    queue_position: int | None = None
    eta_seconds: float | None = None
    error: str | None = None
    lane: str | None = None
    cost: dict[str, Any] | None = None  # once the server counts it (a status view's `cost`)
    failure: CliError | None = None  # the follower could not go on (e.g. the job vanished)
    seen: bool = False  # the server has told something about the job

    @property
    def final(self) -> bool:
        return self.status in FINAL or self.failure is not None

    @property
    def images_done(self) -> int:
        return self.images_succeeded + self.images_failed

    def update(self, data: dict[str, Any]) -> None:
        """Take a status view (`progress` nested) or an event's data (flat counters)."""
        self.seen = True
        if data.get("status"):
            self.status = str(data["status"])
        if data.get("group"):
            self.group = str(data["group"])
        nested = data.get("progress")
        counters: dict[str, Any] = nested if isinstance(nested, dict) else data
        for name in PROGRESS_FIELDS:
            value = counters.get(name)
            if isinstance(value, int):
                setattr(self, name, value)
        if "queue_position" in data:
            self.queue_position = data["queue_position"]
        if "eta_seconds" in data:
            self.eta_seconds = data["eta_seconds"]
        if data.get("error"):
            self.error = str(data["error"])
        if data.get("lane"):
            self.lane = str(data["lane"])
        if isinstance(data.get("cost"), dict):
            self.cost = data["cost"]
            self.lane = self.lane or self.cost.get("lane")

    def detail(self) -> str:
        parts = [styled(self.status)]
        if self.images_failed:
            parts.append(f"[red]{self.images_failed} failed[/]")
        if self.runs_total:
            parts.append(f"runs {self.runs_done}/{self.runs_total}")
        if self.status == "queued" and self.queue_position is not None:
            parts.append(f"#{self.queue_position} in queue")
        if self.eta_seconds is not None and not self.final:
            parts.append(f"ETA {eta_text(self.eta_seconds)}")
        if self.lane == "batch":
            parts.append("batch lane")
        if self.cost:
            parts.append(usd(self.cost.get("total_usd")))
        return " · ".join(parts)


class Follower(threading.Thread):
    """Keeps one JobState current: the events route first, polling /status every second if the
    server has no events route (404) or the stream keeps failing."""

    def __init__(
        self,
        state: JobState,
        make_client: Callable[[], BunchClient],
        lock: threading.Lock,
        poll_interval: float = 1.0,
        give_up_after: float = 60.0,
    ) -> None:
        super().__init__(name=f"follow-{state.job_id}", daemon=True)
        self.state = state
        self.make_client = make_client
        self.lock = lock
        self.poll_interval = poll_interval
        self.give_up_after = give_up_after
        self.stopping = threading.Event()
        self.used_events = False

    def apply(self, data: dict[str, Any]) -> None:
        with self.lock:
            self.state.update(data)

    def run(self) -> None:
        ticker = threading.Thread(target=self.tick, name=f"eta-{self.state.job_id}", daemon=True)
        try:
            with self.make_client() as client:
                ticker.start()
                self.follow(client)
        except CliError as exc:
            with self.lock:
                self.state.failure = exc
        except Exception as exc:  # a thread must not die silently
            with self.lock:
                self.state.failure = CliError(f"Lost track of job {self.state.job_id}: {exc}", ExitCode.SERVER)

    def follow(self, client: BunchClient) -> None:
        job_id = self.state.job_id
        self.apply(client.status(job_id))  # a wrong id, key or URL fails here, at once
        last_id: str | None = None
        stream_failures = 0
        use_events = True
        down_since: float | None = None
        while not self.state.final and not self.stopping.is_set():
            try:
                if use_events:
                    try:
                        with client.events(job_id, last_id) as events:
                            self.used_events = True
                            for event in events:
                                last_id = event.id or last_id
                                self.apply_event(event.data)
                                if self.state.final or self.stopping.is_set():
                                    break
                    except CliError as exc:
                        if exc.status == 404:
                            use_events = False  # no events route (or no job any more: /status says which)
                        elif exc.exit_code == ExitCode.SERVER and exc.status is not None:
                            stream_failures += 1  # the route itself fails: poll after a few tries
                            use_events = stream_failures < 3
                        else:
                            raise
                if not self.state.final:
                    # The stream ended or broke (or there is none): catch up from /status.
                    self.apply(client.status(job_id))
                    self.stopping.wait(0.5 if use_events else self.poll_interval)
                down_since = None
            except CliError as exc:
                # The server went away (a restart, a network blip): keep trying for a while.
                if exc.exit_code != ExitCode.SERVER:
                    raise
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.give_up_after:
                    raise
                self.stopping.wait(1.0)
        if self.state.failure is None and not self.stopping.is_set():
            # Events carry counters only: the final error message and numbers come from /status.
            self.apply(client.status(job_id))

    def tick(self, every: float = 5.0) -> None:
        """Events carry counters only: refresh the queue position and ETA from /status now and then."""
        with self.make_client() as client:
            while not self.stopping.wait(every) and not self.state.final:
                if not self.used_events:
                    continue  # polling /status already keeps them current
                try:
                    view = client.status(self.state.job_id)
                except CliError:
                    continue  # the follower itself reports what is wrong
                with self.lock:
                    self.state.queue_position = view.get("queue_position")
                    self.state.eta_seconds = view.get("eta_seconds")

    def apply_event(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except ValueError:
            return
        if isinstance(data, dict):
            self.apply(data)


def list_active(client: BunchClient, limit: int = 500) -> list[str]:
    """Every job of the project that is not final, oldest first."""
    jobs: dict[str, str] = {}
    for status in ACTIVE:
        for job in client.iter_jobs(status=status, limit=limit):
            jobs[str(job["id"])] = str(job.get("created_at") or "")
    return sorted(jobs, key=lambda job_id: jobs[job_id])


def watch(
    make_client: Callable[[], BunchClient],
    job_ids: Iterable[str],
    console: Console,
    discover: Callable[[], list[str]] | None = None,
    rediscover_every: float = 5.0,
) -> dict[str, JobState]:
    """Follow the jobs until each is final; `discover` (watch all) adds jobs submitted meanwhile.
    Returns the final states; raises the first follower's CliError."""
    lock = threading.Lock()
    states: dict[str, JobState] = {}
    followers: dict[str, Follower] = {}
    tasks: dict[str, Any] = {}
    announced: dict[str, str] = {}
    progress = Progress(
        TextColumn("{task.fields[label]}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("images"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=8,
    )

    def add(job_id: str) -> None:
        if job_id in states:
            return
        states[job_id] = JobState(job_id)
        tasks[job_id] = progress.add_task("", total=None, label=job_id[:12], detail="")
        followers[job_id] = Follower(states[job_id], make_client, lock)
        followers[job_id].start()

    def refresh() -> None:
        with lock:
            snapshot = {job_id: dataclasses.replace(state) for job_id, state in states.items()}
        for job_id, state in snapshot.items():
            label = f"{job_id[:12]} [dim]{state.group[:16]}[/]" if state.group else job_id[:12]
            total = state.images_total or None
            progress.update(tasks[job_id], total=total, completed=state.images_done, label=label, detail=state.detail())
            if state.seen and announced.get(job_id) != state.status and state.failure is None:
                announced[job_id] = state.status
                if not console.is_terminal:  # a log gets one line per change instead of redrawn bars
                    console.print(f"job {job_id}: {state.status} ({state.images_done}/{state.images_total} images)")

    try:
        with progress:
            for job_id in job_ids:
                add(job_id)
            last_discovery = time.monotonic()
            while True:
                refresh()
                with lock:
                    failures = [s.failure for s in states.values() if s.failure is not None]
                    done = all(s.final for s in states.values())
                if failures and failures[0] is not None:
                    raise failures[0]
                now = time.monotonic()
                if discover is not None and (done or now - last_discovery >= rediscover_every):
                    last_discovery = now
                    fresh = [job_id for job_id in discover() if job_id not in states]
                    for job_id in fresh:
                        add(job_id)
                    if fresh:
                        continue
                if done:
                    refresh()
                    break
                time.sleep(0.125)
    finally:
        for follower in followers.values():
            follower.stopping.set()
    return states


def summary(state: JobState) -> str:
    counts = f"{state.images_succeeded} of {state.images_total} images"
    if state.images_failed:
        counts += f", {state.images_failed} failed"
    if state.cost:
        lane = state.cost.get("lane") or state.lane or "realtime"
        counts += f", cost {usd(state.cost.get('total_usd'))} ({lane} lane)"
    line = f"Job {state.job_id} {styled(state.status)}: {counts}"
    if state.status == "completed":
        line += f". Download: bunch download {state.job_id} -o {state.job_id[:12]}.zip"
    elif state.error:
        line += f". {state.error}"
    return line


def exit_code(states: Iterable[JobState]) -> ExitCode:
    return ExitCode.JOB_FAILED if any(s.status in ("failed", "canceled") for s in states) else ExitCode.OK
