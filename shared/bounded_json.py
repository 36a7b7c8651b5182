"""JSON parsing with a nesting limit, checked before the parser recurses.

Python's parser recurses once per level: a body of 100,000 `[` raises RecursionError (not a
ValueError, so a 500 where a 400 was due), and anything shallower is built in full before a model
can refuse it. No Bunch body nests deeper than a handful of levels.
"""

import json
import re
from array import array
from itertools import accumulate
from typing import Any

MAX_DEPTH = 32
# A JSON string: its brackets are text, not nesting.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: no backtracking per character
# Brackets to +1/-1 (as signed bytes), everything else deleted: both steps run in C.
_OPEN, _CLOSE = b"[{", b"]}"
_TO_STEPS = bytes.maketrans(_OPEN + _CLOSE, b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(set(range(256)) - set(_OPEN + _CLOSE))


class TooDeep(ValueError):
    def __init__(self, max_depth: int) -> None:
        super().__init__(f"JSON nested deeper than {max_depth} levels")
        self.max_depth = max_depth


def depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in `raw` (0 for a scalar)."""
    brackets = _STRING.sub(b"", raw).translate(_TO_STEPS, _NOT_BRACKETS)
    return max(accumulate(array("b", brackets)), default=0)


def loads(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads that raises TooDeep (a ValueError) past `max_depth` levels, before parsing."""
    data = raw.encode() if isinstance(raw, str) else raw
    if depth(data) > max_depth:
        raise TooDeep(max_depth)
    return json.loads(data)
