"""One whole stack for the compatible APIs' flows (tests/compat/): the front-ends of the documents
in docs/compatible_api.md, driven over HTTP as they would drive Bunch."""

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from deploy.stack import Stack
from tests.stack_helpers import QUICK_TIMERS, client, running_stack

KEY, PROJECT = "compat-key", "compat-project"
OTHER_KEY, OTHER_PROJECT = "other-key", "other-project"


@pytest.fixture(scope="package")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-compat-",
        api_keys=f"{KEY}:{PROJECT},{OTHER_KEY}:{OTHER_PROJECT}",
        runpod_workers=4,
        service_env={
            "BUNCH_MAX_CONCURRENCY": "4",
            **QUICK_TIMERS,
        },
    ) as stack:
        yield stack


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, KEY) as api:
        yield api


@pytest.fixture
async def other_api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, OTHER_KEY) as api:
        yield api
