"""The ids Bunch hands out (jobs, groups, uploads, datasets, downloads: `uuid.uuid4().hex`).

A caller's id is checked against this pattern before it names a Redis key: one that could not be
ours (a `:`, a wildcard, another length) is answered like an unknown id, and never reaches Redis,
where `<id>:inputs` would name another key of another type (WRONGTYPE, a 500, and an oracle for
ids of other projects).
"""

import re
from typing import Annotated

from pydantic import StringConstraints

ID_PATTERN = r"^[0-9a-f]{32}$"
_ID = re.compile(r"[0-9a-f]{32}")  # fullmatch: `$` would let a trailing newline through

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


def is_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None
