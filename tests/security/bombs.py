"""The most expensive datasets an attacker can send for their size, to test that accepting one costs
the gateway no more than its real content allows (tests/security/test_dataset_costs.py and the
noisy-neighbour tests import these builders).

The images are built by hand, not with Pillow: a 40-megapixel PNG takes Pillow about a second to
encode, while the zlib state of its identical rows can be computed once and copied for each variant.
"""

import binascii
import io
import struct
import zlib
from collections.abc import Callable
from functools import cache

MEGAPIXEL = 1_000_000
MAX_PIXELS = 40 * MEGAPIXEL  # the default BUNCH_MAX_UPLOAD_PIXELS: the most one image may have
MAX_WIDTH, MAX_HEIGHT = 8000, 5000  # MAX_PIXELS: 120 MB of RGB, 160 MB in Pillow (4 bytes a pixel)

_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, without name and extra
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory record, without name, extra and comment
_END = struct.Struct("<4s4H2LH")  # end of central directory record
_DEFLATED, _STORED = 8, 0
_ROWS_PER_CHUNK = 200


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", binascii.crc32(kind + data))


@cache
def _flat_rows(width: int, height: int) -> tuple[bytes, "zlib._Compress"]:
    """The zlib output and state after every row but the last of a black RGB image (the state is
    copied for each variant, never used itself)."""
    rows = zlib.compressobj(9)
    block = (b"\x00" + bytes(3 * width)) * _ROWS_PER_CHUNK
    parts, done = [], 0
    while done < height - 1:
        count = min(_ROWS_PER_CHUNK, height - 1 - done)
        parts.append(rows.compress(block[: count * (1 + 3 * width)]))
        done += count
    return b"".join(parts), rows


def flat_png(width: int = MAX_WIDTH, height: int = MAX_HEIGHT, variant: int = 0) -> bytes:
    """A black RGB PNG whose last row carries `variant`, so each variant is a distinct image (another
    hash, another CRC). Attacks the cost of decoding: 40 megapixels (120 MB of pixels to inflate,
    unfilter and check) for about 117 KB of PNG, and about 500 bytes once deflated again in a ZIP."""
    prefix, rows = _flat_rows(width, height)
    state = rows.copy()
    last = bytearray(3 * width)
    last[:8] = variant.to_bytes(8, "big")
    idat = prefix + state.compress(b"\x00" + bytes(last)) + state.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def max_pixel_pngs(count: int, first_variant: int = 0) -> list[bytes]:
    """`count` distinct PNGs of MAX_PIXELS each (`flat_png`)."""
    return [flat_png(variant=first_variant + n) for n in range(count)]


def _local_header(name: bytes, method: int, crc: int, compressed: int, size: int) -> bytes:
    return _LOCAL.pack(b"PK\x03\x04", 20, 0, method, 0, 0, crc, compressed, size, len(name), 0) + name


def _central_record(name: bytes, method: int, crc: int, compressed: int, size: int, offset: int) -> bytes:
    mode = 0o100644 << 16  # a regular file (Unix mode bits): not a link, not a folder
    return (
        _CENTRAL.pack(
            b"PK\x01\x02", 0x0314, 20, 0, method, 0, 0, crc, compressed, size, len(name), 0, 0, 0, 0, mode, offset
        )
        + name
    )


def _end_record(entries: int, directory: bytes, directory_offset: int) -> bytes:
    return _END.pack(b"PK\x05\x06", 0, 0, entries, entries, len(directory), directory_offset, 0)


def _deflate_raw(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    return deflater.compress(data) + deflater.flush()


def overlapping_entries_zip(image: bytes, entries: int, name: str = "a.png") -> bytes:
    """One image (deflated) and `entries` central-directory records that all point at it (the same local
    header offset, name, sizes and CRC). Attacks per-entry work: the archive holds one image's bytes
    but lists it `entries` times, so reading, decoding or storing per entry multiplies the cost.
    zipfile reads an entry only when the name in its local header matches, hence one name for all.
    With a 40-megapixel flat PNG and 150 entries it is about 8 KB; with a large image that does not
    compress, reading each record costs as much as reading the image."""
    raw_name = name.encode()
    data = _deflate_raw(image)
    crc = binascii.crc32(image)
    local = _local_header(raw_name, _DEFLATED, crc, len(data), len(image)) + data
    directory = _central_record(raw_name, _DEFLATED, crc, len(data), len(image), 0) * entries
    return local + directory + _end_record(entries, directory, len(local))


def _crc_after(kernel: bytes) -> Callable[[int], int]:
    """crc32(prefix + kernel) from crc32(prefix), without reading the kernel again: a CRC is affine
    in its start value, so 33 CRCs of the kernel give it for any start."""
    base = zlib.crc32(kernel)
    columns = [zlib.crc32(kernel, 1 << bit) ^ base for bit in range(32)]

    def crc(prefix_crc: int) -> int:
        value = base
        for bit in range(32):
            if prefix_crc >> bit & 1:
                value ^= columns[bit]
        return value

    return crc


def _stored_block(length: int) -> bytes:
    return struct.pack("<BHH", 0, length, 0xFFFF ^ length)  # a non-final deflate block of `length` stored bytes


def overlapping_files_zip(entries: int, kernel: bytes, suffix: str = ".png") -> bytes:
    """David Fifield's "better zip bomb" (https://www.bamsoftware.com/hacks/zipbomb/): every entry's
    deflate stream starts with a stored block quoting the next entry's local header, then runs on
    into that entry's data, so all of them share one compressed kernel. Attacks checks that add up
    each entry's compressed size: entry i counts the bytes of entries i+1... again, the sum grows with
    entries², and the archive seems to compress far less than it does. Entry i unpacks to
    `entries - 1 - i` local headers followed by `kernel`. 2,000 entries of a 1 MB kernel of zeros:
    200 KB that unpack to 2 GB, and seem to compress 23:1."""
    names = [f"{n:05d}{suffix}".encode() for n in range(entries)]
    kernel_data = _deflate_raw(kernel)
    crc_after = _crc_after(kernel)
    # Built from the last entry back: each entry's content, and so its CRC, holds the later headers.
    headers: list[bytes] = []
    records: list[tuple[int, int, int]] = []  # CRC, compressed size, size
    quoted, compressed = b"", len(kernel_data)
    for n in range(entries - 1, -1, -1):
        crc, size = crc_after(zlib.crc32(quoted)), len(quoted) + len(kernel)
        header = _local_header(names[n], _DEFLATED, crc, compressed, size)
        headers.append(header)
        records.append((crc, compressed, size))
        quoted = header + quoted
        compressed += len(_stored_block(0)) + len(header)
    headers.reverse()
    records.reverse()
    out = io.BytesIO()
    directory = []
    for n in range(entries):
        directory.append(_central_record(names[n], _DEFLATED, *records[n], out.tell()))
        out.write(headers[n])
        if n < entries - 1:
            out.write(_stored_block(len(headers[n + 1])))
    out.write(kernel_data)
    start = out.tell()
    return out.getvalue() + b"".join(directory) + _end_record(entries, b"".join(directory), start)


def _zip_of(files: list[tuple[str, bytes]], method: int) -> bytes:
    out = io.BytesIO()
    records = []
    for name, content in files:
        raw_name = name.encode()
        data = _deflate_raw(content) if method == _DEFLATED else content
        crc = binascii.crc32(content)
        records.append(_central_record(raw_name, method, crc, len(data), len(content), out.tell()))
        out.write(_local_header(raw_name, method, crc, len(data), len(content)) + data)
    directory = b"".join(records)
    start = out.tell()
    return out.getvalue() + directory + _end_record(len(files), directory, start)


def copies_zip(image: bytes, copies: int) -> bytes:
    """`copies` well-formed entries with the same content (same CRC and size), each its own bytes.
    Attacks dropping duplicates only after decoding: every copy would be decoded and stored, although
    the archive grows by only a deflated copy (about 500 bytes for a 40-megapixel flat PNG) per entry."""
    return _zip_of([(f"copy{n:04d}.png", image) for n in range(copies)], _DEFLATED)


def distinct_images_zip(images: list[bytes], stored: bool = False) -> bytes:
    """Each image its own entry (deflated, or stored to keep every per-entry ratio at 1:1). With
    `max_pixel_pngs` it is the worst honest-looking dataset: every entry is a distinct, valid image
    at the pixel limit, so nothing but a budget on the decoding bounds its cost (about 500 bytes of
    ZIP, or 117 KB stored, per 40 megapixels)."""
    return _zip_of([(f"img{n:04d}.png", data) for n, data in enumerate(images)], _STORED if stored else _DEFLATED)
