"""compose's `local` profile in small: people reach the object store at one address, the RunPod
workers beside it at another. The workers' links are signed for theirs, people's for the public one."""

import asyncio

from deploy.stack import Stack
from tests.stack_helpers import client, png_bytes, running_stack, submit, upload, wait_final

API_KEY = "worker-links-key"
PEOPLE_ONLY = "http://127.0.0.1:1"  # where no worker could PUT: nothing listens there


def test_workers_use_their_endpoint_and_people_get_the_public_one() -> None:
    with running_stack("bunch-links-", api_keys=f"{API_KEY}:links", runpod_workers=4, services=()) as stack:
        # The services start once the S3 server's address is known.
        stack.service_env.update({"BUNCH_S3_PUBLIC_ENDPOINT": PEOPLE_ONLY, "BUNCH_S3_WORKER_ENDPOINT": stack.s3_url})
        for name in ("gateway", "dispatcher", "packager"):
            stack.start_service(name)
        asyncio.run(_one_job(stack))


async def _one_job(stack: Stack) -> None:
    async with client(stack, API_KEY) as api:
        [ref] = await upload(api, [png_bytes(seed=5)])
        job_id = await submit(
            api, {"mode": "semi_auto", "prompts": ["links"], "reference_ids": [ref], "images_per_prompt": 4}
        )
        status = await wait_final(api, job_id, stack)
        assert status["status"] == "completed", status
        assert status["progress"]["images_succeeded"] == 4
        download = await api.get(f"/api/jobs/{job_id}/download")
        assert download.headers["location"].startswith(f"{PEOPLE_ONLY}/")
