"""Following an export: GET /api/exports/{id} polled until the export ends, drawn as one progress
bar of objects; then its summary and the first failed objects."""

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bunch_cli.client import BunchClient
from bunch_cli.errors import CliError, ExitCode

FINAL = frozenset({"completed", "failed", "canceled"})
STATUS_STYLE = {"queued": "yellow", "running": "cyan", "completed": "green", "failed": "red", "canceled": "magenta"}
COUNTERS = ("objects_done", "objects_copied", "objects_skipped", "objects_failed", "bytes_copied")
ERRORS_SHOWN = 10
# An export copies bucket to bucket in seconds to minutes: a poll every 0.75 s keeps the bar
# lively at a cost of one small GET.
POLL_SECONDS = 0.75


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{escape(status)}[/]"


def counters(view: dict[str, Any]) -> dict[str, int]:
    progress = view.get("progress") or {}
    return {name: int(progress.get(name) or 0) for name in COUNTERS}


def objects_total(view: dict[str, Any]) -> int | None:
    """None until the packager has counted the export's objects."""
    total = (view.get("progress") or {}).get("objects_total")
    return int(total) if isinstance(total, int) else None


def detail(view: dict[str, Any]) -> str:
    c = counters(view)
    parts = [styled(str(view.get("status")))]
    parts.append(f"{c['objects_copied']} copied, {c['objects_skipped']} skipped")
    if c["objects_failed"]:
        parts.append(f"[red]{c['objects_failed']} failed[/]")
    parts.append(decimal(c["bytes_copied"]))
    return " · ".join(parts)


def follow(
    make_client: Callable[[], BunchClient],
    export_id: str,
    console: Console,
    poll_every: float = POLL_SECONDS,
    give_up_after: float = 60.0,
) -> dict[str, Any]:
    """Poll the export until it is final, with a progress bar on `console`; its last view.
    A server that stops answering (a restart) is waited for up to `give_up_after` seconds."""
    progress = Progress(
        TextColumn("Export {task.fields[label]}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("objects"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=8,
    )
    announced: str | None = None
    down_since: float | None = None
    with make_client() as client, progress:
        task = progress.add_task("", total=None, label=export_id[:12], detail="")
        while True:
            try:
                view = client.export(export_id)
            except CliError as exc:
                if exc.exit_code != ExitCode.SERVER:
                    raise
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > give_up_after:
                    raise
                time.sleep(1.0)
                continue
            down_since = None
            status = str(view.get("status"))
            done, total = counters(view)["objects_done"], objects_total(view)
            progress.update(task, total=total, completed=done, detail=detail(view))
            if status != announced and not console.is_terminal:  # a log gets a line per change, not bars
                console.print(f"export {export_id}: {status} ({done}/{'?' if total is None else total} objects)")
            announced = status
            if status in FINAL:
                return view
            time.sleep(poll_every)


def summary(view: dict[str, Any]) -> list[str]:
    """Lines for stderr: the counts, the export's error, and the first failed objects."""
    c = counters(view)
    total = objects_total(view)
    line = (
        f"Export {view.get('id')} {styled(str(view.get('status')))}: {c['objects_copied']} copied, "
        f"{c['objects_skipped']} skipped, {c['objects_failed']} failed of {'?' if total is None else total} "
        f"objects ({decimal(c['bytes_copied'])}) to '{escape(str(view.get('destination')))}'."
    )
    if view.get("error"):
        line += f" [red]{escape(str(view['error']))}[/]"
    lines = [line]
    errors = [e for e in view.get("errors") or [] if isinstance(e, dict)]
    for error in errors[:ERRORS_SHOWN]:
        where = error.get("object") or f"job {error.get('job_id')} image {error.get('index')}"
        lines.append(f"  [red]failed[/] {escape(str(where))}: {escape(str(error.get('reason') or 'unknown'))}")
    hidden = max(c["objects_failed"], len(errors)) - min(len(errors), ERRORS_SHOWN)
    if hidden > 0:
        lines.append(f"  ... and {hidden} more failed object(s)")
    return lines


def exit_code(view: dict[str, Any]) -> ExitCode:
    return ExitCode.OK if view.get("status") == "completed" else ExitCode.JOB_FAILED
