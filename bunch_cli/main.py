"""`bunch`: submit, follow and fetch Bunch jobs from a terminal or a script.

Exit codes: 0 ok; 1 a job or an export ended failed or canceled (--wait, watch, export); 2 usage
error or a request the server refused as invalid; 3 missing or wrong API key; 4 no such job (group,
export destination), or not possible in its state; 5 server unreachable or failing; 6 the job would
cost more than is left of the project's budget (402). Messages go to stderr; what a script wants
(job ids, tables, JSON) goes to stdout.
"""

import contextlib
import functools
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from bunch_cli import __version__, costs, datasets, exports
from bunch_cli.client import DEFAULT_URL, BunchClient
from bunch_cli.errors import CliError, ExitCode, usage
from bunch_cli.units import eta_text, usd
from bunch_cli.watch import FINAL, exit_code, list_active, styled, summary, watch

P = ParamSpec("P")
R = TypeVar("R")


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Pipes and logs get long lines rather than job ids folded at 80 columns.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, width=width, highlight=False)


out = _console(stderr=False)
err = _console(stderr=True)

app = typer.Typer(
    name="bunch",
    help="Run Bunch image-generation jobs: submit, watch, download. Reads BUNCH_URL and BUNCH_API_KEY.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
submit_app = typer.Typer(help="Submit a job (semi-auto or auto).", no_args_is_help=True)
app.add_typer(submit_app, name="submit")


class Status(StrEnum):
    queued = "queued"
    processing = "processing"
    packaging = "packaging"
    completed = "completed"
    failed = "failed"
    canceled = "canceled"


class Lane(StrEnum):
    realtime = "realtime"
    batch = "batch"


class Layout(StrEnum):
    by_group = "by_group"
    flat = "flat"


@dataclass(frozen=True)
class Config:
    url: str
    api_key: str | None

    def client(self) -> BunchClient:
        return BunchClient(self.url, self.api_key, notice=_notice)


def _notice(text: str) -> None:
    err.print(f"[yellow]{escape(text)}[/]", soft_wrap=True)


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Report a CliError as one line on stderr and exit with its code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CliError as exc:
            err.print(f"[bold red]Error:[/] {escape(exc.message)}", soft_wrap=True)
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            err.print("Interrupted. Jobs already submitted go on; follow them with `bunch watch`.")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None

    return wrapper


def config(ctx: typer.Context) -> Config:
    obj = ctx.find_root().obj
    assert isinstance(obj, Config)
    return obj


def _version(value: bool) -> None:
    if value:
        out.print(f"bunch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", envvar="BUNCH_URL", help="The gateway's base URL.", show_envvar=True)
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="BUNCH_API_KEY", help="Your project's API key.", show_default=False),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    url = (url or DEFAULT_URL).strip()
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r} is not an http(s) URL.", param_hint="--url / BUNCH_URL")
    ctx.obj = Config(url=url, api_key=(api_key or "").strip() or None)


# --- shared option types ---------------------------------------------------------------------

GroupOpt = Annotated[str, typer.Option("--group", "-g", help="The group the images belong to.")]
PriorityOpt = Annotated[
    int, typer.Option("--priority", min=0, max=1000, help="Lower runs first (0-1000).", show_default=True)
]
WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="Follow the job and exit when it ends (1 if it failed).")]
AspectOpt = Annotated[str | None, typer.Option("--aspect-ratio", help="e.g. 1:1, 16:9.", show_default=False)]
SizeOpt = Annotated[str | None, typer.Option("--image-size", help="1K, 2K or 4K.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON.")]
LaneOpt = Annotated[
    Lane,
    typer.Option(
        "--lane",
        help="realtime: RunPod runs, minutes. batch: Gemini's Batch API, half the price, within 24 h.",
        show_default=True,
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print what the job would cost and take on each lane, and the budget; submit nothing "
        "(the inputs are still uploaded: the price depends on them).",
    ),
]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="A job id.", show_default=False)]


def _params(aspect_ratio: str | None, image_size: str | None) -> dict[str, str]:
    params = {}
    if aspect_ratio:
        params["aspect_ratio"] = aspect_ratio
    if image_size:
        params["image_size"] = image_size
    return params


def _follow(cfg: Config, job_ids: list[str], discover: Callable[[], list[str]] | None = None) -> ExitCode:
    states = watch(cfg.client, job_ids, err, discover=discover)
    for state in states.values():
        err.print(summary(state), soft_wrap=True)
    return exit_code(states.values())


def _print_quote(quote: dict[str, Any]) -> None:
    """A dry run's answer on stdout: the lanes side by side, then the budget."""
    out.print(
        f"{quote.get('images')} image(s) with {escape(str(quote.get('model')))}, lane {quote.get('lane')}:",
        soft_wrap=True,
    )
    out.print(costs.quote_table(quote))
    out.print(costs.budget_line(quote.get("budget")), soft_wrap=True)
    if warning := costs.over_budget_line(quote):
        out.print(f"[bold red]{escape(warning)}[/]", soft_wrap=True)
    err.print("Dry run: no job was created.")


def _submitted(cfg: Config, accepted: dict[str, Any], what: str, wait: bool) -> None:
    job_id = str(accepted["id"])
    out.print(job_id, soft_wrap=True)
    err.print(f"Submitted job [bold]{job_id}[/]: {what}.", soft_wrap=True)
    if not wait:
        err.print(f"Follow it with: bunch watch {job_id}", soft_wrap=True)
        return
    code = _follow(cfg, [job_id])
    raise typer.Exit(int(code))


# --- submit ----------------------------------------------------------------------------------


@submit_app.command("semi-auto")
@handled
def submit_semi_auto(
    ctx: typer.Context,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")],
    images: Annotated[int, typer.Option("--images", "-n", min=1, help="Images per prompt (made in runs of 4).")],
    group: GroupOpt = "default",
    ref: Annotated[
        list[Path] | None,
        typer.Option("--ref", "-r", exists=True, dir_okay=False, readable=True, help="A reference image; repeat."),
    ] = None,
    priority: PriorityOpt = 10,
    aspect_ratio: AspectOpt = None,
    image_size: SizeOpt = None,
    lane: LaneOpt = Lane.realtime,
    dry_run: DryRunOpt = False,
    wait: WaitOpt = False,
) -> None:
    """A batch from reference images and prompts: every prompt gets --images images."""
    cfg = config(ctx)
    with cfg.client() as client:
        reference_ids: list[str] = []
        if ref:
            with err.status(f"Uploading {len(ref)} reference image(s)..."):
                reference_ids = client.upload_images(ref)
        body: dict[str, Any] = {
            "mode": "semi_auto",
            "group": group,
            "prompts": prompt,
            "reference_ids": reference_ids,
            "images_per_prompt": images,
            "priority": priority,
            "lane": lane.value,
        }
        if params := _params(aspect_ratio, image_size):
            body["params"] = params
        if dry_run:
            _print_quote(client.quote(body))
            return
        accepted = client.submit(body)
    total = images * len(prompt)
    runs = math.ceil(images / 4) * len(prompt)
    _submitted(cfg, accepted, f"{total} images in about {runs} runs, group '{group}', {lane.value} lane", wait)


def _upload_dataset(client: BunchClient, source: Path) -> dict[str, Any]:
    """Pack a folder into a temporary ZIP (or take a ZIP as it is) and upload it with a progress bar."""
    temp: Path | None = None
    try:
        if source.is_dir():
            images = datasets.find_images(source)
            if not images:
                suffixes = " ".join(sorted(datasets.IMAGE_SUFFIXES))
                raise usage(f"No images ({suffixes}) in the folder {source}.")
            fd, name = tempfile.mkstemp(prefix="bunch-dataset-", suffix=".zip")
            os.close(fd)
            temp = Path(name)
            with Progress(
                TextColumn("Packing"), BarColumn(), MofNCompleteColumn(), console=err, transient=True
            ) as packing:
                task = packing.add_task("pack", total=len(images))
                datasets.pack(source, images, temp, lambda done: packing.update(task, completed=done))
            archive = temp
        else:
            datasets.check_zip(source)
            archive = source
        size = archive.stat().st_size
        with Progress(
            TextColumn(f"Uploading {escape(source.name)}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as uploading:
            task = uploading.add_task("upload", total=size)
            result = client.upload_dataset(archive, lambda sent: uploading.update(task, completed=sent))
            uploading.update(task, completed=size)
        return result
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def _describe_rejected(item: Any) -> str:
    if isinstance(item, dict):
        name = item.get("name") or item.get("filename") or item.get("file") or "?"
        reason = item.get("reason") or item.get("detail") or item.get("error") or ""
        return f"{name}: {reason}" if reason else str(name)
    return str(item)


@submit_app.command("auto")
@handled
def submit_auto(
    ctx: typer.Context,
    dataset: Annotated[
        Path, typer.Argument(metavar="DIR_OR_ZIP", exists=True, help="A folder of images or a ZIP of them.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The base prompt applied to every image.")],
    group: GroupOpt = "default",
    variations: Annotated[
        int, typer.Option("--variations", "-v", min=1, max=16, help="Variations per input image.")
    ] = 1,
    priority: PriorityOpt = 10,
    aspect_ratio: AspectOpt = None,
    image_size: SizeOpt = None,
    lane: LaneOpt = Lane.realtime,
    dry_run: DryRunOpt = False,
    wait: WaitOpt = False,
) -> None:
    """Dataset augmentation: every image of DIR_OR_ZIP gets --variations variants of --prompt."""
    cfg = config(ctx)
    with cfg.client() as client:
        uploaded = _upload_dataset(client, dataset)
        count = int(uploaded.get("count") or 0)
        rejected = uploaded.get("rejected") or []
        err.print(f"Dataset {uploaded.get('id')}: {count} image(s) accepted, {len(rejected)} rejected.", soft_wrap=True)
        for item in rejected[:20]:
            err.print(f"  [yellow]rejected[/] {escape(_describe_rejected(item))}", soft_wrap=True)
        if len(rejected) > 20:
            err.print(f"  ... and {len(rejected) - 20} more")
        if count == 0:
            raise usage("None of the files is a usable image; nothing was submitted.")
        body: dict[str, Any] = {
            "mode": "automatic",
            "group": group,
            "base_prompt": prompt,
            "dataset_id": uploaded["id"],
            "variations_per_image": variations,
            "priority": priority,
            "lane": lane.value,
        }
        if params := _params(aspect_ratio, image_size):
            body["params"] = params
        if dry_run:
            _print_quote(client.quote(body))
            return
        accepted = client.submit(body)
    what = f"{count * variations} images from {count} inputs, group '{group}', {lane.value} lane"
    _submitted(cfg, accepted, what, wait)


# --- looking at jobs -------------------------------------------------------------------------


def _when(value: Any) -> str:
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _progress(job: dict[str, Any]) -> dict[str, int]:
    progress = job.get("progress") or {}
    return {
        key: int(progress.get(key) or 0)
        for key in ("images_total", "images_succeeded", "images_failed", "runs_total", "runs_done")
    }


def _waiting(job: dict[str, Any]) -> str:
    if job.get("status") == "queued" and job.get("queue_position") is not None:
        return f"#{job['queue_position']}"
    if job.get("status") not in FINAL:
        return eta_text(job.get("eta_seconds"))
    return ""


@app.command("jobs")
@handled
def list_jobs(
    ctx: typer.Context,
    status: Annotated[Status | None, typer.Option("--status", "-s", help="Only jobs in this status.")] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Only this group's jobs.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-l", min=1, max=10_000, help="At most this many.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """The project's jobs, newest first."""
    with config(ctx).client() as client:
        jobs = list(client.iter_jobs(status=status.value if status else None, group=group, limit=limit))
    if as_json:
        out.print_json(json.dumps(jobs))
        return
    if not jobs:
        err.print("No jobs.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("JOB", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("MODE", no_wrap=True)
    table.add_column("LANE", no_wrap=True)
    table.add_column("GROUP")
    table.add_column("IMAGES", justify="right", no_wrap=True)
    table.add_column("FAILED", justify="right")
    table.add_column("RUNS", justify="right", no_wrap=True)
    table.add_column("QUEUE/ETA", justify="right")
    table.add_column("COST", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    for job in jobs:
        p = _progress(job)
        table.add_row(
            str(job.get("id")),
            styled(str(job.get("status"))),
            str(job.get("mode", "")),
            costs.lane_of(job),
            escape(str(job.get("group", ""))),
            f"{p['images_succeeded']}/{p['images_total']}",
            str(p["images_failed"] or ""),
            f"{p['runs_done']}/{p['runs_total']}",
            _waiting(job),
            usd(job["cost"].get("total_usd")) if job.get("cost") else "",
            _when(job.get("created_at")),
        )
    out.print(table)


@app.command("status")
@handled
def job_status(ctx: typer.Context, job: JobArg, as_json: JsonOpt = False) -> None:
    """One job's status and progress."""
    with config(ctx).client() as client:
        view = client.status(job)
    if as_json:
        out.print_json(json.dumps(view))
        return
    p = _progress(view)
    zip_info = view.get("zip") or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str]] = [
        ("job", str(view.get("id"))),
        ("status", styled(str(view.get("status")))),
        ("mode", str(view.get("mode", ""))),
        ("lane", costs.lane_of(view)),
        ("group", escape(str(view.get("group", "")))),
        ("priority", str(view.get("priority", ""))),
        ("images", f"{p['images_succeeded']} done, {p['images_failed']} failed, of {p['images_total']}"),
        ("runs", f"{p['runs_done']} of {p['runs_total']}"),
    ]
    if view.get("queue_position") is not None:
        rows.append(("queue position", str(view["queue_position"])))
    if view.get("eta_seconds") is not None and view.get("status") not in FINAL:
        rows.append(("eta", eta_text(view["eta_seconds"])))
    for key in ("created_at", "started_at", "completed_at"):
        if view.get(key):
            rows.append((key.removesuffix("_at"), _when(view[key])))
    if view.get("cost"):
        # Counted as runs end: a job still going has cost this much so far.
        label = "cost" if view.get("status") in FINAL else "cost so far"
        rows.append((label, costs.cost_text(view["cost"])))
    if view.get("error"):
        rows.append(("error", f"[red]{escape(str(view['error']))}[/]"))
    if zip_info.get("ready"):
        rows.append(("zip", f"ready, {zip_info.get('bytes') or 0:,} bytes: bunch download {view.get('id')} -o out.zip"))
    for name, value in rows:
        grid.add_row(name, value)
    out.print(grid)


@app.command("watch")
@handled
def watch_jobs(
    ctx: typer.Context,
    jobs: Annotated[
        list[str] | None, typer.Argument(metavar="[JOB]...", help="Job ids; none: every job not yet final.")
    ] = None,
) -> None:
    """Live progress bars until the jobs end (exit 1 if one failed or was canceled)."""
    cfg = config(ctx)
    discover: Callable[[], list[str]] | None = None
    if jobs:
        job_ids = list(dict.fromkeys(jobs))
    else:
        with cfg.client() as client:
            job_ids = list_active(client)

        def discover() -> list[str]:
            with cfg.client() as client:
                return list_active(client)

        if not job_ids:
            err.print("No jobs in progress.")
            return
    raise typer.Exit(int(_follow(cfg, job_ids, discover)))


# --- changing jobs ---------------------------------------------------------------------------


@app.command("cancel")
@handled
def cancel(ctx: typer.Context, job: JobArg) -> None:
    """Cancel a job: runs not yet started never start; finished images are kept."""
    with config(ctx).client() as client:
        result = client.cancel(job)
    out.print(f"Job {job}: {styled(str(result.get('status', 'canceled')))}", soft_wrap=True)


@app.command("retry")
@handled
def retry(ctx: typer.Context, job: JobArg, wait: WaitOpt = False) -> None:
    """Run a failed job's failed images again."""
    cfg = config(ctx)
    with cfg.client() as client:
        result = client.retry(job)
    job_id = str(result.get("id") or result.get("job_id") or job)
    out.print(job_id, soft_wrap=True)
    again = "as job " + job_id if job_id != job else "again"
    err.print(f"Job {job} is running {again} ({result.get('status', 'queued')}).", soft_wrap=True)
    if wait:
        raise typer.Exit(int(_follow(cfg, [job_id])))


@contextlib.contextmanager
def _sink(dest: Path | None) -> Iterator[IO[bytes]]:
    """stdout for `-`; a regular file through `NAME.part`, renamed only once complete; anything
    else (a device, a pipe) written as it is."""
    if dest is None:
        yield sys.stdout.buffer
        return
    if dest.exists() and not dest.is_file():
        with dest.open("wb") as raw:
            yield raw
        return
    part = dest.with_name(dest.name + ".part")
    try:
        with part.open("wb") as raw:
            yield raw
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


@app.command("download")
@handled
def download(
    ctx: typer.Context,
    job: JobArg,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Where to save the ZIP (default bunch-JOB.zip; - for stdout).", show_default=False
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the job to end first.")] = False,
) -> None:
    """Save a job's ZIP (once it is ready)."""
    cfg = config(ctx)
    dest: Path | None = None
    if output != "-":
        dest = Path(output or f"bunch-{job}.zip")
        if dest.is_dir():
            dest = dest / f"bunch-{job}.zip"
        if not dest.parent.is_dir():
            raise usage(f"The folder {dest.parent} does not exist.")
    if wait:
        _follow(cfg, [job])
    with (
        cfg.client() as client,
        Progress(
            TextColumn(f"Downloading {escape(dest.name if dest else 'to stdout')}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as bar,
        _sink(dest) as sink,
    ):
        task = bar.add_task("download", total=None)
        size = client.download(job, sink, lambda done, total: bar.update(task, completed=done, total=total))
    err.print(f"Saved {size:,} bytes to {dest or 'stdout'}", soft_wrap=True)


# --- exports ----------------------------------------------------------------------------------

GROUP_ID = re.compile(r"^[0-9a-f]{32}$")


def _group_ids(client: BunchClient, values: list[str]) -> list[str]:
    """Group ids as given; a name (what `bunch jobs` shows) is looked up among the project's groups."""
    names = [value for value in values if not GROUP_ID.match(value)]
    by_name: dict[str, str] = {}
    if names:
        by_name = {str(group.get("name")): str(group.get("id")) for group in client.groups()}
    ids = []
    for value in values:
        if GROUP_ID.match(value):
            ids.append(value)
        elif value in by_name:
            ids.append(by_name[value])
        else:
            raise CliError(f"No such group in this project: {value!r}.", ExitCode.NOT_FOUND)
    return list(dict.fromkeys(ids))


@app.command("export")
@handled
def export(
    ctx: typer.Context,
    destination: Annotated[
        str, typer.Option("--destination", "-d", help="A destination's name (see bunch export-destinations).")
    ],
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="A group's id or name; repeat for several.")
    ] = None,
    job: Annotated[list[str] | None, typer.Option("--job", "-j", help="A job id; repeat for several.")] = None,
    layout: Annotated[
        Layout,
        typer.Option(
            "--layout", help="by_group: PREFIX/GROUP/JOB/00000.png. flat: PREFIX/JOB-00000.png.", show_default=True
        ),
    ] = Layout.by_group,
    manifest: Annotated[
        bool, typer.Option("--manifest/--no-manifest", help="Write each job's manifest.json beside its images.")
    ] = True,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the export and exit when it ends (1 if it failed).")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the server's JSON (the final view when waiting) instead of the id.")
    ] = False,
) -> None:
    """Copy the images of groups or jobs into one of the project's own S3 buckets."""
    if bool(group) == bool(job):
        raise usage("Give either --group or --job (repeatable), not both and not neither.")
    cfg = config(ctx)
    with cfg.client() as client:
        body: dict[str, Any] = {"destination": destination}
        if group:
            body["group_ids"] = _group_ids(client, group)
        else:
            body["job_ids"] = list(dict.fromkeys(job or []))
        body["layout"] = layout.value
        body["include_manifest"] = manifest
        accepted = client.create_export(body)
    export_id = str(accepted["id"])
    if not as_json:
        out.print(export_id, soft_wrap=True)
    elif not wait:
        out.print_json(json.dumps(accepted))
    kind = "group_ids" if group else "job_ids"
    what = f"{len(body[kind])} {kind.removesuffix('_ids')}(s)"
    status = escape(str(accepted.get("status")))
    err.print(f"Export [bold]{export_id}[/] of {what} to '{escape(destination)}': {status}.", soft_wrap=True)
    if not wait:
        err.print(f"It goes on on the server: GET /api/exports/{export_id} tells how far it is.", soft_wrap=True)
        return
    try:
        view = exports.follow(cfg.client, export_id, err)
    except KeyboardInterrupt:
        err.print(f"Stopped following. Export {export_id} goes on on the server.", soft_wrap=True)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    if as_json:
        out.print_json(json.dumps(view))
    for line in exports.summary(view):
        err.print(line, soft_wrap=True)
    raise typer.Exit(int(exports.exit_code(view)))


@app.command("export-destinations")
@handled
def export_destinations(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The buckets this project may export to (set up by the operator)."""
    with config(ctx).client() as client:
        body = client.export_destinations()
    if as_json:
        out.print_json(json.dumps(body))
        return
    destinations = body.get("destinations") or []
    if not destinations:
        err.print("No export destinations for this project: an operator sets them (BUNCH_EXPORT_DESTINATIONS).")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "ENDPOINT", "BUCKET", "PREFIX"):
        table.add_column(column, no_wrap=True)
    for item in destinations:
        table.add_row(*(escape(str(item.get(key) or "")) for key in ("name", "endpoint", "bucket", "prefix")))
    out.print(table)


@app.command("stats")
@handled
def stats(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The queue: jobs by status, runs in flight, capacity."""
    with config(ctx).client() as client:
        body = client.queue_stats()
    if as_json:
        out.print_json(json.dumps(body))
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in _flatten(body):
        table.add_row(escape(key), escape(str(value)))
    out.print(table)
    if hold := body.get("upstream_hold"):
        ends = f"resumes by itself at {hold['until']}" if hold.get("until") else "resumes when an operator releases it"
        reason, detail = escape(str(hold["reason"])), escape(str(hold["detail"]))
        err.print(f"[bold red]New runs are on hold[/] ({reason}): {detail}; {ends}.", soft_wrap=True)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows: list[tuple[str, Any]] = []
        for key, item in value.items():
            rows.extend(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        rows = []
        for index, item in enumerate(value):
            rows.extend(_flatten(item, f"{prefix}[{index}]"))
        return rows
    return [(prefix, value)]


if __name__ == "__main__":
    app()
