"""shared.presign writes the very URLs minio would, and the S3 server serves them."""

from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from minio import Minio

from shared.presign import Presigner, path_style_endpoint
from shared.settings import Settings
from shared.storage import Storage

NOW = 1_795_000_000.7
KEYS = ["images/0a1b.3/2-1.png", "uploads/we ird/ké y+=&?~.png", "a b/c%20d(1)*!'.zip"]
DISPOSITION = {"response-content-disposition": 'attachment; filename="bunch-0a1b.zip"'}


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize("query", [None, DISPOSITION])
@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://files.example.org"])
def test_urls_match_minio_byte_for_byte(key: str, method: str, query: dict[str, str] | None, endpoint: str) -> None:
    secure = endpoint.startswith("https")
    netloc = endpoint.split("://", 1)[1]
    minio = Minio(netloc, access_key="AKIA/TEST", secret_key="se+cr/et=", secure=secure, region="eu-west-3")
    expected = minio.get_presigned_url(
        method,
        "bunch",
        key,
        timedelta(seconds=3600),
        response_headers=dict(query) if query else None,
        request_date=datetime.fromtimestamp(NOW, UTC),
    )
    ours = Presigner(endpoint, "eu-west-3", "AKIA/TEST", "se+cr/et=")
    assert ours.url(method, "bunch", key, 3600, query, now=NOW) == expected


def test_the_signing_key_follows_the_day() -> None:
    ours = Presigner("http://127.0.0.1:9000", "us-east-1", "a", "b")
    minio = Minio("127.0.0.1:9000", access_key="a", secret_key="b", secure=False, region="us-east-1")
    for now in (NOW, NOW + 86_400, NOW):
        day = datetime.fromtimestamp(now, UTC)
        expected = minio.get_presigned_url("GET", "bunch", "k", timedelta(seconds=60), request_date=day)
        assert ours.url("GET", "bunch", "k", 60, now=now) == expected


def test_virtual_host_endpoints_are_left_to_minio() -> None:
    assert path_style_endpoint("http://minio:9000")
    assert path_style_endpoint("https://s3.example.org")
    assert not path_style_endpoint("https://s3.eu-west-3.amazonaws.com")
    assert not path_style_endpoint("https://oss-cn-hangzhou.aliyuncs.com")
    aws = Storage(Settings(s3_endpoint="https://s3.eu-west-3.amazonaws.com", s3_region="eu-west-3"))
    assert aws.links.presigner is None
    assert aws.presigned_get("k").startswith("https://bunch.s3.eu-west-3.amazonaws.com/k?")


async def test_the_s3_server_accepts_the_links(storage: Storage) -> None:
    assert storage.links.presigner is not None
    async with aiohttp.ClientSession() as http:
        async with http.put(storage.presigned_put("presign/ké y.bin"), data=b"payload") as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(storage.presigned_get("presign/ké y.bin", "out.bin")) as resp:
            assert resp.status == 200
            assert await resp.read() == b"payload"
            assert resp.headers["Content-Disposition"] == 'attachment; filename="out.bin"'
    # moto does not check signatures: that they are right is what the comparison with minio shows.


async def test_workers_links_are_signed_for_their_endpoint_and_people_s_for_the_public_one(
    storage: Storage, settings: Settings
) -> None:
    """compose's `local` profile: people reach the object store on localhost, the RunPod workers beside
    it on its service name. A link signed for the wrong host is refused (SigV4 signs the Host)."""
    split = Storage(
        settings.model_copy(
            update={"s3_public_endpoint": "http://localhost:1", "s3_worker_endpoint": settings.s3_endpoint}
        )
    )
    assert split.presigned_get("k").startswith("http://localhost:1/bunch/k?")
    worker_put = split.worker_links.put("presign/worker.bin")
    assert worker_put.startswith(f"{settings.s3_endpoint}/")
    async with aiohttp.ClientSession() as http, http.put(worker_put, data=b"from a worker") as resp:
        assert resp.status == 200, await resp.text()
    assert await storage.get_bytes("presign/worker.bin") == b"from a worker"
    # Unset, the workers get the people's links.
    assert storage.worker_links is storage.links
