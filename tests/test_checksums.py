"""shared/checksums.crc32 is zlib's CRC-32: what the worker records with zlib compares equal."""

import random
import zlib

from shared import checksums


def test_the_crc32_is_zlibs_whole_and_chained() -> None:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    assert checksums.crc32(data) == zlib.crc32(data)
    chained = 0
    for start in range(0, len(data), 65_536):
        chained = checksums.crc32(data[start : start + 65_536], chained)
    assert chained == zlib.crc32(data)
    assert checksums.crc32(b"") == 0 and checksums.crc32(b"bunch") == zlib.crc32(b"bunch")
