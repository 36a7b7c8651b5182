"""Stream a ZIP archive into object storage with memory bounded by one upload part.

The pipeline is pull-based and runs in a single worker thread:

    storage.iter_object -> stream_zip -> _ChunkReader -> storage.put_stream (minio multipart)

minio reads one part at a time from the reader, which pulls ZIP bytes from stream-zip, which
pulls entries (and their object chunks) lazily. Nothing upstream runs ahead of the uploader, so
the resident set is one part being assembled by minio plus the chunk currently in flight.

Every member uses the ZIP64 variants: sizes/offsets above 4 GiB stay representable no matter how
large the archive grows, and Python's zipfile, Info-ZIP, 7-Zip, libarchive and Windows Explorer
all read ZIP64. Picking ZIP32 "when small" would need the final offset in advance, which an
archive of unknown length does not have.
"""

import io
import stat
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from stream_zip import NO_COMPRESSION_64, ZIP_64, MemberFile, Method, stream_zip

from shared import checksums
from shared.errors import BunchError
from shared.storage import Storage

# Regular file, rw-r--r--: without S_IFREG some unzip tools restore entries with mode 0.
_FILE_MODE = stat.S_IFREG | 0o644

# stream-zip re-chunks its output to this size; matches Storage.iter_object's default chunk.
_ZIP_CHUNK_SIZE = 256 * 1024

# DOS timestamps cannot go below 1980, and stream-zip writes the Unix "UT" extra field as a
# signed 32-bit int, so anything past early 2038 would raise struct.error mid-upload.
_MIN_TIME = datetime(1980, 1, 1, tzinfo=UTC)
_MAX_TIME = datetime(2038, 1, 19, tzinfo=UTC)

_MAX_COMPONENT = 100
_MAX_COMPONENT_BYTES = 255  # ext4, APFS and NTFS limit a name to 255 bytes (UTF-8), not characters
_MAX_SUFFIX = 10  # keep short extensions like ".png" when truncating a long name


@dataclass(frozen=True, kw_only=True)
class ZipEntry:
    """One archive member, sourced from a storage object or from small in-memory bytes.

    keyword-only because `data` has a default but `modified_at` does not; forcing keywords also
    stops positional calls from silently swapping `object_key` and `data`.

    `size` and `crc32`, when the producer already knows them (e.g. computed while uploading the
    image), spare a stored entry the extra read described in `_stored_method`.
    """

    name: str
    object_key: str | None = None
    data: bytes | None = None
    modified_at: datetime
    compress: bool = False
    size: int | None = None
    crc32: int | None = None

    def __post_init__(self) -> None:
        if (self.object_key is None) == (self.data is None):
            raise ValueError(f"ZipEntry {self.name!r} needs exactly one of object_key or data")
        if (self.size is None) != (self.crc32 is None):
            raise ValueError(f"ZipEntry {self.name!r}: give size and crc32 together or neither")


class ZipAbandoned(Exception):
    """The writer was asked to stop (services/packager/shutdown.py) before the ZIP was complete."""


class _ChunkReader(io.RawIOBase):
    """Raw, read-only file over an iterator of byte chunks.

    Holds at most the unread remainder of one chunk; callers provide the destination buffer, so
    wrapping it in io.BufferedReader turns `read(part_size)` into a single allocation of exactly
    one part, which is what minio's read loop expects.
    """

    def __init__(self, chunks: Iterable[bytes], abandon: threading.Event | None = None) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._abandon = abandon
        self._pending = memoryview(b"")
        self._exhausted = False
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._abandon is not None and self._abandon.is_set():
            raise ZipAbandoned("the ZIP was abandoned: the packager is shutting down")
        target = memoryview(buffer).cast("B")
        filled = 0
        # Fill the whole buffer when possible: a short read makes BufferedReader call us again
        # anyway, and a full one keeps minio's `part_data += data` to a single concatenation.
        while filled < len(target):
            if not self._pending:
                if self._exhausted:
                    break
                try:
                    self._pending = memoryview(next(self._chunks))
                except StopIteration:
                    self._exhausted = True
                    break
                continue
            n = min(len(target) - filled, len(self._pending))
            target[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        self.bytes_read += filled
        return filled

    def close(self) -> None:
        # Closing the generator chain runs iter_object's `finally`, returning its HTTP connection
        # to the pool even when the upload aborted half way through an object.
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._pending = memoryview(b"")
        super().close()


def _zip_time(value: datetime) -> datetime:
    # Naive datetimes are taken as UTC so the DOS fields and the UT extra field agree.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return min(max(value, _MIN_TIME), _MAX_TIME)


def _object_checksum(storage: Storage, key: str) -> tuple[int, int]:
    size, crc = 0, 0
    for chunk in storage.iter_object(key):
        size += len(chunk)
        crc = checksums.crc32(chunk, crc)
    return size, crc


def _stored_method(storage: Storage, entry: ZipEntry) -> Method:
    """NO_COMPRESSION_64 with size and CRC known up front, so the member streams.

    stream-zip has no "stored + data descriptor" mode: bare NO_COMPRESSION_64 buffers the whole
    member in memory to learn its CRC before writing the local header. Reading the object once to
    checksum it and again to copy it costs a second GET but keeps memory flat; stream-zip verifies
    the CRC on the second pass, so an object that changed in between fails the upload instead of
    producing a corrupt archive.
    """
    if entry.size is not None and entry.crc32 is not None:
        return NO_COMPRESSION_64(entry.size, entry.crc32)
    if entry.data is not None:
        return NO_COMPRESSION_64(len(entry.data), checksums.crc32(entry.data))
    assert entry.object_key is not None
    return NO_COMPRESSION_64(*_object_checksum(storage, entry.object_key))


class ObjectMismatch(BunchError):
    """A member's object differs from the size and CRC-32 it was given; the archive was not written.

    Raised before stream-zip's own check, whose error does not say which member it was about. (A
    missing object raises minio's S3Error NoSuchKey, which names it in `object_name`.)"""

    def __init__(self, object_key: str, message: str) -> None:
        super().__init__(f"{object_key}: {message}")
        self.object_key = object_key
        self.detail = message


def _checked(chunks: Iterable[bytes], key: str, size: int, crc32: int) -> Iterator[bytes]:
    seen, crc = 0, 0
    try:
        for chunk in chunks:
            seen += len(chunk)
            crc = checksums.crc32(chunk, crc)
            if seen > size:  # stop at once: an object far larger than claimed is not copied whole first
                raise ObjectMismatch(key, f"the stored image has more than the {size} bytes recorded")
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # now, not at garbage collection: a half-read connection is dropped at once
    if seen != size:
        raise ObjectMismatch(key, f"the stored image has {seen} bytes, {size} were recorded")
    if crc != crc32:
        raise ObjectMismatch(key, f"the stored image has CRC-32 {crc:08x}, {crc32:08x} was recorded")


def _members(storage: Storage, entries: Iterable[ZipEntry]) -> Iterator[MemberFile]:
    for entry in entries:
        chunks: Iterable[bytes]
        if entry.data is not None:
            chunks = (entry.data,)
        else:
            assert entry.object_key is not None
            chunks = storage.iter_object(entry.object_key)
            if entry.size is not None and entry.crc32 is not None:
                chunks = _checked(chunks, entry.object_key, entry.size, entry.crc32)
        method = ZIP_64 if entry.compress else _stored_method(storage, entry)
        yield entry.name, _zip_time(entry.modified_at), _FILE_MODE, method, chunks


def write_zip(
    storage: Storage, key: str, entries: Iterable[ZipEntry], part_size: int, abandon: threading.Event | None = None
) -> int:
    """Write `entries` as a ZIP to `key` and return the archive size in bytes. Blocking.

    Once `abandon` is set the writer stops at its next read (one part at most later) with
    ZipAbandoned, and minio aborts the multipart upload.

    Peak memory is about what minio needs for one multipart part (it briefly holds ~3 copies while
    splicing parts) plus a few chunks, independent of archive size. `entries` is consumed lazily.
    On failure minio aborts the multipart upload, so no partial object is left at `key`.
    """
    zipped = stream_zip(_members(storage, entries), chunk_size=_ZIP_CHUNK_SIZE)
    raw = _ChunkReader(zipped, abandon)
    # buffer_size only matters for small reads; minio's part-sized reads bypass the buffer.
    with io.BufferedReader(raw, buffer_size=io.DEFAULT_BUFFER_SIZE) as reader:
        stored = storage.put_stream(key, reader, part_size, "application/zip")
    if stored != raw.bytes_read:
        raise RuntimeError(f"{key}: storage reports {stored} bytes but {raw.bytes_read} were written")
    return stored


_WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)})
# Separators, characters Windows refuses in file names, and bidi overrides that can disguise an
# extension ("gnp.exe" shown as "exe.png").
_REPLACED = frozenset('/\\<>:"|?*') | frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _safe_component(part: str) -> str:
    text = unicodedata.normalize("NFC", part)
    text = "".join("_" if ch in _REPLACED or unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)
    # Leading/trailing dots and spaces: "." and ".." traverse, Windows silently drops trailing
    # ones, and leading ones hide the entry on Unix extractors.
    text = text.strip(" .")
    if len(text) > _MAX_COMPONENT:
        stem, dot, suffix = text.rpartition(".")
        if dot and stem and 0 < len(suffix) <= _MAX_SUFFIX:
            keep = _MAX_COMPONENT - len(suffix) - 1
            text = f"{stem[:keep].rstrip(' .')}.{suffix}"
        else:
            text = text[:_MAX_COMPONENT].rstrip(" .")
    if not text:
        return "_"
    if text.split(".", 1)[0].upper() in _WINDOWS_RESERVED:
        text = f"_{text}"[:_MAX_COMPONENT]
    return truncate_utf8(text, _MAX_COMPONENT_BYTES)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """At most `max_bytes` of UTF-8, cut between characters, never inside one."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode(errors="ignore").rstrip(" .") or "_"


def safe_zip_path(*parts: str) -> str:
    """Join arbitrary names into a relative ZIP path, one component per argument.

    Slashes inside a part are replaced rather than honoured, so a group named "a/b" stays one
    directory and no input can climb out of the extraction directory. Distinct inputs may map to
    the same path ("a/b" and "a_b"); callers that need uniqueness must deduplicate.
    """
    if not parts:
        return "_"
    return "/".join(_safe_component(part) for part in parts)
