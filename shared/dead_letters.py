"""Look at and re-drive the messages that failed too many deliveries (keys.DEAD_LETTERS_STREAM).

A message lands there after its handler failed `max_deliveries` times, typically while a
dependency was down for long or a bug was hit. Once the cause is fixed, `redrive` puts it back on
the stream it came from; handlers are idempotent, so re-driving a message twice is harmless.

    python -m shared.dead_letters list [--count N]
    python -m shared.dead_letters redrive [ID ...]     # no ID: every dead letter
"""

import argparse
import asyncio
import json
import sys

from pydantic import BaseModel
from redis.asyncio import Redis

from shared import keys
from shared.redis_connection import connect
from shared.settings import get_settings

# Only the streams a consumer group reads can hold poison; nothing else is re-driven to.
_REDRIVABLE = frozenset(stream for stream, _group in keys.CONSUMED_STREAMS)


class DeadLetter(BaseModel):
    id: str
    stream: str
    fields: dict[str, str]


async def list_dead_letters(redis: Redis, count: int = 100) -> list[DeadLetter]:
    entries = await redis.xrange(keys.DEAD_LETTERS_STREAM, count=count)
    return [_parse(entry_id, fields) for entry_id, fields in entries]


async def redrive(redis: Redis, ids: list[str] | None = None) -> list[DeadLetter]:
    """Move dead letters (all, or those named) back to their streams; returns what was moved."""
    if ids:
        entries = [
            entry for entry_id in ids for entry in await redis.xrange(keys.DEAD_LETTERS_STREAM, entry_id, entry_id)
        ]
    else:
        entries = await redis.xrange(keys.DEAD_LETTERS_STREAM)
    moved = []
    for entry_id, fields in entries:
        letter = _parse(entry_id, fields)
        if letter.stream not in _REDRIVABLE:
            raise ValueError(f"dead letter {letter.id} names {letter.stream!r}, not a stream Bunch consumes")
        # One transaction: re-driven and removed together, never both or neither after a crash.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(letter.stream, letter.fields)
            pipe.xdel(keys.DEAD_LETTERS_STREAM, letter.id)
            await pipe.execute()
        moved.append(letter)
    return moved


def _parse(entry_id: str, fields: dict[str, str]) -> DeadLetter:
    rest = dict(fields)
    stream = rest.pop("stream", "")
    return DeadLetter(id=entry_id, stream=stream, fields=rest)


async def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.dead_letters", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print dead letters as JSON lines")
    listing.add_argument("--count", type=int, default=100)
    again = commands.add_parser("redrive", help="put dead letters back on their streams")
    again.add_argument("ids", nargs="*", help="dead-letter ids; none means all")
    args = parser.parse_args(argv)

    redis = connect(get_settings())
    try:
        if args.command == "list":
            letters = await list_dead_letters(redis, args.count)
        else:
            letters = await redrive(redis, args.ids)
    finally:
        await redis.aclose()
    for letter in letters:
        print(json.dumps(letter.model_dump()))
    if args.command == "redrive":
        print(f"re-drove {len(letters)} dead letters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main(sys.argv[1:])))
