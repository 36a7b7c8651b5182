"""Idempotency-Key records in Redis: which request first used a key, and the answer it got.

One script decides between concurrent repeats (shared/lua/claim_idempotency_key.lua): the first
claims the key and runs; the others find the answer kept, or that it is still being made. A key is
stored under its SHA-256, so a client's key of any characters makes a short Redis key.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

from shared import keys, scripts
from shared.scripts import Answer


@dataclass(frozen=True, slots=True)
class KeptAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Claimed:
    """This request holds the key: run it, then `answer` or `release`."""

    record: str
    token: str


class KeyBusy:
    """The key's first request is still running."""


class KeyReused:
    """The key was first used for a different request."""


Claim = Claimed | KeptAnswer | KeyBusy | KeyReused


class IdempotencyStore:
    def __init__(self, redis: Redis, ttl_seconds: int, lock_seconds: int) -> None:
        self.redis = redis
        self.ttl_ms = ttl_seconds * 1000
        self.lock_ms = lock_seconds * 1000

    async def claim(self, project: str, key: str, fingerprint: str) -> Claim:
        record = keys.idempotent_request(project, hashlib.sha256(key.encode()).hexdigest())
        token = uuid.uuid4().hex
        reply = await scripts.CLAIM_IDEMPOTENCY_KEY(self.redis, [record], [fingerprint, token, self.lock_ms])
        if reply.answer == Answer.DONE:
            return Claimed(record, token)
        if reply.answer == Answer.REPLAY:
            status, headers, body = reply.values
            # The client decodes replies as UTF-8: only JSON answers are kept (services/gateway/idempotency.py).
            return KeptAnswer(int(status), json.loads(headers), body.encode() if isinstance(body, str) else body)
        return KeyBusy() if reply.answer == Answer.BUSY else KeyReused()

    async def answer(self, claim: Claimed, answer: KeptAnswer) -> bool:
        """Keep `answer` for the key's repeats; False when the claim had expired (not kept)."""
        args = [claim.token, self.ttl_ms, answer.status, json.dumps(answer.headers), answer.body]
        return (await scripts.ANSWER_IDEMPOTENCY_KEY(self.redis, [claim.record], args)).done

    async def release(self, claim: Claimed) -> None:
        await scripts.RELEASE_IDEMPOTENCY_KEY(self.redis, [claim.record], [claim.token])
