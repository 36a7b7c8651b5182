"""Object storage (MinIO or any S3) through the `minio` client.

The minio client is blocking, so every call that touches the network runs in a worker thread.
Presigning is computed locally (the region is fixed), against the public endpoint (or the workers'
endpoint for RunPod's links), by shared.presign where minio would address the endpoint path-style,
by minio elsewhere.
"""

import asyncio
import io
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import S3Error
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, LifecycleConfig, Rule

from shared import checksums
from shared.presign import Presigner, path_style_endpoint
from shared.settings import Settings

# The codes S3 servers answer for an object that does not exist.
MISSING = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
# ... and for an API they do not implement.
UNSUPPORTED = frozenset({"NotImplemented", "NotSupported"})
# Bunch's one lifecycle rule, by its ID: the operator's own rules of the bucket are left as they are.
UPLOAD_CLEANUP = Rule(
    ENABLED,
    rule_filter=Filter(prefix=""),
    rule_id="bunch-abort-incomplete-multipart-uploads",
    abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days_after_initiation=1),
)


def _client(endpoint_url: str, settings: Settings, http: urllib3.PoolManager | None = None) -> Minio:
    parts = urlsplit(endpoint_url)
    return Minio(
        parts.netloc,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=parts.scheme == "https",
        region=settings.s3_region,
        http_client=http,
    )


class Links:
    """Presigned GET and PUT links for one endpoint: the host is part of the signature, so people's
    links and the RunPod workers' may need signers of their own."""

    def __init__(self, endpoint: str, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.expiry_seconds = settings.presign_expiry_seconds
        self.signer = _client(endpoint, settings)
        self.presigner: Presigner | None = None
        if path_style_endpoint(endpoint):
            self.presigner = Presigner(
                endpoint,
                settings.s3_region,
                settings.s3_access_key.get_secret_value(),
                settings.s3_secret_key.get_secret_value(),
            )

    def get(self, key: str, download_name: str | None = None, expires_seconds: int | None = None) -> str:
        """A GET link valid `expires_seconds` (default: presign_expiry_seconds)."""
        seconds = expires_seconds or self.expiry_seconds
        headers: Any = None
        if download_name:
            headers = {"response-content-disposition": f'attachment; filename="{download_name}"'}
        if self.presigner is not None:
            return self.presigner.url("GET", self.bucket, key, seconds, headers)
        return self.signer.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=seconds), response_headers=headers
        )

    def put(self, key: str, expires_seconds: int | None = None) -> str:
        seconds = expires_seconds or self.expiry_seconds
        if self.presigner is not None:
            return self.presigner.url("PUT", self.bucket, key, seconds)
        return self.signer.presigned_put_object(self.bucket, key, expires=timedelta(seconds=seconds))


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        retries = urllib3.Retry(total=settings.s3_retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504))
        timeout = urllib3.Timeout(connect=settings.s3_connect_timeout_seconds, read=settings.s3_read_timeout_seconds)
        http = urllib3.PoolManager(num_pools=4, maxsize=32, retries=retries, timeout=timeout)
        self.client = _client(settings.s3_endpoint, settings, http)
        public = settings.s3_public_endpoint or settings.s3_endpoint
        # Links for people (clients, browsers) and for RunPod workers (references, image uploads).
        self.links = Links(public, settings)
        worker = settings.s3_worker_endpoint
        self.worker_links = Links(worker, settings) if worker and worker != public else self.links

    # --- async, for request handlers and event loops ---

    async def ensure_bucket(self) -> None:
        def create() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:  # another replica created it first
                    if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise

        await asyncio.to_thread(create)

    async def ensure_upload_cleanup(self) -> bool:
        """Have the store delete multipart uploads left unfinished for a day (a ZIP writer killed
        mid-upload leaves its parts, invisible and billed, until then). The bucket's other lifecycle
        rules are kept. False when the server has no lifecycle support."""

        def apply() -> bool:
            try:
                current = self.client.get_bucket_lifecycle(self.bucket)
            except S3Error as exc:
                if exc.code in UNSUPPORTED:
                    return False
                raise
            rules = [rule for rule in (current.rules if current else []) if rule.rule_id != UPLOAD_CLEANUP.rule_id]
            if current is not None and UPLOAD_CLEANUP in current.rules:
                return True
            try:
                self.client.set_bucket_lifecycle(self.bucket, LifecycleConfig([*rules, UPLOAD_CLEANUP]))
            except S3Error as exc:
                if exc.code in UNSUPPORTED:
                    return False
                raise
            return True

        return await asyncio.to_thread(apply)

    async def ping(self) -> bool:
        try:
            return await asyncio.to_thread(self.client.bucket_exists, self.bucket)
        except Exception:
            return False

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self.client.put_object, self.bucket, key, io.BytesIO(data), len(data), content_type)

    async def exists(self, key: str) -> bool:
        try:
            await asyncio.to_thread(self.client.stat_object, self.bucket, key)
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}:
                return False
            raise
        return True

    async def size(self, key: str) -> int | None:
        """The object's size in bytes (one HEAD), None if there is no such object."""
        try:
            stat = await asyncio.to_thread(self.client.stat_object, self.bucket, key)
        except S3Error as exc:
            if exc.code in MISSING:
                return None
            raise
        return stat.size or 0

    async def checksum(self, key: str, limit: int | None = None) -> tuple[int, int] | None:
        """(size, CRC-32) of the object, streamed in chunks; None if there is no such object.

        Reading stops once more than `limit` bytes came: the size returned then exceeds `limit`
        but is not the object's, which is all a caller comparing against `limit` needs to know.
        """
        try:
            return await asyncio.to_thread(self._checksum, key, limit)
        except S3Error as exc:
            if exc.code in MISSING:
                return None
            raise

    def _checksum(self, key: str, limit: int | None) -> tuple[int, int]:
        size, crc = 0, 0
        response = self.client.get_object(self.bucket, key)
        try:
            for chunk in response.stream(256 * 1024):
                size += len(chunk)
                crc = checksums.crc32(chunk, crc)
                if limit is not None and size > limit:
                    response.close()  # left half-read: that connection cannot serve another request
                    break
        except BaseException:
            response.close()
            raise
        finally:
            response.release_conn()
        return size, crc

    async def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            except BaseException:
                response.close()
                raise
            finally:
                response.release_conn()

        return await asyncio.to_thread(read)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.client.remove_object, self.bucket, key)

    def presigned_get(self, key: str, download_name: str | None = None, expires_seconds: int | None = None) -> str:
        """A GET link for people, valid `expires_seconds` (default: presign_expiry_seconds)."""
        return self.links.get(key, download_name, expires_seconds)

    def presigned_put(self, key: str, expires_seconds: int | None = None) -> str:
        return self.links.put(key, expires_seconds)

    # --- blocking, for code that already runs in a thread (the packager's ZIP writer) ---

    def iter_object(self, key: str, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
        response = self.client.get_object(self.bucket, key)
        try:
            yield from response.stream(chunk_size)
        except BaseException:
            response.close()  # left half-read: that connection cannot serve another request
            raise
        finally:
            # Fully read, the connection goes back to the pool instead of a new TCP connect per object.
            response.release_conn()

    def put_stream(self, key: str, stream: BinaryIO, part_size: int, content_type: str) -> int:
        """Multipart upload of a stream of unknown length; returns the bytes written."""
        self.client.put_object(self.bucket, key, stream, -1, content_type, part_size=part_size)
        return self.client.stat_object(self.bucket, key).size or 0
