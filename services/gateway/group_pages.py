"""The pages of GET /api/groups/{id}: its jobs, and its jobs' succeeded images, each page costing
the same whatever the group holds (a 100,000-image job, thousands of jobs), but for the group's
image count, a sum over its jobs' summaries (GroupStore.images_succeeded).

A page of images walks the group's jobs in the order of its job index (creation time) and each
job's image slots in index order, and stops after MAX_SLOTS_EXAMINED slots or MAX_JOBS_EXAMINED
jobs even if it found fewer images than asked for: such a page still has a next cursor."""

from dataclasses import dataclass
from typing import Any

from services.gateway.job_views import progress
from shared import planning
from shared.models import ImageStatus, SemiAutoJobRequest
from shared.planning import image_file_name
from shared.storage import Storage
from shared.stores.groups import GroupStore
from shared.stores.jobs import JobStore
from shared.stores.records import ImageRecord, JobRecord
from shared.times import iso

MAX_JOB_PAGE = 100  # jobs per page of the job list
MAX_IMAGE_PAGE = 200  # images per page: a few ms of the event loop, some 100 KB
MAX_SLOTS_EXAMINED = 1000  # image slots (succeeded or not) one page of images looks at
MAX_JOBS_EXAMINED = 100  # jobs one page of images looks at (those with no image cost no slot)
# Read past a job's expected density of succeeded slots: a few failed ones cost no second read.
SLACK = 8

# Cursors, opaque to clients: the creation time (score in the job index) and id of the job a page
# starts at, and for images the slot index. Not a position: retention drops the oldest jobs from
# the index while a client pages, which would shift positions and skip images.
# A score is a time.time(), which repr writes in plain decimals: any text the patterns let through
# is a finite float, so a request the OpenAPI description allows is never refused.
SCORE = r"\d{1,16}(\.\d{1,17})?"
JOB_CURSOR = rf"^{SCORE}:[0-9a-f]{{32}}$"
IMAGE_CURSOR = rf"^{SCORE}:[0-9a-f]{{32}}:\d{{1,9}}$"


@dataclass(frozen=True, slots=True)
class Place:
    """Where a page starts: a job of the group, by its score in the job index and its id, and a slot."""

    score: float
    job_id: str
    index: int = 0

    @classmethod
    def parse(cls, cursor: str | None) -> "Place | None":
        if cursor is None:
            return None
        score, job_id, *index = cursor.split(":")
        return cls(float(score), job_id, int(index[0]) if index else 0)

    def job_cursor(self) -> str:
        return f"{self.score!r}:{self.job_id}"

    def image_cursor(self) -> str:
        return f"{self.score!r}:{self.job_id}:{self.index}"


async def _start(groups: GroupStore, group_id: str, place: Place | None) -> tuple[int, int]:
    """(position in the group's job index, slot index) where a page starts."""
    if place is None:
        return 0, 0
    position, still_there = await groups.position(group_id, place.job_id, place.score)
    return position, place.index if still_there else 0


def _job_view(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "mode": job.mode,
        "priority": job.priority,
        "progress": progress(job).model_dump(),
        "created_at": iso(job.created_at),
        "completed_at": iso(job.completed_at),
    }


async def job_page(
    groups: GroupStore, store: JobStore, group_id: str, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `limit` of the group's jobs from `cursor` on (JSON-ready), and the next page's cursor."""
    position, _ = await _start(groups, group_id, Place.parse(cursor))
    window = await groups.jobs_from(group_id, position, limit + 1)  # and the next page's first
    jobs = await store.get_many([job_id for job_id, _ in window[:limit]])  # a job purged meanwhile is left out
    following = Place(window[limit][1], window[limit][0]).job_cursor() if len(window) > limit else None
    return [_job_view(job) for job in jobs], following


@dataclass(slots=True)
class ImagePage:
    """One page of the group's images, JSON-ready: what each job's images share is said once."""

    images: list[dict[str, Any]]
    prompts: dict[str, dict[int, str]]  # job id -> prompt index -> prompt, for the page's images
    reference_ids: dict[str, list[str]]  # job id -> its reference images (semi-automatic jobs)
    next_cursor: str | None


async def image_page(
    groups: GroupStore, store: JobStore, storage: Storage, group_id: str, cursor: str | None, limit: int
) -> ImagePage:
    """Up to `limit` succeeded images from `cursor` on, looking at MAX_SLOTS_EXAMINED slots at most."""
    position, index = await _start(groups, group_id, Place.parse(cursor))
    window = await groups.jobs_from(group_id, position, MAX_JOBS_EXAMINED + 1)
    jobs = {job.id: job for job in await store.get_many([job_id for job_id, _ in window[:MAX_JOBS_EXAMINED]])}
    page = ImagePage([], {}, {}, None)
    budget, walked = MAX_SLOTS_EXAMINED, 0  # walked: jobs looked at to their end
    for job_id, score in window[:MAX_JOBS_EXAMINED]:
        job = jobs.get(job_id)  # None: purged by retention meanwhile
        reads = 0
        # The summary says whether there is anything to show: a queued job costs no slot.
        while job is not None and job.images_succeeded and index < job.images_total:
            if len(page.images) == limit or budget == 0:
                page.next_cursor = Place(score, job_id, index).image_cursor()
                return page
            # First as many slots as should hold the images still needed at the job's rate of
            # success, then, if those fell short, all the page may still look at: at most two
            # reads per job, as an archived job's read costs its whole archive.
            expected = (limit - len(page.images)) * job.images_total // job.images_succeeded + SLACK
            count = min(budget, job.images_total - index, expected if reads == 0 else budget)
            reads += 1
            try:
                config, records = await store.records_page(job_id, index, count)
            except KeyError:
                break  # purged by retention meanwhile
            for slot in range(index, index + count):
                record = records.get(slot)
                index, budget = slot + 1, budget - 1
                if record is not None and record.status == ImageStatus.SUCCEEDED and record.object_key:
                    _add(page, job_id, slot, config, record, storage)
                    if len(page.images) == limit:
                        break
        index, walked = 0, walked + 1
        if len(page.images) == limit or budget == 0:
            break
    if walked < len(window):  # the next page starts with the first job not walked to its end
        job_id, score = window[walked]
        page.next_cursor = Place(score, job_id).image_cursor()
    return page


def _add(
    page: ImagePage, job_id: str, index: int, config: planning.JobConfig, record: ImageRecord, storage: Storage
) -> None:
    assert record.object_key is not None
    slot = planning.slot(config, index)
    prompt_index = planning.prompt_index(config, index)
    page.prompts.setdefault(job_id, {}).setdefault(prompt_index, slot.prompt)
    if isinstance(config, SemiAutoJobRequest):
        page.reference_ids.setdefault(job_id, list(config.reference_ids))
    page.images.append(
        {
            "job_id": job_id,
            "index": index,
            # Signed anew on every read: the link works for as long as the image is kept.
            "url": storage.presigned_get(record.object_key, f"{job_id}-{image_file_name(index, record.mime_type)}"),
            "prompt_index": prompt_index,
            "input_id": slot.input_id,
            "created_at": iso(record.finished_at),
        }
    )
