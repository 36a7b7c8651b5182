"""A request read whole before its route runs: its fingerprint, and its body to replay to the route.

Two sendings of the same request must have the same fingerprint, though a client that sends it
again writes its bytes anew: a JSON body is compared by its content (key order and spacing aside),
a multipart body by its parts (every multipart sending has a new random boundary). The body is
kept in memory up to SPOOL_MEMORY_BYTES and on disk beyond, so an upload of any size costs the
same memory; BodyLimitMiddleware bounds how much arrives at all.
"""

import hashlib
import json
import tempfile
from typing import IO, Any

import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.types import Message, Receive, Scope

SPOOL_MEMORY_BYTES = 1024 * 1024
REPLAY_CHUNK_BYTES = 64 * 1024


class _PartsDigest:
    """Feeds a multipart body through python-multipart's streaming parser, hashing each part's
    headers and content and never the boundary. The parser hands a part's content over in pieces
    cut wherever the network cut the body: the content is hashed as one stream and closed with its
    length, so the same parts give the same digest however they arrived."""

    def __init__(self, digest: Any, boundary: bytes) -> None:
        self.digest = digest
        # The header being read, name and value (the parser bounds their size).
        self.name, self.value = bytearray(), bytearray()
        self.part_bytes = 0

        def name_piece(data: bytes, start: int, end: int) -> None:
            self.name += data[start:end]

        def value_piece(data: bytes, start: int, end: int) -> None:
            self.value += data[start:end]

        def header_end() -> None:
            for text in (self.name, self.value):
                self.digest.update(len(text).to_bytes(4, "big") + bytes(text))
                text.clear()

        def part_data(data: bytes, start: int, end: int) -> None:
            piece = data[start:end]
            self.part_bytes += len(piece)
            self.digest.update(piece)

        def part_end() -> None:
            self.digest.update(b"E" + self.part_bytes.to_bytes(8, "big"))
            self.part_bytes = 0

        callbacks: Any = {
            "on_part_begin": lambda: self.digest.update(b"P"),
            "on_header_field": name_piece,
            "on_header_value": value_piece,
            "on_header_end": header_end,
            "on_headers_finished": lambda: self.digest.update(b"B"),
            "on_part_data": part_data,
            "on_part_end": part_end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def update(self, chunk: bytes) -> None:
        self.parser.write(chunk)


def _media_type(scope: Scope) -> tuple[bytes, dict[bytes, bytes]]:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media_type, options = parse_options_header(value)
            return media_type.lower(), options
    return b"", {}


def _canonical_json(body: bytes) -> bytes | None:
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return None


class ReadRequest:
    """A request's body, read once from the client and replayed to the route as it arrived."""

    def __init__(self, fingerprint: str, spool: IO[bytes], size: int, receive: Receive) -> None:
        self.fingerprint = fingerprint
        self._spool = spool
        self._size = size
        self._client_receive = receive
        self._replayed = False

    @classmethod
    async def read(cls, request: Request) -> "ReadRequest":
        # Through request.stream(): a route class that looked at the body first (services/gateway/
        # document_style.py) left it in the request, no longer in `receive`.
        scope = request.scope
        head = hashlib.sha256()
        for part in (scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1")):
            head.update(part.encode() + b"\n")
        media_type, options = _media_type(scope)
        body_digest = hashlib.sha256()
        parts = (
            _PartsDigest(body_digest, options[b"boundary"])
            if media_type == b"multipart/form-data" and options.get(b"boundary")
            else None
        )
        is_json = media_type in (b"", b"application/json") or media_type.endswith(b"+json")
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        try:
            async for chunk in request.stream():
                if chunk:
                    (parts or body_digest).update(chunk)
                    await _write(spool, chunk)
            size = spool.tell()
            spool.seek(0)
            canonical = _canonical_json(await _read_all(spool)) if is_json else None
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        head.update(hashlib.sha256(canonical).digest() if canonical is not None else body_digest.digest())
        return cls(head.hexdigest(), spool, size, request.receive)

    async def receive(self) -> Message:
        """The route's `receive`: the body, then whatever the client sends next (a disconnect)."""
        if self._replayed:
            return await self._client_receive()
        chunk = await _read(self._spool, REPLAY_CHUNK_BYTES)
        more = bool(chunk) and self._spool.tell() < self._size
        if not more:
            self._replayed = True
            self._spool.close()
        return {"type": "http.request", "body": chunk, "more_body": more}

    def close(self) -> None:
        self._spool.close()


def _on_disk(spool: IO[bytes]) -> bool:
    # SpooledTemporaryFile says so only privately (Starlette's UploadFile reads the same attribute).
    return bool(getattr(spool, "_rolled", False))


async def _write(spool: IO[bytes], chunk: bytes) -> None:
    # Once on disk, a write may block on the disk: off the event loop, as Starlette's UploadFile does.
    if _on_disk(spool):
        await anyio.to_thread.run_sync(spool.write, chunk)
    else:
        spool.write(chunk)


async def _read(spool: IO[bytes], size: int) -> bytes:
    return await anyio.to_thread.run_sync(spool.read, size) if _on_disk(spool) else spool.read(size)


async def _read_all(spool: IO[bytes]) -> bytes:
    """A JSON body, which BodyLimitMiddleware keeps to a few MiB."""
    return await anyio.to_thread.run_sync(spool.read) if _on_disk(spool) else spool.read()
