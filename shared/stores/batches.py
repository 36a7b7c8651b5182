"""The batch lane's runs in Redis: claiming Gemini batches to submit, leasing the ones due for a
look, noting each step of a submission before and after it happens, and the reference files a
job's batches share. Outcomes are stored like any run's (RunStore.complete)."""

import json
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.lock import Lock

from shared import keys, scripts
from shared.settings import Settings
from shared.stores.records import ClaimedRun, RunRecord, present

# Gemini keeps an uploaded file 48 hours (Files API guide); a copy is used only while well inside that.
FILE_TTL_SECONDS = 48 * 3600
FILE_MARGIN_SECONDS = 6 * 3600


@dataclass(frozen=True, slots=True)
class BatchRun:
    """A batch-lane run as its record holds it: the claim, and how far its submission got."""

    run: ClaimedRun
    job_id: str
    project: str
    status: str
    batch_name: str  # "" until Gemini has named it
    submitting: bool  # a submission under this claim began: look for it before submitting again
    dispatched_at: float
    polls: int


@dataclass(frozen=True, slots=True)
class ReferenceFile:
    """An upload's copy in Gemini's Files API."""

    name: str
    uri: str
    mime_type: str
    expires_at: float


async def lane_is_off(redis: Redis) -> bool:
    """Whether the dispatchers said they cannot run the batch lane (no Gemini key). Unknown (no
    dispatcher started yet) is not off: the job waits for one."""
    return await redis.get(keys.BATCH_LANE_STATE) == "off"


class BatchStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    async def announce(self, on: bool) -> None:
        await self.redis.set(keys.BATCH_LANE_STATE, "on" if on else "off")

    async def claim(self, now: float, limit: int) -> list[ClaimedRun]:
        s = self.settings
        args = [now, s.project_max_batch_images, limit, secrets.token_hex(5), s.batch_run_size]
        claimed = await scripts.CLAIM_BATCH_RUNS(self.redis, [], args)
        flat = claimed.values[0]
        return [ClaimedRun(str(flat[i]), int(flat[i + 1]), str(flat[i + 2])) for i in range(0, len(flat), 3)]

    async def take_due(self, now: float, limit: int) -> list[str]:
        taken = await scripts.TAKE_DUE_BATCHES(self.redis, [], [now, now + self.settings.batch_lease_seconds, limit])
        return [str(run_id) for run_id in taken.values[0]]

    async def get(self, run_id: str) -> BatchRun | None:
        raw = await self.redis.hgetall(keys.run(run_id))
        if not raw:
            return None
        record = RunRecord.model_validate(present(raw))
        return BatchRun(
            run=ClaimedRun(run_id, record.attempt, record.claim),
            job_id=record.job_id,
            project=record.project,
            status=record.status.value,
            batch_name=raw.get("batch_name") or "",
            submitting=bool(raw.get("batch_submitting")) and raw.get("batch_submitting") == record.claim,
            dispatched_at=record.dispatched_at or 0.0,
            polls=int(raw.get("polls") or 0),
        )

    async def mark(self, run: ClaimedRun, field: str, value: str, look_at: float) -> bool:
        """Note `field` = `value` while `run`'s claim is live; False when it no longer is."""
        args = [run.run_id, run.attempt, run.claim, field, value, look_at]
        return (await scripts.MARK_BATCH(self.redis, [keys.run(run.run_id)], args)).done

    async def look_again(self, run_id: str, at: float, polls: int) -> None:
        """When to ask about the batch next (only while it is still in flight)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.BATCH_IN_FLIGHT, {run_id: at}, xx=True)
            pipe.hset(keys.run(run_id), "polls", polls)
            await pipe.execute()

    async def reference_files(self, job_id: str) -> dict[str, ReferenceFile]:
        """The job's uploads already copied to the Files API and still usable for a while."""
        raw = await self.redis.hgetall(keys.job_batch_files(job_id))
        usable_until = time.time() + FILE_MARGIN_SECONDS
        files = {upload_id: ReferenceFile(**json.loads(value)) for upload_id, value in raw.items()}
        return {upload_id: file for upload_id, file in files.items() if file.expires_at > usable_until}

    def references_lock(self, job_id: str) -> Lock:
        """Held while the job's references are copied to the Files API (expires by itself if its
        holder dies; waiters give up after the lease and copy what is still missing)."""
        lease = self.settings.batch_lease_seconds
        return self.redis.lock(keys.job_batch_files_lock(job_id), timeout=lease, blocking_timeout=lease, sleep=0.1)

    async def remember_reference(self, job_id: str, upload_id: str, file: ReferenceFile) -> None:
        key = keys.job_batch_files(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, upload_id, json.dumps(_as_dict(file)))
            # Gone with the files themselves: the hash never outlives what it points at.
            pipe.expire(key, FILE_TTL_SECONDS)
            await pipe.execute()

    async def note_turnaround(self, seconds: float) -> None:
        """Moving average of how long batches take, for quotes and ETAs (an estimate: a race
        between two replicas loses one sample, nothing more)."""
        average = await self.redis.hget(keys.BATCH_SECONDS, "avg")
        current = float(average) if average else seconds
        await self.redis.hset(keys.BATCH_SECONDS, "avg", current + 0.2 * (seconds - current))


def _as_dict(file: ReferenceFile) -> dict[str, object]:
    return {"name": file.name, "uri": file.uri, "mime_type": file.mime_type, "expires_at": file.expires_at}
