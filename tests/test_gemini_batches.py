"""The Gemini emulator's Batch API and Files API, through the real google-genai client (configured the
way Bunch's batch lane configures it: http_options={"base_url": url} and an API key, so API version v1)
and, where the SDK hides the wire, over plain HTTP."""

import asyncio
import base64
import hashlib
import io
import json
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types
from PIL import Image

from deploy.emulators import gemini as emulator
from deploy.emulators.gemini import catalog
from tests.test_gemini_emulator import png_bytes, serve

MODEL = "gemini-2.5-flash-image"
KEY = "batch-key"
FAST = {"batch_pending_seconds": 0.2, "batch_running_seconds": 0.3}
POLL_SECONDS = 0.02
WAIT_SECONDS = 15.0
FINAL = {
    types.JobState.JOB_STATE_SUCCEEDED, types.JobState.JOB_STATE_FAILED, types.JobState.JOB_STATE_CANCELLED,
    types.JobState.JOB_STATE_EXPIRED,
}  # fmt: skip


@pytest.fixture(scope="module")
def gemini_url(workdir: Path) -> Iterator[str]:
    proc, url = emulator.start(workdir, api_keys=[KEY])
    yield url
    proc.stop()


@pytest.fixture(scope="module")
async def client(gemini_url: str) -> AsyncIterator[genai.Client]:
    client = genai.Client(api_key=KEY, http_options={"base_url": gemini_url})
    yield client
    await client.aio.aclose()


@pytest.fixture(autouse=True)
async def fresh(gemini_url: str) -> None:
    assert (await admin(gemini_url, "POST", "reset"))[0] == 200
    assert (await admin(gemini_url, "POST", "config", FAST))[0] == 200


async def admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, f"{url}/_emulator/{path}", json=body) as resp:
        return resp.status, await resp.json()


async def stats(url: str) -> dict[str, Any]:
    return dict((await admin(url, "GET", "stats"))[1])


async def raw(url: str, method: str, path: str, *, key: str | None = KEY, **kwargs: Any) -> tuple[int, Any]:
    headers = {"x-goog-api-key": key} if key is not None else {}
    async with aiohttp.ClientSession() as http, http.request(method, url + path, headers=headers, **kwargs) as resp:
        return resp.status, await resp.json()


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def inline_request(prompt: str, key: str, **config: Any) -> Any:
    """One InlinedRequestDict, as Bunch's batch lane builds them."""
    return {
        "contents": [{"role": "user", "parts": [{"text": prompt}]}],
        "config": {"response_modalities": ["IMAGE"], **config},
        "metadata": {"key": key},
    }


async def wait_for(client: genai.Client, name: str, states: set[types.JobState]) -> tuple[types.BatchJob, list[Any]]:
    """Poll the batch until it reaches one of `states`; returns it and every state seen on the way."""
    seen: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        batch = await client.aio.batches.get(name=name)
        if not seen or seen[-1] != batch.state:
            seen.append(batch.state)
        if batch.state in states:
            return batch, seen
        assert batch.state not in FINAL, (batch.state, seen)
        assert loop.time() < deadline, f"{name} still {batch.state}"
        await asyncio.sleep(POLL_SECONDS)


def last_image(response: types.GenerateContentResponse | None) -> bytes | None:
    assert response is not None
    blobs = [p.inline_data for p in response.parts or [] if p.inline_data is not None and not p.thought]
    return blobs[-1].data if blobs else None


def with_file(text: str, uri: str) -> list[Any]:
    """A prompt and a Files API reference, as types.Part.from_uri makes it."""
    return [text, types.Part.from_uri(file_uri=uri, mime_type="image/png")]


async def upload_png(client: genai.Client, data: bytes | None = None) -> types.File:
    return await client.aio.files.upload(
        file=io.BytesIO(data or png_bytes()), config={"mime_type": "image/png", "display_name": "reference"}
    )


# --- inline batches --------------------------------------------------------------------------------------


async def test_inline_batch_goes_pending_running_succeeded_with_answers_in_order(
    client: genai.Client, gemini_url: str
) -> None:
    """Batch API guide: inline requests answer as `inlinedResponses`, "in the same order as the input
    requests" (types.BatchJobDestination); each is what generateContent answers, metadata echoed."""
    prompts = ["a red fox in the snow", "[emu:safety] a cliff at dawn", "a blue boat"]
    src: list[Any] = [
        inline_request(prompts[0], "first", image_config={"aspect_ratio": "16:9"}),
        inline_request(prompts[1], "second"),
        inline_request(prompts[2], "third"),
    ]
    name_tag = f"inline-{uuid.uuid4().hex[:8]}"
    created = await client.aio.batches.create(model=MODEL, src=src, config={"display_name": name_tag})
    assert created.name and created.name.startswith("batches/")
    assert created.state == types.JobState.JOB_STATE_PENDING
    assert created.display_name == name_tag and created.model == f"models/{MODEL}"
    assert created.create_time is not None and created.dest is None

    done, seen = await wait_for(client, created.name, {types.JobState.JOB_STATE_SUCCEEDED})
    assert seen == [
        types.JobState.JOB_STATE_PENDING, types.JobState.JOB_STATE_RUNNING, types.JobState.JOB_STATE_SUCCEEDED,
    ]  # fmt: skip
    assert done.end_time is not None and done.create_time is not None and done.end_time >= done.create_time
    assert done.dest is not None and done.dest.inlined_responses is not None
    answers = done.dest.inlined_responses
    assert [a.metadata for a in answers] == [{"key": "first"}, {"key": "second"}, {"key": "third"}]
    assert all(a.error is None for a in answers)

    first, safety, third = (a.response for a in answers)
    assert first is not None and third is not None and safety is not None
    image = last_image(first)
    assert image is not None and png_size(image) == (256, 144)
    assert last_image(third) is not None
    assert safety.candidates and safety.candidates[0].finish_reason == types.FinishReason.IMAGE_SAFETY
    assert last_image(safety) is None
    # Usage as generateContent counts it: 1 token per 4 characters of prompt, 1,290 per output image.
    for response, prompt in ((first, prompts[0]), (third, prompts[2])):
        assert response.usage_metadata is not None
        assert response.usage_metadata.prompt_token_count == len(prompt) // 4
        assert response.usage_metadata.candidates_token_count == 1290
    interactive = await client.aio.models.generate_content(
        model=MODEL, contents=prompts[2], config=types.GenerateContentConfig(response_modalities=["IMAGE"])
    )
    assert interactive.usage_metadata == third.usage_metadata

    after = await stats(gemini_url)
    assert after["batches_created"] == 1 and after["batch_requests"] == 3
    assert after["batches_by_state"] == {"JOB_STATE_SUCCEEDED": 1}
    assert after["images"] == 3  # two from the batch, one from generate_content


async def test_operation_wire_shape(client: genai.Client, gemini_url: str) -> None:
    """REST reference (batch-api): an Operation named batches/{id} with GenerateContentBatch metadata
    (states BATCH_STATE_*, int64 batchStats as strings), done and the output as `response` once final."""
    created = await client.aio.batches.create(model=MODEL, src=[inline_request("a kite", "k")])
    assert created.name is not None
    status, pending = await raw(gemini_url, "GET", f"/v1beta/{created.name}")
    assert status == 200
    assert "done" not in pending and "response" not in pending
    meta = pending["metadata"]
    assert meta["@type"] == "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
    assert meta["state"] == "BATCH_STATE_PENDING" and meta["name"] == created.name
    assert meta["batchStats"] == {"requestCount": "1", "pendingRequestCount": "1"}
    assert meta["createTime"].endswith("Z") and "displayName" not in meta

    await wait_for(client, created.name, {types.JobState.JOB_STATE_SUCCEEDED})
    status, done = await raw(gemini_url, "GET", f"/v1/{created.name}")
    assert status == 200 and done["done"] is True and "error" not in done
    assert done["metadata"]["batchStats"] == {"requestCount": "1", "successfulRequestCount": "1"}
    assert done["response"]["@type"].endswith("v1main.GenerateContentBatchOutput")
    assert done["response"]["inlinedResponses"] == done["metadata"]["output"]["inlinedResponses"]
    [answer] = done["response"]["inlinedResponses"]["inlinedResponses"]
    assert answer["metadata"] == {"key": "k"} and answer["response"]["candidates"][0]["finishReason"] == "STOP"


async def test_request_errors_are_per_request_and_quota_counts_batch_images(
    client: genai.Client, gemini_url: str
) -> None:
    """A request Gemini refuses gets `error` (google.rpc.Status: gRPC code and message) in its place;
    the others still answer. Batch images count against the daily quota."""
    await admin(gemini_url, "POST", "config", {"daily_quota_images": 1})
    unknown_file = {"file_data": {"file_uri": f"{gemini_url}/v1beta/files/nosuchfile00", "mime_type": "image/png"}}
    src: list[Any] = [
        inline_request("one picture", "ok"),
        inline_request("bad ratio", "ratio", image_config={"aspect_ratio": "7:3"}),
        {"contents": [{"role": "user", "parts": [{"text": "edit this"}, unknown_file]}], "metadata": {"key": "file"}},
        inline_request("over the daily quota", "quota"),
    ]
    created = await client.aio.batches.create(model=MODEL, src=src)
    assert created.name is not None
    done, _ = await wait_for(client, created.name, {types.JobState.JOB_STATE_SUCCEEDED})
    assert done.dest is not None and done.dest.inlined_responses is not None
    ok, ratio, file, quota = done.dest.inlined_responses
    assert ok.error is None and last_image(ok.response) is not None
    assert ratio.error is not None and ratio.error.code == 3
    assert "Unsupported aspect ratio" in (ratio.error.message or "")
    assert file.error is not None and file.error.code == 7 and "nosuchfile00" in (file.error.message or "")
    assert quota.error is not None and quota.error.code == 8
    assert all(a.response is None for a in (ratio, file, quota))
    after = await stats(gemini_url)
    assert after["quota_images"] == 1 and after["batch_requests"] == 4
    assert after["batch_request_errors"] == {"invalid_argument": 1, "permission_denied": 1, "quota_day": 1}


# --- file batches ----------------------------------------------------------------------------------------


async def test_file_batch_with_file_data_references(client: genai.Client, gemini_url: str, tmp_path: Path) -> None:
    """Batch API guide, input file: JSONL lines {"key", "request"} uploaded with mime_type 'jsonl'; the
    output is a JSONL file (dest.file_name) of {"key", "response"} lines, downloaded with files.download.
    The requests name an uploaded PNG by its URI (types.Part.from_uri)."""
    reference = await upload_png(client, png_bytes((40, 30), "blue"))
    assert reference.name and reference.name.startswith("files/") and reference.uri
    assert reference.state == types.FileState.ACTIVE and reference.source == types.FileSource.UPLOADED
    assert reference.size_bytes == len(png_bytes((40, 30), "blue")) and reference.sha256_hash
    assert reference.create_time and reference.expiration_time
    assert reference.expiration_time - reference.create_time == timedelta(hours=48)

    prompts = {f"k{i}": f"variation number {i} of the picture" for i in range(5)}
    lines = [
        json.dumps({
            "key": key,
            "request": {
                "contents": [{"role": "user", "parts": [
                    {"text": prompt}, {"fileData": {"fileUri": reference.uri, "mimeType": "image/png"}},
                ]}],
                "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "1:1"}},
            },
        })
        for key, prompt in prompts.items()
    ]  # fmt: skip
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = await client.aio.files.upload(file=path, config={"mime_type": "jsonl", "display_name": "requests"})
    assert source.name is not None and source.mime_type == "jsonl"

    created = await client.aio.batches.create(model=MODEL, src=source.name)
    assert created.name is not None
    done, _ = await wait_for(client, created.name, {types.JobState.JOB_STATE_SUCCEEDED})
    assert done.dest is not None and done.dest.file_name and done.dest.file_name.startswith("files/batch-")

    results = await client.aio.files.get(name=done.dest.file_name)
    assert results.source == types.FileSource.GENERATED and results.download_uri and results.mime_type
    data = await client.aio.files.download(file=done.dest.file_name)
    assert results.size_bytes == len(data)
    answers = [json.loads(line) for line in data.decode().splitlines()]
    assert sorted(a["key"] for a in answers) == sorted(prompts)  # every key once; the order is not the contract
    for answer in answers:
        assert set(answer) == {"key", "response"}, answer
        response = types.GenerateContentResponse.model_validate(answer["response"])
        image = last_image(response)
        assert image is not None and png_size(image) == (256, 256)
        assert response.usage_metadata is not None
        # The referenced file counts as an input image: 258 tokens, as inline data does.
        assert response.usage_metadata.prompt_token_count == len(prompts[answer["key"]]) // 4 + 258

    # The same bytes, streamed from the downloadUri form (/download/{version}/files/{id}:download).
    async with (
        aiohttp.ClientSession() as http,
        http.get(results.download_uri, headers={"x-goog-api-key": KEY}) as resp,
    ):
        assert resp.status == 200 and await resp.read() == data
    after = await stats(gemini_url)
    assert after["files_uploaded"] == 2 and after["file_downloads"] == 2 and after["batch_requests"] == 5


async def test_file_batch_lines_that_are_not_requests_get_errors(
    client: genai.Client, gemini_url: str, tmp_path: Path
) -> None:
    """Each output line is the input line without its request, plus "response" or a status "error"
    (batch-api page: "each line is either a GenerateContentResponse or a status object")."""
    good = {"key": "good", "extra": [1, 2], "request": {"contents": [{"parts": [{"text": "a lamp"}]}]}}
    body = "\n".join([json.dumps(good), "{not json", json.dumps({"key": "norequest"}), ""]) + "\n"
    source = await client.aio.files.upload(file=io.BytesIO(body.encode()), config={"mime_type": "jsonl"})
    assert source.name is not None
    created = await client.aio.batches.create(model=MODEL, src=source.name)
    assert created.name is not None
    done, _ = await wait_for(client, created.name, {types.JobState.JOB_STATE_SUCCEEDED})
    assert done.dest is not None and done.dest.file_name
    lines = [json.loads(line) for line in (await client.aio.files.download(file=done.dest.file_name)).splitlines()]
    by_key = {line.get("key"): line for line in lines}
    assert set(by_key) == {"good", "norequest", None}
    assert by_key["good"]["extra"] == [1, 2] and "response" in by_key["good"]
    assert by_key["norequest"]["error"]["code"] == 3 and by_key[None]["error"]["code"] == 3
    assert "not JSON" in by_key[None]["error"]["message"]
    _, operation = await raw(gemini_url, "GET", f"/v1beta/{created.name}")
    assert operation["metadata"]["batchStats"] == {
        "requestCount": "3", "successfulRequestCount": "1", "failedRequestCount": "2",
    }  # fmt: skip


# --- list, get, cancel, delete ---------------------------------------------------------------------------


async def test_list_pages_newest_first_get_unknown_and_delete(client: genai.Client, gemini_url: str) -> None:
    await admin(gemini_url, "POST", "config", {"batch_pending_seconds": 60})
    tag = uuid.uuid4().hex[:8]
    names = []
    for i in range(3):
        created = await client.aio.batches.create(
            model=MODEL,
            src=[inline_request(f"list {i}", str(i))],
            config={"display_name": f"{tag}-{i}"},
        )
        names.append(created.name)
    pager = await client.aio.batches.list(config={"page_size": 2})
    assert len(pager.page) == 2  # one page of two, then the pager fetches the rest
    listed = [batch async for batch in pager]
    assert [b.display_name for b in listed] == [f"{tag}-2", f"{tag}-1", f"{tag}-0"]
    assert [b.name for b in listed] == names[::-1]
    assert all(b.state == types.JobState.JOB_STATE_PENDING for b in listed)

    with pytest.raises(errors.ClientError) as caught:
        await client.aio.batches.get(name="batches/doesnotexist")
    assert (caught.value.code, caught.value.status) == (404, "NOT_FOUND")

    assert names[1] is not None
    await client.aio.batches.delete(name=names[1])
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.batches.get(name=names[1])
    assert caught.value.code == 404
    assert [b.name async for b in await client.aio.batches.list()] == [names[2], names[0]]
    status, payload = await raw(gemini_url, "GET", "/v1beta/batches?pageToken=garbage")
    assert status == 400 and payload["error"]["status"] == "INVALID_ARGUMENT"


async def test_cancel_mid_run_stops_generating(client: genai.Client, gemini_url: str) -> None:
    await admin(gemini_url, "POST", "config", {"latency_ms": 300, "batch_pending_seconds": 0.05})
    src = [inline_request(f"slow {i}", str(i)) for i in range(24)]
    created = await client.aio.batches.create(model=MODEL, src=src)
    assert created.name is not None
    await wait_for(client, created.name, {types.JobState.JOB_STATE_RUNNING})
    await client.aio.batches.cancel(name=created.name)
    cancelled = await client.aio.batches.get(name=created.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.dest is None
    assert cancelled.end_time is not None
    generated = (await stats(gemini_url))["batch_requests"]
    assert generated < len(src)
    # Nothing happens after a cancel: waiting is the only way to see that nothing more is generated.
    await asyncio.sleep(0.8)
    assert (await stats(gemini_url))["batch_requests"] == generated
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.batches.cancel(name=created.name)
    assert (caught.value.code, caught.value.status) == (400, "FAILED_PRECONDITION")
    assert (await stats(gemini_url))["batches_by_state"] == {"JOB_STATE_CANCELLED": 1}


# --- whole-batch directives ------------------------------------------------------------------------------


async def test_batch_expire_directive_is_counted_per_batch(client: genai.Client, gemini_url: str) -> None:
    prompt = f"[emu:batch-expirex1] a tower {uuid.uuid4().hex}"
    names = []
    for _ in range(2):
        created = await client.aio.batches.create(
            model=MODEL,
            src=[inline_request(prompt, "a"), inline_request("a plain one", "b")],
        )
        assert created.name is not None
        names.append(created.name)
    expired, _ = await wait_for(client, names[0], FINAL)
    assert expired.state == types.JobState.JOB_STATE_EXPIRED and expired.dest is None
    succeeded, _ = await wait_for(client, names[1], FINAL)
    assert succeeded.state == types.JobState.JOB_STATE_SUCCEEDED
    assert succeeded.dest is not None and len(succeeded.dest.inlined_responses or []) == 2
    assert (await stats(gemini_url))["batch_requests"] == 2  # the expired batch generated nothing


async def test_batch_fail_directive_ends_failed_with_an_error(client: genai.Client, gemini_url: str) -> None:
    created = await client.aio.batches.create(model=MODEL, src=[inline_request("[emu:batch-fail] x", "a")])
    assert created.name is not None
    failed, _ = await wait_for(client, created.name, FINAL)
    assert failed.state == types.JobState.JOB_STATE_FAILED and failed.dest is None
    # google-genai 3.6.1 does not map the Operation's error (_BatchJob_from_mldev): it is on the wire.
    status, operation = await raw(gemini_url, "GET", f"/v1/{created.name}")
    assert status == 200 and operation["done"] is True and "response" not in operation
    assert operation["error"]["code"] == 13 and operation["error"]["message"]


async def test_batch_expires_after_batch_expire_seconds(client: genai.Client, gemini_url: str) -> None:
    await admin(gemini_url, "POST", "config", {"batch_running_seconds": 30, "batch_expire_seconds": 0.5})
    created = await client.aio.batches.create(model=MODEL, src=[inline_request("never done", "a")])
    assert created.name is not None
    expired, seen = await wait_for(client, created.name, FINAL)
    assert expired.state == types.JobState.JOB_STATE_EXPIRED and expired.dest is None
    assert types.JobState.JOB_STATE_RUNNING in seen


# --- refusals --------------------------------------------------------------------------------------------


async def test_keys_models_and_inputs_are_checked(client: genai.Client, gemini_url: str) -> None:
    src: Any = [inline_request("x", "a")]
    bad = genai.Client(api_key="not-a-key", http_options={"base_url": gemini_url})
    try:
        with pytest.raises(errors.ClientError) as caught:
            await bad.aio.batches.create(model=MODEL, src=src)
        assert caught.value.code == 400 and caught.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        with pytest.raises(errors.ClientError) as caught:
            await bad.aio.files.upload(file=io.BytesIO(b"{}\n"), config={"mime_type": "jsonl"})
        assert caught.value.code == 400
    finally:
        await bad.aio.aclose()
    for method, path in [
        ("POST", f"/v1beta/models/{MODEL}:batchGenerateContent"), ("GET", "/v1beta/batches"),
        ("GET", "/v1beta/files"), ("POST", "/upload/v1beta/files"),
    ]:  # fmt: skip
        status, payload = await raw(gemini_url, method, path, key=None, json={})
        assert (status, payload["error"]["status"]) == (403, "PERMISSION_DENIED"), path

    with pytest.raises(errors.ClientError) as caught:
        await client.aio.batches.create(model="gemini-9-ultra-image", src=src)
    assert caught.value.code == 404 and "batchGenerateContent" in (caught.value.message or "")
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.batches.create(model=MODEL, src="files/nosuchinput1")
    assert caught.value.code == 404
    picture = await upload_png(client)
    assert picture.name is not None
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.batches.create(model=MODEL, src=picture.name)
    assert caught.value.code == 400 and "JSONL" in (caught.value.message or "")

    # generateContent reads fileData parts too: an uploaded file, and an unknown one is a 403.
    response = await client.aio.models.generate_content(model=MODEL, contents=with_file("like this", picture.uri or ""))
    assert response.usage_metadata is not None and response.usage_metadata.prompt_token_count == 258 + 2
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(
            model=MODEL, contents=with_file("x", f"{gemini_url}/v1beta/files/gone1")
        )
    assert (caught.value.code, caught.value.status) == (403, "PERMISSION_DENIED")


async def test_faults_apply_to_batch_and_file_endpoints(client: genai.Client, gemini_url: str) -> None:
    await admin(gemini_url, "POST", "config", {"error_rate": 1.0})
    with pytest.raises(errors.ServerError) as server:
        await client.aio.batches.list()
    assert (server.value.code, server.value.status) == (503, "UNAVAILABLE")
    await admin(gemini_url, "POST", "config", {"error_rate": 0.0, "rate_limit_rate": 1.0})
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.files.upload(file=io.BytesIO(png_bytes()), config={"mime_type": "image/png"})
    assert (caught.value.code, caught.value.status) == (429, "RESOURCE_EXHAUSTED")
    await admin(gemini_url, "POST", "config", {"rate_limit_rate": 0.0, "revoked_keys": [KEY]})
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.batches.list()
    assert caught.value.code == 400
    after = await stats(gemini_url)
    assert after["batch_api_by_status"] == {"503": 1, "429": 1, "400": 1}
    assert after["batches_created"] == 0 and after["files_uploaded"] == 0


async def test_inline_batch_over_the_size_limit_is_a_400() -> None:
    """Batch API guide: inline requests "keep the total request size under 20MB"."""
    assert catalog.MAX_BATCH_REQUEST_BYTES == 20 * 1024 * 1024
    limit = 64 * 1024
    async with serve(emulator.create_app(api_keys=[KEY], max_batch_request_bytes=limit)) as url:
        local = genai.Client(api_key=KEY, http_options={"base_url": url})
        try:
            with pytest.raises(errors.ClientError) as caught:
                await local.aio.batches.create(model=MODEL, src=[inline_request("x" * limit, "big")])
            assert caught.value.code == 400
            assert caught.value.message == f"Request payload size exceeds the limit: {limit} bytes."
            small = await local.aio.batches.create(model=MODEL, src=[inline_request("x" * 1000, "small")])
            assert small.state == types.JobState.JOB_STATE_PENDING
        finally:
            await local.aio.aclose()


async def test_upload_in_several_pieces_keeps_every_byte(client: genai.Client) -> None:
    """google-genai sends 8 MB pieces (_api_client CHUNK_SIZE), the last with "upload, finalize"."""
    data = os.urandom(17 * 1024 * 1024)
    uploaded = await client.aio.files.upload(file=io.BytesIO(data), config={"mime_type": "application/octet-stream"})
    assert uploaded.size_bytes == len(data)
    assert uploaded.sha256_hash == base64.b64encode(hashlib.sha256(data).digest()).decode()


async def test_upload_over_2_gb_is_refused_before_any_byte(gemini_url: str) -> None:
    headers = {
        "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(catalog.MAX_FILE_BYTES + 1),
        "X-Goog-Upload-Header-Content-Type": "jsonl",
    }  # fmt: skip
    async with aiohttp.ClientSession() as http:
        target = f"{gemini_url}/upload/v1beta/files"
        async with http.post(target, json={"file": {}}, headers={"x-goog-api-key": KEY, **headers}) as resp:
            assert resp.status == 400 and "2 GB" in (await resp.json())["error"]["message"]
        async with http.post(f"{target}?upload_id=unknown", data=b"x", headers={"X-Goog-Upload-Offset": "0"}) as resp:
            # An unknown upload ends with "final", so google-genai stops at once instead of retrying.
            assert resp.status == 404 and resp.headers["X-Goog-Upload-Status"] == "final"


# --- files: expiry, list, delete -------------------------------------------------------------------------


async def test_expired_file_cannot_be_used(client: genai.Client, gemini_url: str) -> None:
    """Files API: files are stored for 48 hours (file_ttl_seconds here); an expired file answers like one
    that never existed, to files.get and in a fileData part."""
    await admin(gemini_url, "POST", "config", {"file_ttl_seconds": 0.3})
    picture = await upload_png(client)
    assert picture.name is not None and picture.uri is not None
    assert picture.expiration_time and picture.create_time
    assert picture.expiration_time - picture.create_time == timedelta(seconds=0.3)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        try:
            await client.aio.files.get(name=picture.name)
        except errors.ClientError as exc:
            assert (exc.code, exc.status) == (403, "PERMISSION_DENIED")
            break
        assert loop.time() < deadline
        await asyncio.sleep(POLL_SECONDS)
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents=with_file("x", picture.uri))
    assert caught.value.code == 403
    assert [f async for f in await client.aio.files.list()] == []


async def test_files_list_delete_and_download_rules(client: genai.Client, gemini_url: str) -> None:
    uploaded = [await upload_png(client, png_bytes(color=c)) for c in ("red", "green", "blue")]
    pager = await client.aio.files.list(config={"page_size": 2})
    assert len(pager.page) == 2
    assert [f.name async for f in pager] == [f.name for f in uploaded[::-1]]
    assert uploaded[0].name is not None
    await client.aio.files.delete(name=uploaded[0].name)
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.files.get(name=uploaded[0].name)
    assert caught.value.code == 403
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.files.delete(name=uploaded[0].name)
    assert caught.value.code == 403
    # Only generated files download (files.py `download`: "uploaded files can't be downloaded").
    assert uploaded[1].name is not None
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.files.download(file=uploaded[1].name)
    assert caught.value.code == 400


async def test_reset_clears_batches_and_files(client: genai.Client, gemini_url: str) -> None:
    picture = await upload_png(client)
    created = await client.aio.batches.create(model=MODEL, src=[inline_request("x", "a")])
    assert created.name is not None and picture.name is not None
    assert (await admin(gemini_url, "POST", "reset"))[0] == 200
    with pytest.raises(errors.ClientError):
        await client.aio.batches.get(name=created.name)
    with pytest.raises(errors.ClientError):
        await client.aio.files.get(name=picture.name)
    after = await stats(gemini_url)
    assert after["batches_by_state"] == {} and after["batches_created"] == 0 and after["files_uploaded"] == 0
    assert after["config"]["batch_pending_seconds"] == 1.0 and after["config"]["file_ttl_seconds"] == 172800.0


async def test_batch_config_knobs_are_validated(gemini_url: str) -> None:
    for bad in ({"batch_pending_seconds": -1}, {"batch_running_seconds": "2"}, {"batch_expire_seconds": True},
                {"file_ttl_seconds": float("inf")}):  # fmt: skip
        status, _ = await admin(gemini_url, "POST", "config", bad)
        assert status == 400, bad
    status, config = await admin(gemini_url, "POST", "config", {"batch_expire_seconds": 5, "file_ttl_seconds": 1.5})
    assert status == 200 and config["batch_expire_seconds"] == 5.0 and config["file_ttl_seconds"] == 1.5


def test_cli_takes_the_batch_flags(tmp_path: Path) -> None:
    proc, url = emulator.start(tmp_path, batch_pending_seconds=0.5, file_ttl_seconds=60)
    try:
        with urllib.request.urlopen(f"{url}/_emulator/stats") as answer:
            config = json.loads(answer.read())["config"]
    finally:
        proc.stop()
    assert config["batch_pending_seconds"] == 0.5 and config["file_ttl_seconds"] == 60.0
    assert config["batch_running_seconds"] == 2.0
