"""The bodies of the group routes (/api/groups)."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from services.gateway.schemas.common import JsonRequest
from services.gateway.schemas.jobs import Progress
from shared.models import GroupName, JobStatus


class GroupJob(BaseModel):
    id: str
    status: JobStatus
    mode: str
    priority: int
    progress: Progress
    created_at: datetime
    completed_at: datetime | None


class GroupImage(BaseModel):
    job_id: str
    index: int
    url: str
    prompt_index: int  # the prompt: the page's `prompts[job_id][prompt_index]`
    input_id: str | None  # automatic mode: the input image this one is a variation of
    created_at: datetime


class GroupCreate(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    name: GroupName


class GroupView(BaseModel):
    id: str
    name: str
    created_at: datetime


class GroupSummary(GroupView):
    job_count: int


class GroupList(BaseModel):
    groups: list[GroupSummary]


class GroupDetails(GroupSummary):
    """The group, a page of its jobs and a page of their succeeded images; each list has its own
    cursor, and `job_limit=0` or `image_limit=0` leaves a list out (its cursor is then null)."""

    jobs: list[GroupJob]  # in the order they were submitted
    next_job_cursor: str | None  # pass as job_cursor for the next page; None on the last page
    # What the page's images of each job share, given once: by job id, the prompts they name (by
    # prompt index) and, for a semi-automatic job, the reference images every image was made from.
    prompts: dict[str, dict[int, str]]
    reference_ids: dict[str, list[str]]
    # The jobs' succeeded images, job by job, each job's in index order. A page looks at up to
    # MAX_SLOTS_EXAMINED image slots: it may hold fewer than image_limit images (none, even) and
    # still have a next page.
    images: list[GroupImage]
    images_total: int  # succeeded images over all the group's jobs
    next_image_cursor: str | None  # pass as image_cursor for the next page; None on the last page
