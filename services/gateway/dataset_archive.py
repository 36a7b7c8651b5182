"""Judging a dataset ZIP from its central directory, before any entry is read.

Every entry is judged on what the directory says: path tricks, links, encryption, nested archives,
sizes, compression ratio. Entries are located too. Records that share a local header are one file:
the later ones are copies of the first, never read. Entries whose bytes overlap otherwise are the
"overlapping files" ZIP bomb (https://www.bamsoftware.com/hacks/zipbomb/: each entry's data runs on
into the next one's, so one small kernel unpacks once per entry), and the archive is refused. So
the ratio checks add up real bytes: each compressed byte counts once.
"""

import re
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from shared.errors import Invalid, TooLarge
from shared.settings import Settings

MIB = 1024 * 1024
# A small entry may legitimately compress very well (a flat-colour PNG); a large one that does is a bomb.
BOMB_RATIO = 100
BOMB_MIN_BYTES = 1 * MIB
# The same for the archive as a whole: many small entries of zeros are a ZIP bomb too. Images
# barely compress in a ZIP (PNG, JPEG and WEBP are compressed already), so a real dataset is far
# from this ratio.
ARCHIVE_BOMB_MIN_BYTES = 64 * MIB
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".jar", ".cbz")
# Files operating systems add to archives on their own: skipped, not reported as rejected.
_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then the name and extra field lengths
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True, slots=True)
class Entry:
    """One file of the upload: how to read its bytes, or why it was refused before they were read."""

    name: str
    read: Callable[[], bytes] | None = None  # blocking: runs in a thread
    reason: str | None = None
    same_as: int | None = None  # position of an earlier entry with these very bytes: nothing to read


def _is_junk(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.lower() in _JUNK_NAMES or base.startswith("._")


def _path_problem(name: str) -> str | None:
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path"
    if ".." in name.split("/"):
        return "path leaves the archive (..)"
    return None


def _entry_problem(info: zipfile.ZipInfo, max_bytes: int) -> str | None:
    """Why this entry is refused without reading it, or None."""
    name = info.filename.replace("\\", "/")
    if problem := _path_problem(name):
        return problem
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted entry"
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return "nested archive (archives inside the ZIP are not unpacked)"
    if info.file_size > max_bytes:
        return f"the file is larger than {max_bytes // MIB} MB"
    if info.file_size > BOMB_MIN_BYTES and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
        return "suspicious compression ratio (possible ZIP bomb)"
    return None


def _is_skipped(info: zipfile.ZipInfo) -> bool:
    return info.is_dir() or _is_junk(info.filename.replace("\\", "/"))


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    # zipfile stops at the declared size and checks the CRC, so a lying header cannot make this
    # read more than `limit` bytes.
    with archive.open(info) as member:
        return member.read(limit + 1)


def _declared_entries(file: IO[bytes]) -> int | None:
    """The entry count from the end-of-central-directory record, read before zipfile loads the
    directory (a ZIP of millions of empty entries would cost gigabytes as ZipInfo objects).
    None when unknown: not a ZIP (zipfile then says why), or a Python without this helper."""
    end_record_data = getattr(zipfile, "_EndRecData", None)
    if end_record_data is None:
        return None
    end_record: Any = end_record_data(file)
    file.seek(0)
    return None if end_record is None else int(end_record[getattr(zipfile, "_ECD_ENTRIES_TOTAL", 4)])


def open_archive(file: IO[bytes], settings: Settings) -> zipfile.ZipFile:
    """Blocking. The archive after the checks that refuse it as a whole."""
    declared = _declared_entries(file)
    if declared is not None and declared > settings.max_dataset_entries:
        raise TooLarge(f"The archive has {declared} entries; at most {settings.max_dataset_entries}.")
    try:
        return zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Invalid(f"The file is not a readable ZIP archive ({exc}).") from None


def open_entries(file: IO[bytes], settings: Settings) -> tuple[zipfile.ZipFile, list[Entry]]:
    """Blocking. The archive (to close once its entries have been read) and its entries."""
    archive = open_archive(file, settings)
    try:
        return archive, zip_entries(archive, file, settings)
    except BaseException:
        archive.close()
        raise


def _data_end(file: IO[bytes], info: zipfile.ZipInfo) -> int | None:
    """Where the entry's compressed data ends, from its own local header (whose name and extra
    field may be longer than the directory says); None if there is no local header there."""
    file.seek(info.header_offset)
    header = file.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        return None
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_SIGNATURE:
        return None
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size


def _overlap(first: str, second: str) -> TooLarge:
    return TooLarge(
        f"The archive's entries {first!r} and {second!r} share bytes: refused as a possible ZIP bomb "
        "(overlapping entries unpack the same data many times).",
    )


def _same_file(a: zipfile.ZipInfo, b: zipfile.ZipInfo) -> bool:
    def what(info: zipfile.ZipInfo) -> tuple[int, int, int, int]:
        return info.compress_type, info.compress_size, info.file_size, info.CRC

    return what(a) == what(b)


def _check_layout(archive: zipfile.ZipFile, file: IO[bytes], located: list[zipfile.ZipInfo]) -> None:
    """Refuses the archive if two entries' bytes overlap, or one runs into the central directory."""
    spans = sorted((info.header_offset, end, info.filename) for info in located if (end := _data_end(file, info)))
    file.seek(0)
    previous_end, previous_name = 0, ""
    for start, end, name in spans:
        if start < previous_end:
            raise _overlap(previous_name, name)
        previous_end, previous_name = end, name
    directory = getattr(archive, "start_dir", None)
    if spans and isinstance(directory, int) and previous_end > directory:
        raise _overlap(previous_name, "the central directory")


def zip_entries(archive: zipfile.ZipFile, file: IO[bytes], settings: Settings) -> list[Entry]:
    """Blocking. Every entry to report on, in archive order, without reading any of them."""
    entries: list[Entry] = []
    first_at: dict[int, tuple[int, zipfile.ZipInfo]] = {}  # header offset -> the first entry there
    candidates, total, compressed = 0, 0, 0
    for info in archive.infolist():
        if _is_skipped(info):
            continue
        if reason := _entry_problem(info, settings.max_upload_bytes):
            entries.append(Entry(info.filename, reason=reason))
            continue
        candidates += 1
        if first := first_at.get(info.header_offset):
            position, original = first
            if not _same_file(info, original):
                raise _overlap(original.filename, info.filename)
            entries.append(Entry(info.filename, same_as=position))
            continue
        first_at[info.header_offset] = (len(entries), info)
        total += info.file_size
        compressed += info.compress_size

        def read(info: zipfile.ZipInfo = info) -> bytes:
            return _read_entry(archive, info, settings.max_upload_bytes)

        entries.append(Entry(info.filename, read=read))
    if candidates > settings.max_inputs_per_job:
        raise TooLarge(f"The archive has {candidates} files; a dataset holds at most {settings.max_inputs_per_job}.")
    _check_layout(archive, file, [info for _, info in first_at.values()])
    if total > settings.max_dataset_bytes:
        raise TooLarge(
            f"The archive unpacks to {total // MIB} MB; at most {settings.max_dataset_bytes // MIB} MB per dataset.",
        )
    if total > ARCHIVE_BOMB_MIN_BYTES and total > BOMB_RATIO * max(compressed, 1):
        raise TooLarge(
            f"The archive unpacks to {total // MIB} MB from {max(compressed // 1024, 1)} KB, more than "
            f"{BOMB_RATIO}:1: refused as a possible ZIP bomb (images barely compress in a ZIP).",
        )
    return entries
