"""One export destination's bucket, through its own minio client. Blocking: called from threads.

Every image is written with its CRC-32 as user metadata (`x-amz-meta-bunch-crc32`, 8 hex digits)
and its exact size, so an export that runs again (resumed after a crash, or repeated by the user)
recognises what is there already without reading it: same size in the listing, same checksum in
one HEAD. A copy between two servers streams the source into the PUT and checks the CRC-32 before
the last bytes go out, so an image that changed in storage is refused, never written.
"""

from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.error import MinioException, S3Error, ServerError
from urllib3.exceptions import HTTPError

from shared import checksums
from shared.export_destinations import Destination

CRC_METADATA = "x-amz-meta-bunch-crc32"
# Answers that hold for every object of the destination: the export stops at the first, and every
# object left is failed with it instead of being tried.
DESTINATION_WIDE = frozenset(
    {
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidBucketName",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
    }
)
# Answers worth another try after a pause (S3's error codes for throttling and its own trouble).
TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "OperationAborted"}
)
MISSING = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})


def crc_text(crc32: int) -> str:
    return f"{crc32:08x}"


class CopyFailed(Exception):
    """An object could not be copied, and why. `wide`: the destination would refuse every object
    (credentials, bucket); `transient`: trying again later may work."""

    def __init__(self, reason: str, *, wide: bool = False, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wide = wide
        self.transient = transient


def explain(exc: BaseException, destination: Destination) -> CopyFailed:
    """A reason a person can act on, for an error of a copy (re-raises what is no storage error)."""
    if isinstance(exc, CopyFailed):
        return exc
    bucket = destination.bucket
    if isinstance(exc, S3Error):
        code = exc.code or "Error"
        said = f"{code}: {exc.message}" if exc.message else code
        if code in MISSING:  # only the source's GET (or a server-side copy's) can miss its object
            return CopyFailed(f"the image is no longer in Bunch's storage (deleted by retention?) ({said})")
        if code == "NoSuchBucket":
            return CopyFailed(f"the destination bucket '{bucket}' does not exist ({said})", wide=True)
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}:
            return CopyFailed(f"the destination refused the credentials Bunch has for it ({said})", wide=True)
        if code in DESTINATION_WIDE:
            return CopyFailed(
                f"the destination's credentials may not list, read or write bucket '{bucket}' "
                f"(it needs s3:ListBucket, s3:GetObject and s3:PutObject; {said})",
                wide=True,
            )
        return CopyFailed(f"the destination answered {said}", transient=code in TRANSIENT_CODES)
    if isinstance(exc, ServerError):
        return CopyFailed(f"the destination answered HTTP {exc.status_code}", transient=True)
    if isinstance(exc, (HTTPError, OSError)):
        return CopyFailed(f"the copy was cut off: {type(exc).__name__}: {exc}", transient=True)
    if isinstance(exc, MinioException):
        return CopyFailed(f"the destination answered unexpectedly: {exc}", transient=True)
    raise exc


@dataclass(frozen=True, slots=True)
class Present:
    """An object already at the destination."""

    size: int


class _Verified:
    """A file-like view of a source response that checks size and CRC-32 as minio reads it."""

    def __init__(self, response: Any, size: int, crc32: int | None, key: str) -> None:
        self.response = response
        self.size = size
        self.crc32 = crc32
        self.key = key
        self.seen = 0
        self.crc = 0

    def read(self, n: int = -1) -> bytes:
        chunk: bytes = self.response.read(n if n >= 0 else None)
        self.seen += len(chunk)
        self.crc = checksums.crc32(chunk, self.crc)
        if self.seen > self.size:
            raise CopyFailed(f"{self.key}: the stored image has more than the {self.size} bytes recorded")
        if self.seen == self.size and self.crc32 is not None and self.crc != self.crc32:
            # Raised before minio sends these last bytes: nothing that differs is written.
            raise CopyFailed(f"{self.key}: the stored image has CRC-32 {self.crc:08x}, {self.crc32:08x} was recorded")
        if not chunk and self.seen < self.size:
            raise CopyFailed(f"{self.key}: the stored image has {self.seen} bytes, {self.size} were recorded")
        return chunk


class DestinationBucket:
    def __init__(self, destination: Destination, pool_size: int, timeout_seconds: float) -> None:
        self.destination = destination
        parts = urllib3.util.parse_url(destination.endpoint)
        # No retries here: the export retries a whole object with backoff, re-reading its source.
        http = urllib3.PoolManager(
            num_pools=2,
            maxsize=pool_size,
            retries=urllib3.Retry(total=0, redirect=0, raise_on_status=False),
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds),
        )
        self.client = Minio(
            parts.netloc or "",
            access_key=destination.access_key_id.get_secret_value(),
            secret_key=destination.secret_access_key.get_secret_value(),
            secure=parts.scheme == "https",
            region=destination.region,
            http_client=http,
        )

    @property
    def bucket(self) -> str:
        return self.destination.bucket

    def listing(self, prefix: str, low: str, high: str) -> dict[str, Present]:
        """The objects under `prefix` whose keys sort from `low` to `high` (one LIST page per
        thousand keys): what a page of an export may find there already."""
        found: dict[str, Present] = {}
        # StartAfter is exclusive; a proper prefix of `low` sorts before it.
        for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True, start_after=low[:-1]):
            name = item.object_name or ""
            if name > high:
                break
            if name >= low:
                found[name] = Present(item.size or 0)
        return found

    def checksum(self, key: str) -> str | None:
        """The CRC-32 an export wrote on the object (None: not written by an export, or gone)."""
        try:
            stat = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in MISSING:
                return None
            raise
        metadata = stat.metadata or {}
        value = metadata.get(CRC_METADATA)
        return str(value) if value is not None else None

    def put_from(self, source: Any, key: str, size: int, crc32: int | None, content_type: str) -> None:
        """Stream an object of `size` bytes from `source` (an open GET of Bunch's storage)."""
        reader = _Verified(source, size, crc32, key)
        metadata: dict[str, Any] | None = {CRC_METADATA: crc_text(crc32)} if crc32 is not None else None
        # minio reads only read(): the verifying view is as good as a file to it.
        self.client.put_object(self.bucket, key, cast(BinaryIO, reader), size, content_type, metadata=metadata)

    def copy_within(self, source_bucket: str, source_key: str, key: str, crc32: int | None, content_type: str) -> None:
        """Server-side copy: source and destination are the same server and the same credentials."""
        metadata: dict[str, Any] = {"Content-Type": content_type}
        if crc32 is not None:
            metadata[CRC_METADATA] = crc_text(crc32)
        self.client.copy_object(
            self.bucket, key, CopySource(source_bucket, source_key), metadata=metadata, metadata_directive=REPLACE
        )

    def put_file(self, key: str, data: IO[bytes], size: int, crc32: int, content_type: str) -> None:
        metadata: dict[str, Any] = {CRC_METADATA: crc_text(crc32)}
        self.client.put_object(self.bucket, key, cast(BinaryIO, data), size, content_type, metadata=metadata)
