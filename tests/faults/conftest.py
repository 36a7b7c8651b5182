"""Clients of the module's own stack (each fault module defines the `stack` fixture it needs)."""

from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from tests.faults.helpers import api_client
from tests.stack_helpers import redis_of


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack) as client:
        yield client


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as client:
        yield client
