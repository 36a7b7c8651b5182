"""Exports to a project's own bucket, on the real stack, to a second S3 server with credentials of its
own (tests/export_destination.py): layout, checksums, manifests, resumption after a kill, failures
with their reasons, isolation between projects, cancel, the per-project cap, events and webhooks."""

import asyncio
import contextlib
import json
import shutil
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from deploy.processes import free_port, scratch_dir
from deploy.stack import Stack, effective_settings
from shared import keys
from shared.webhook_signing import project_webhook_secret
from tests.export_destination import DestinationServer, SlowProxy, start_destination_server
from tests.stack_helpers import client, create_group, download_zip, redis_of, running_stack, submit, wait_final
from tests.test_user_webhooks import verify_signature

KEY_A, KEY_B = "export-key-a", "export-key-b"
PREFIX = "datasets/bunch"
WRONG_SECRET = "not-the-secret"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = scratch_dir("bunch-exports-dest-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def destination(workdir: Path) -> Iterator[DestinationServer]:
    server = start_destination_server(workdir)
    for bucket in ("team-a", "team-a-slow", "team-b"):
        server.make_bucket(bucket)
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def slow(destination: DestinationServer) -> Iterator[SlowProxy]:
    proxy = SlowProxy(destination.url, delay=0.15).start()
    yield proxy
    proxy.stop()


def destinations(server: DestinationServer, slow: SlowProxy) -> dict[str, Any]:
    def one(endpoint: str, bucket: str, secret: str = "EXPORT_SECRET", prefix: str = PREFIX) -> dict[str, Any]:
        return {
            "endpoint": endpoint,
            "bucket": bucket,
            "prefix": prefix,
            "access_key_id_env": "EXPORT_KEY",
            "secret_access_key_env": secret,
        }

    return {
        "project-a": {
            "archive": one(server.url, "team-a"),
            "slow": one(slow.url, "team-a-slow", prefix=""),
            "wrong-key": one(server.url, "team-a", secret="EXPORT_WRONG_SECRET"),
            "no-bucket": one(server.url, "no-such-bucket"),
        },
        "project-b": {"b-archive": one(server.url, "team-b")},
    }


@pytest.fixture(scope="module")
def stack(destination: DestinationServer, slow: SlowProxy) -> Iterator[Stack]:
    env = {
        "EXPORT_WRONG_SECRET": WRONG_SECRET,
        "EXPORT_KEY": destination.access_key,
        "EXPORT_SECRET": destination.secret_key,
        "BUNCH_EXPORT_DESTINATIONS": json.dumps(destinations(destination, slow)),
        "BUNCH_EXPORT_CONCURRENCY": "2",
        "BUNCH_EXPORT_BACKOFF_SECONDS": "0.05",
        "BUNCH_ALLOW_PRIVATE_WEBHOOKS": "1",
        "BUNCH_USER_WEBHOOK_BACKOFF_SECONDS": "0.1",
        "BUNCH_POLL_INTERVAL_SECONDS": "0.5",
        "BUNCH_RETRY_BACKOFF_SECONDS": "0.2",
    }
    with running_stack(
        "bunch-exports-",
        api_keys=f"{KEY_A}:project-a,{KEY_B}:project-b",
        runpod_workers=4,
        runpod_args=("--webhook-retry-delay", "0.2"),
        service_env=env,
    ) as stack:
        yield stack


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, KEY_A) as api:
        yield api


@pytest.fixture(scope="module")
def finished(stack: Stack) -> dict[str, Any]:
    """Two groups of finished jobs ("cats": 3 images and 2 more, one blocked; "dogs/puppies": 2)."""

    async def make() -> dict[str, Any]:
        async with client(stack, KEY_A) as api:
            cats, dogs = [await create_group(api, name) for name in ("cats", "dogs/puppies")]
            bodies = [
                semi_auto(cats, ["a cat"], 3),
                semi_auto(cats, ["a kitten", "[emu:safety] blocked"], 1),
                semi_auto(dogs, ["a dog"], 2),
            ]
            job_ids = [await submit(api, body) for body in bodies]
            for job_id in job_ids:
                assert (await wait_final(api, job_id, stack))["status"] == "completed"
            return {"cats": cats, "dogs": dogs, "jobs": job_ids}

    return asyncio.run(make())


def semi_auto(group: str, prompts: list[str], count: int) -> dict[str, Any]:
    return {"mode": "semi_auto", "group": group, "prompts": prompts, "images_per_prompt": count}


async def start_export(api: httpx.AsyncClient, **body: Any) -> str:
    response = await api.post("/api/exports", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    assert response.headers["location"] == f"/api/exports/{response.json()['id']}"
    return str(response.json()["id"])


async def wait_export(api: httpx.AsyncClient, export_id: str, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await api.get(f"/api/exports/{export_id}")
        assert response.status_code == 200, response.text
        view = response.json()
        if view["status"] in ("completed", "failed", "canceled"):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"export {export_id} did not end: {view}")


def objects(server: DestinationServer, bucket: str, prefix: str = "") -> dict[str, bytes]:
    minio = server.client()
    found = {}
    for item in minio.list_objects(bucket, prefix=prefix, recursive=True):
        response = minio.get_object(bucket, item.object_name or "")
        try:
            found[item.object_name or ""] = response.read()
        finally:
            response.close()
            response.release_conn()
    return found


def clear(server: DestinationServer, bucket: str) -> None:
    minio = server.client()
    for item in list(minio.list_objects(bucket, recursive=True, include_version=True)):
        minio.remove_object(bucket, item.object_name or "", version_id=item.version_id)


# --- destinations and isolation ---


async def test_destinations_are_listed_by_name_without_credentials(
    stack: Stack, api: httpx.AsyncClient, destination: DestinationServer
) -> None:
    response = await api.get("/api/exports/destinations")
    assert response.status_code == 200
    listed = response.json()["destinations"]
    assert [d["name"] for d in listed] == ["archive", "no-bucket", "slow", "wrong-key"]
    assert listed[0] == {"name": "archive", "endpoint": destination.url, "bucket": "team-a", "prefix": PREFIX}
    for secret in (destination.secret_key, destination.access_key, WRONG_SECRET, "EXPORT_SECRET"):
        assert secret not in response.text
    async with client(stack, KEY_B) as other:
        assert [d["name"] for d in (await other.get("/api/exports/destinations")).json()["destinations"]] == [
            "b-archive"
        ]


async def test_another_projects_destination_export_or_group_is_not_found(
    stack: Stack, api: httpx.AsyncClient, finished: dict[str, Any]
) -> None:
    response = await api.post("/api/exports", json={"destination": "b-archive", "group_ids": [finished["cats"]]})
    assert response.status_code == 404 and "b-archive" in response.json()["detail"]
    async with client(stack, KEY_B) as other:
        response = await other.post("/api/exports", json={"destination": "b-archive", "group_ids": [finished["cats"]]})
        assert response.status_code == 404 and "group" in response.json()["detail"]
        response = await other.post("/api/exports", json={"destination": "b-archive", "job_ids": finished["jobs"][:1]})
        assert response.status_code == 404 and "job" in response.json()["detail"]
        mine = await start_export(api, destination="archive", job_ids=finished["jobs"][:1], include_manifest=False)
        assert (await other.get(f"/api/exports/{mine}")).status_code == 404
        assert (await other.post(f"/api/exports/{mine}/cancel")).status_code == 404
        assert (await other.get("/api/exports")).json()["exports"] == []
    await wait_export(api, mine)
    both = {"destination": "archive", "group_ids": [finished["cats"]], "job_ids": finished["jobs"][:1]}
    for bad in (both, {"destination": "archive"}, {"destination": "../x", "group_ids": [finished["cats"]]}):
        response = await api.post("/api/exports", json=bad)
        assert response.status_code == 422, response.text


# --- the copy ---


async def test_two_groups_arrive_laid_out_by_group_with_checksums_and_manifests(
    stack: Stack, api: httpx.AsyncClient, finished: dict[str, Any], destination: DestinationServer
) -> None:
    clear(destination, "team-a")
    cats_3, cats_2, dogs = finished["jobs"]
    events: list[dict[str, Any]] = []
    subscribed = asyncio.Event()
    listener = asyncio.create_task(collect_export_events(stack, events, subscribed))
    await asyncio.wait_for(subscribed.wait(), 30)
    export_id = await start_export(api, destination="archive", group_ids=[finished["cats"], finished["dogs"]])
    view = await wait_export(api, export_id)
    assert view["status"] == "completed", view

    stored = objects(destination, "team-a")
    expected_images = (
        {f"{PREFIX}/cats/{cats_3}/0000{i}.png" for i in range(3)}
        | {f"{PREFIX}/cats/{cats_2}/00000.png"}
        | {f"{PREFIX}/dogs_puppies/{dogs}/0000{i}.png" for i in range(2)}
    )
    manifests = {f"{PREFIX}/cats/{cats_3}/manifest.json", f"{PREFIX}/cats/{cats_2}/manifest.json"} | {
        f"{PREFIX}/dogs_puppies/{dogs}/manifest.json"
    }
    assert set(stored) == expected_images | manifests
    assert view["progress"] == {
        "objects_total": 9,
        "objects_done": 9,
        "objects_copied": 9,
        "objects_skipped": 0,
        "objects_failed": 0,
        "bytes_copied": sum(len(data) for data in stored.values()),
    }
    assert view["errors"] == [] and view["error"] is None and view["layout"] == "by_group"

    # Byte for byte what the job's ZIP holds, image and manifest (but for when it was packaged).
    for job_id, folder in ((cats_3, "cats"), (cats_2, "cats"), (dogs, "dogs_puppies")):
        archive = await download_zip(api, job_id)
        for name in archive.namelist():
            exported = stored[f"{PREFIX}/{folder}/{job_id}/{name}"]
            if name == "manifest.json":
                ours, theirs = json.loads(exported), json.loads(archive.read(name))
                assert {k: v for k, v in ours.items() if k != "packaged_at"} == {
                    k: v for k, v in theirs.items() if k != "packaged_at"
                }
            else:
                assert zlib.crc32(exported) == archive.getinfo(name).CRC and exported == archive.read(name)
        minio = destination.client()
        head = minio.stat_object("team-a", f"{PREFIX}/{folder}/{job_id}/00000.png")
        assert (
            head.metadata is not None
            and head.metadata["x-amz-meta-bunch-crc32"] == f"{archive.getinfo('00000.png').CRC:08x}"
        )
        assert head.content_type == "image/png"

    listener_events = await finish_listening(listener, events, export_id)
    assert [e["status"] for e in listener_events] == ["running", "completed"]
    assert listener_events[-1]["objects_copied"] == 9 and listener_events[-1]["project"] == "project-a"

    # The same export again: everything is there with the same size and checksum, nothing is written.
    again = await wait_export(api, await start_export(api, destination="archive", group_ids=[finished["cats"]]))
    assert again["status"] == "completed"
    assert again["progress"]["objects_skipped"] == 6 and again["progress"]["objects_copied"] == 0
    assert set(destination.versions("team-a").values()) == {1}


async def test_jobs_export_flat_and_the_webhook_says_when_it_ended(
    stack: Stack, api: httpx.AsyncClient, finished: dict[str, Any], destination: DestinationServer
) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        job_id = finished["jobs"][0]
        async with client(stack, KEY_B) as other:
            response = await other.post("/api/exports", json={"destination": "b-archive", "job_ids": [job_id]})
            assert response.status_code == 404  # the job is project-a's
        export_id = await start_export(
            api,
            destination="archive",
            job_ids=[job_id],
            layout="flat",
            webhook_url=f"http://127.0.0.1:{port}/hook",
        )
        view = await wait_export(api, export_id)
        assert view["status"] == "completed", view
        flat = objects(destination, "team-a", f"{PREFIX}/{job_id}-")
        assert sorted(flat) == [f"{PREFIX}/{job_id}-0000{i}.png" for i in range(3)] + [
            f"{PREFIX}/{job_id}-manifest.json"
        ]
        manifest = json.loads(flat[f"{PREFIX}/{job_id}-manifest.json"])
        assert [image["file"] for image in manifest["images"]] == [f"{job_id}-0000{i}.png" for i in range(3)]
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.1)
        headers, body = received[0]
        payload = json.loads(body)
        assert payload["event"] == "export.finished" and headers["Bunch-Event"] == "export.finished"
        assert payload["export"]["id"] == export_id and payload["export"]["status"] == "completed"
        assert payload["export"]["progress"]["objects_copied"] == 4
        secret = project_webhook_secret_of(stack, "project-a")
        assert verify_signature(secret, body, headers["Bunch-Signature"])
        assert (await api.get(f"/api/exports/{export_id}")).json()["webhook_status"] == "delivered"
    finally:
        await runner.cleanup()


def project_webhook_secret_of(stack: Stack, project: str) -> str:
    return project_webhook_secret(effective_settings(stack.service_env), project)


async def test_wrong_credentials_or_a_missing_bucket_fail_every_object_with_the_reason(
    api: httpx.AsyncClient, finished: dict[str, Any], destination: DestinationServer
) -> None:
    for name, reason in (("wrong-key", "refused the credentials"), ("no-bucket", "does not exist")):
        export_id = await start_export(api, destination=name, group_ids=[finished["cats"]])
        view = await wait_export(api, export_id)
        shown = (await api.get(f"/api/exports/{export_id}")).text + (await api.get("/api/exports")).text
        for secret in (destination.secret_key, destination.access_key, WRONG_SECRET):
            assert secret not in shown
        assert view["status"] == "failed" and reason in view["error"], view
        progress = view["progress"]
        assert progress["objects_failed"] == progress["objects_total"] == progress["objects_done"] == 6
        assert progress["objects_copied"] == 0 and progress["bytes_copied"] == 0
        assert len(view["errors"]) == 6 and not view["errors_truncated"]
        assert all(reason in error["reason"] for error in view["errors"])
        assert sorted(error["index"] if error["index"] is not None else -1 for error in view["errors"]) == [
            *(-1, -1),  # the two jobs' manifests
            *(0, 0, 1, 2),
        ]
        assert all(error["object"].startswith(f"{PREFIX}/cats/") for error in view["errors"])


# --- under way: kill, cancel, the cap ---


async def test_a_packager_killed_mid_export_resumes_and_writes_each_object_once(
    stack: Stack, api: httpx.AsyncClient, destination: DestinationServer
) -> None:
    big = await create_group(api, "big")
    job_id = await submit(api, semi_auto(big, ["a big one"], 24))
    assert (await wait_final(api, job_id, stack))["status"] == "completed"
    export_id = await start_export(api, destination="slow", group_ids=[big])
    view: dict[str, Any] = {}
    for _ in range(400):
        view = (await api.get(f"/api/exports/{export_id}")).json()
        if view["progress"]["objects_done"] >= 4:
            break
        await asyncio.sleep(0.02)
    stack.processes["packager-0"].kill()
    killed_at = (await api.get(f"/api/exports/{export_id}")).json()
    assert killed_at["status"] == "running" and 4 <= killed_at["progress"]["objects_done"] < 25, killed_at
    stack.start_service("packager", 0)

    # A SIGTERM (a rollout) stops the export after the copies in flight, not at its end, and does not
    # count as a failed attempt.
    for _ in range(400):
        if (await api.get(f"/api/exports/{export_id}")).json()["progress"]["objects_done"] >= 12:
            break
        await asyncio.sleep(0.02)
    stopped = time.monotonic()
    assert stack.processes["packager-0"].stop(timeout=10) == 0
    assert time.monotonic() - stopped < 5
    assert (await api.get(f"/api/exports/{export_id}")).json()["status"] == "running"
    stack.start_service("packager", 0)

    view = await wait_export(api, export_id, within=90)
    assert view["status"] == "completed", view
    progress = view["progress"]
    assert progress["objects_total"] == progress["objects_done"] == 25
    assert progress["objects_copied"] + progress["objects_skipped"] == 25 and progress["objects_failed"] == 0
    async with redis_of(stack) as redis:  # three deliveries; the one a SIGTERM stopped is not counted
        assert await redis.hget(keys.export(export_id), "attempts") == "2"
    written = destination.versions("team-a-slow", f"big/{job_id}/")
    assert len(written) == 25 and set(written.values()) == {1}, written
    archive = await download_zip(api, job_id)
    stored = objects(destination, "team-a-slow", f"big/{job_id}/")
    for name in archive.namelist():
        if name != "manifest.json":
            assert stored[f"big/{job_id}/{name}"] == archive.read(name)


async def test_cancel_stops_an_export_and_a_project_may_have_two_under_way(
    api: httpx.AsyncClient, finished: dict[str, Any]
) -> None:
    groups = [finished["cats"], finished["dogs"]]
    first = await start_export(api, destination="slow", group_ids=groups)
    second = await start_export(api, destination="slow", group_ids=groups)
    response = await api.post("/api/exports", json={"destination": "slow", "group_ids": groups})
    assert response.status_code == 429 and "exports queued or running" in response.json()["detail"]
    assert int(response.headers["retry-after"]) > 0

    canceled = await api.post(f"/api/exports/{first}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert (await api.post(f"/api/exports/{first}/cancel")).status_code == 409
    await wait_export(api, second)
    # The cancel freed its place at once: a third is accepted (and the copy stops short).
    third = await start_export(api, destination="slow", group_ids=groups)
    await api.post(f"/api/exports/{third}/cancel")
    done_at_cancel = (await api.get(f"/api/exports/{first}")).json()["progress"]["objects_done"]
    await asyncio.sleep(1.0)
    after = (await api.get(f"/api/exports/{first}")).json()
    assert after["status"] == "canceled" and after["progress"]["objects_done"] == done_at_cancel < 9
    listed = (await api.get("/api/exports", params={"limit": 3})).json()["exports"]
    assert [e["id"] for e in listed] == [third, second, first]


# --- the project's event stream ---


async def collect_export_events(stack: Stack, events: list[dict[str, Any]], ready: asyncio.Event) -> None:
    async with client(stack, KEY_A) as api, api.stream("GET", "/api/events", timeout=None) as response:
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
                ready.set()  # the snapshot: the stream is subscribed, later events reach it
            elif line.startswith("data: ") and kind == "export":
                events.append(json.loads(line.removeprefix("data: ")))


async def finish_listening(
    listener: asyncio.Task[None], events: list[dict[str, Any]], export_id: str
) -> list[dict[str, Any]]:
    for _ in range(50):
        if any(e["export_id"] == export_id and e["status"] == "completed" for e in events):
            break
        await asyncio.sleep(0.1)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    return [e for e in events if e["export_id"] == export_id]
