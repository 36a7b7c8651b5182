"""Every Redis key, stream and consumer-group name, and every object-storage key, in one place."""

PREFIX = "bunch"

# Streams (each read by one consumer group; every consumer is idempotent).
TASK_RESULTS_STREAM = f"{PREFIX}:task-results"  # gateway webhook / dispatcher poller -> dispatcher
PACKAGING_STREAM = f"{PREFIX}:packaging"  # dispatcher -> packager: every run of a job is final
EVENTS_STREAM = f"{PREFIX}:events"  # status and progress changes, for live views
DEAD_LETTERS_STREAM = f"{PREFIX}:dead-letters"  # messages that failed max_deliveries times

DOWNLOADS_STREAM = f"{PREFIX}:downloads"  # gateway -> packager: build a multi-group download ZIP
NOTIFICATIONS_STREAM = f"{PREFIX}:notifications"  # a job with a webhook_url reached a final status
CONTROL_STREAM = f"{PREFIX}:control"  # gateway -> dispatcher: cancel these RunPod runs
EXPORTS_STREAM = f"{PREFIX}:exports"  # gateway -> packager: copy an export's images to its destination

# Pub/Sub: a job was queued (published by shared/lua/create.lua). It carries no work: the job is
# already in its project's queue, and a dispatcher that misses the message finds it on its next poll.
JOBS_CHANNEL = f"{PREFIX}:jobs-queued"

DISPATCHER_GROUP = "dispatcher"
PACKAGER_GROUP = "packager"
NOTIFIER_GROUP = "notifier"

# Every stream a consumer group reads, with its group (EVENTS_STREAM is read by SSE clients, not a group).
CONSUMED_STREAMS = (
    (TASK_RESULTS_STREAM, DISPATCHER_GROUP),
    (CONTROL_STREAM, DISPATCHER_GROUP),
    (PACKAGING_STREAM, PACKAGER_GROUP),
    (DOWNLOADS_STREAM, PACKAGER_GROUP),
    (EXPORTS_STREAM, PACKAGER_GROUP),
    (NOTIFICATIONS_STREAM, NOTIFIER_GROUP),
)

# Scheduling state. Queued jobs wait in one queue per project, ordered by priority; between
# projects, capacity is shared by weight (fair share, shared/lua/include/fair_share.lua).
RETRY_QUEUE = f"{PREFIX}:queue:retries"  # zset run_id -> time it may be started (retries, redos)
RUNNING = f"{PREFIX}:running"  # zset run_id -> time its webhook is overdue (poll then)
READY = f"{PREFIX}:sched:ready"  # zset project -> pass: projects that may start a run now
PASSES = f"{PREFIX}:sched:passes"  # hash project -> pass it left READY with (no credit for idle time)
VIRTUAL_TIME = f"{PREFIX}:sched:vtime"  # the pass last served: where a project (re)joins READY
WEIGHTS = f"{PREFIX}:sched:weights"  # hash project -> fair-share weight set by the operator (default 1)
BACKLOG = f"{PREFIX}:sched:backlog"  # hash project -> weight, for every project with runs to start
BACKLOG_WEIGHT = f"{PREFIX}:sched:backlog-weight"  # sum of BACKLOG's weights (a project's share, for ETAs)
JOB_COUNTS = f"{PREFIX}:stats:jobs"  # hash job status -> jobs in it, all projects (metrics)
JOB_SEQUENCE = f"{PREFIX}:seq:jobs"  # counter giving FIFO order among equal priorities
DISPATCH_BUCKET = f"{PREFIX}:ratelimit:dispatch"  # hash: token bucket for BUNCH_DISPATCH_RPM
RUN_SECONDS = f"{PREFIX}:stats:run-seconds"  # hash: moving average of run durations
# Hash {reason, detail, since, until}: no run starts while it exists (Gemini's daily quota is spent,
# a key is refused); `until` 0 holds until an operator releases it (shared/stores/upstream_hold.py).
UPSTREAM_HOLD = f"{PREFIX}:upstream:hold"
RUNPOD_HEALTH = f"{PREFIX}:runpod:health"  # string: RunPod's last /health answer, as JSON

# The batch lane (jobs with "lane": "batch", made through Gemini's Batch API by the dispatcher). Its
# runs are Gemini batch jobs; they never take a RunPod slot, so none of the keys above counts them.
BATCH_READY = f"{PREFIX}:batch:ready"  # zset project -> last served: projects with batches to submit
BATCH_IN_FLIGHT = f"{PREFIX}:batch:in-flight"  # zset run_id -> when a dispatcher looks at it next
BATCH_RETRY_QUEUE = f"{PREFIX}:batch:retries"  # zset run_id -> time it may be submitted again
BATCH_SECONDS = f"{PREFIX}:stats:batch-seconds"  # hash: moving average of batch turnaround (quotes, ETAs)
# String "on" or "off": whether the dispatchers have a Gemini key for the batch lane (set as each starts).
BATCH_LANE_STATE = f"{PREFIX}:batch:lane"

# Costs and budgets (shared/pricing.py, shared/budgets.py, shared/lua/include/budgets.lua).
BUDGETS = f"{PREFIX}:budgets"  # hash project -> "<limit micro-USD> <day|month>", from BUNCH_PROJECT_BUDGETS
BUDGET_PAUSES = f"{PREFIX}:budgets:paused"  # zset project -> when its pause for budget ends (the period's end)


def project_queue(project: str) -> str:
    """Zset of the project's jobs with runs left to start: job_id -> priority/FIFO score."""
    return f"{PREFIX}:queue:project:{project}"


def project_running(project: str) -> str:
    """Zset of the project's runs in flight (a subset of RUNNING), for the per-project cap."""
    return f"{PREFIX}:project:{project}:running"


def project_retries(project: str) -> str:
    """Zset of the project's runs due to start again (retries and redos whose time has come)."""
    return f"{PREFIX}:project:{project}:retries"


def project_runs_waiting(project: str) -> str:
    """Runs left to start of the jobs in the project's queue (queue figures estimate from it)."""
    return f"{PREFIX}:project:{project}:runs-waiting"


def project_live_images(project: str) -> str:
    """Images of the project's queued and processing jobs (the operator's quota bounds it)."""
    return f"{PREFIX}:project:{project}:live-images"


def project_live_jobs(project: str) -> str:
    """Zset of the project's queued and processing jobs: job_id -> created_at (cancel-all, live views)."""
    return f"{PREFIX}:project:{project}:live-jobs"


def project_failed_jobs(project: str) -> str:
    """Zset of the project's failed jobs not retried yet: job_id -> created_at (retry-all)."""
    return f"{PREFIX}:project:{project}:failed-jobs"


def project_submissions(project: str) -> str:
    """Hash: token bucket of the project's job submissions per minute (the operator's quota)."""
    return f"{PREFIX}:project:{project}:submissions"


def project_paused(project: str) -> str:
    return f"{PREFIX}:project:{project}:paused"


def project_counts(project: str) -> str:
    """Hash: job status -> number of the project's jobs in it."""
    return f"{PREFIX}:project:{project}:counts"


def project_hourly(project: str) -> str:
    """Hash: '<hour>:<kind>' -> figure, hour = unix time // 3600; kinds: succeeded, failed and tokens
    (images), jobs (completed), seconds, min_seconds and max_seconds (their durations),
    gemini_micros and runpod_micros (the recorded cost of runs, micro-USD)."""
    return f"{PREFIX}:project:{project}:hourly"


def project_spend(project: str) -> str:
    """Prefix of the project's spend counters: `<prefix>:<period id>` (shared/budgets.period_id, e.g.
    "day:2026-12-03") is a string of the micro-dollars its recorded runs cost in that period,
    expiring after it."""
    return f"{PREFIX}:project:{project}:spend"


def project_spend_in(project: str, period_id: str) -> str:
    return f"{project_spend(project)}:{period_id}"


def project_batch_queue(project: str) -> str:
    """Zset of the project's batch-lane jobs with batches left to submit: job_id -> priority/FIFO score."""
    return f"{PREFIX}:project:{project}:batch-queue"


def project_batch_in_flight(project: str) -> str:
    """Zset of the project's Gemini batches in flight (a subset of BATCH_IN_FLIGHT): run_id -> claimed at."""
    return f"{PREFIX}:project:{project}:batch-in-flight"


def project_batch_images(project: str) -> str:
    """Images of the project's Gemini batches in flight (BUNCH_PROJECT_MAX_BATCH_IMAGES bounds it)."""
    return f"{PREFIX}:project:{project}:batch-images"


def job_batch_files(job_id: str) -> str:
    """Hash: upload id -> JSON {name, uri, mime_type, expires_at} of its copy in Gemini's Files API
    (uploaded once per job, referenced by every request that uses it; the hash expires with them)."""
    return f"{PREFIX}:job:{job_id}:batch-files"


def job_batch_files_lock(job_id: str) -> str:
    """String: held by the dispatcher copying the job's references to the Files API, so batches of
    one job prepared at once copy each reference once."""
    return f"{PREFIX}:job:{job_id}:batch-files-lock"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_images(job_id: str) -> str:
    """Hash: image index -> JSON outcome of that slot's latest attempt."""
    return f"{PREFIX}:job:{job_id}:images"


def group(group_id: str) -> str:
    """Hash: id, name, project, created_at."""
    return f"{PREFIX}:group:{group_id}"


def group_jobs(group_id: str) -> str:
    """Zset of the group's job ids by creation time."""
    return f"{PREFIX}:group:{group_id}:jobs"


def project_groups(project: str) -> str:
    """Hash: group name -> group id."""
    return f"{PREFIX}:project:{project}:groups"


def saved_batch(batch_id: str) -> str:
    """Hash: id, project, name, mode, lane, rows, columns, images, config (JSON), created_at."""
    return f"{PREFIX}:saved-batch:{batch_id}"


def saved_batch_jobs(batch_id: str) -> str:
    """Zset of the jobs queued from a saved batch by creation time (the newest few kept)."""
    return f"{PREFIX}:saved-batch:{batch_id}:jobs"


def project_saved_batches(project: str) -> str:
    """Zset of a project's saved batch ids by creation time."""
    return f"{PREFIX}:project:{project}:saved-batches"


def idempotent_request(project: str, key_digest: str) -> str:
    """Hash of one Idempotency-Key of a project (its SHA-256 in hex): fingerprint, token while its
    first request runs, then status, headers and body of its answer. Expires (24 h by default)."""
    return f"{PREFIX}:project:{project}:idempotency:{key_digest}"


def dataset(dataset_id: str) -> str:
    """Hash: id, project, count, created_at."""
    return f"{PREFIX}:dataset:{dataset_id}"


def dataset_inputs(dataset_id: str) -> str:
    """List of the dataset's upload ids, in archive order."""
    return f"{PREFIX}:dataset:{dataset_id}:inputs"


def download(download_id: str) -> str:
    """Hash: id, project, group_ids (JSON), status, zip_key, zip_bytes, error, created_at."""
    return f"{PREFIX}:download:{download_id}"


def export(export_id: str) -> str:
    """Hash: the export's request (id, project, destination, layout, ...), status and progress counts."""
    return f"{PREFIX}:export:{export_id}"


def export_done(export_id: str) -> str:
    """Set of the objects ("<job_id>:<index>") an export has settled (copied, skipped or failed): each
    is counted once however often the export is resumed. Deleted when the export ends."""
    return f"{PREFIX}:export:{export_id}:done"


def export_errors(export_id: str) -> str:
    """List of JSON {object, job_id, index, reason}: the first settings.export_max_errors_kept failures."""
    return f"{PREFIX}:export:{export_id}:errors"


def project_exports(project: str) -> str:
    """Zset export_id -> created_at: the project's exports, newest last."""
    return f"{PREFIX}:project:{project}:exports"


def project_active_exports(project: str) -> str:
    """Set of the project's exports still queued or running (create_export.lua caps it)."""
    return f"{PREFIX}:project:{project}:exports:active"


def run(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}"


def project_jobs(project: str) -> str:
    """Zset of a project's job ids by creation time (newest last)."""
    return f"{PREFIX}:project:{project}:jobs"


def upload(project: str, upload_id: str) -> str:
    return f"{PREFIX}:project:{project}:upload:{upload_id}"


def upload_holders(upload_id: str) -> str:
    """Set of the upload's per-project record keys (one object, shared by every project that sent it)."""
    return f"{PREFIX}:upload:{upload_id}:holders"


def run_id(job_id: str, run_name: int | str) -> str:
    """Planned runs are named by their index (job.7); redo runs by their order (job.r2)."""
    return f"{job_id}.{run_name}"


def split_run_id(value: str) -> tuple[str, str]:
    job_id, _, name = value.rpartition(".")
    return job_id, name


# Object-storage keys.
def upload_object(upload_id: str) -> str:
    # Upload ids are the first 128 bits of the content's SHA-256: identical files are stored once.
    return f"uploads/{upload_id}"


def image_object(run_id: str, index: int, attempt: int, claim: str) -> str:
    # One object per claim of a run: a late duplicate execution (an older attempt, or one whose
    # claim Redis lost in a crash or failover) never overwrites the result that counts.
    job_id, run_name = split_run_id(run_id)
    return f"jobs/{job_id}/images/{index:06d}-{run_name}-a{attempt}" + (f"-{claim}" if claim else "")


def archive_object(job_id: str) -> str:
    """A finished job's config and image records, once they left Redis (shared/archive.py)."""
    return f"jobs/{job_id}/archive.json.gz"


def archive_chunk(job_id: str, chunk: int) -> str:
    """The records of one chunk of a finished job's image slots (shared/archive.py)."""
    return f"jobs/{job_id}/archive/{chunk:05d}.json.gz"


def zip_object(job_id: str) -> str:
    return f"jobs/{job_id}/bunch-{job_id}.zip"


def download_object(download_id: str) -> str:
    return f"downloads/{download_id}/bunch-download-{download_id}.zip"


# Downloads, datasets and retention (groups, datasets and downloads keys are above).
DOWNLOADS_BY_TIME = f"{PREFIX}:downloads:by-time"  # zset download_id -> created_at, so old ones can be purged
EXPORTS_BY_TIME = f"{PREFIX}:exports:by-time"  # zset export_id -> created_at, so old records can be purged
PURGING = f"{PREFIX}:retention:purging"  # set of job ids whose records are gone but objects may remain
DATASETS_BY_USE = f"{PREFIX}:datasets:by-use"  # zset dataset_id -> last time a job named it (or creation)
UPLOADS_BY_USE = f"{PREFIX}:uploads:by-use"  # zset upload_id -> last time it was sent or a job named it
UPLOADS_PURGING = f"{PREFIX}:retention:purging-uploads"  # zset upload_id -> when its deletion was claimed
ARQ_QUEUE = f"{PREFIX}:arq:queue"  # arq's queue (the packager's scheduled jobs)
