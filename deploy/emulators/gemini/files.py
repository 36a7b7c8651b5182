"""The Files API: resumable upload, get, list, delete and download, as google-genai 3.6.1 calls them.

Wire format (google/genai/files.py and _api_client.py; REST reference https://ai.google.dev/api/files):
- upload, step 1: POST /upload/{version}/files with X-Goog-Upload-Protocol: resumable,
  X-Goog-Upload-Command: start, X-Goog-Upload-Header-Content-Length / -Content-Type and the body
  {"file": {"display_name", "mime_type", "size_bytes", "name"?}} (the SDK sends snake_case). The answer has
  no body; its X-Goog-Upload-URL header is where the bytes go (`_create`, `upload`).
- upload, step 2: POST <upload URL> with X-Goog-Upload-Command "upload" (more to come) or
  "upload, finalize" (the last piece) and X-Goog-Upload-Offset, in 8 MB pieces (`_async_upload_fd`,
  CHUNK_SIZE). The SDK sends no API key with them: the upload URL's upload_id is the credential. Every
  answer carries X-Goog-Upload-Status ("active" until the last, then "final"); without it the SDK retries
  the piece with backoff, so refusals carry "final" too. The last answer's body is {"file": File}.
- get GET /{version}/files/{id}; list GET /{version}/files?pageSize&pageToken ({"files", "nextPageToken"};
  page size 10 by default, at most 100: REST reference); delete DELETE /{version}/files/{id} ({}).
- download: GET /{version}/files/{id}:download?alt=media, which is what `client.aio.files.download` requests
  (files.py `download`: path 'files/{name}:download', alt=media, resolved by `_build_request` under the
  API version), and /download/{version}/files/{id}:download?alt=media, the `downloadUri` form. Only
  generated files (a batch's results) download; uploaded ones are refused, as the SDK's own check says.

Files live on disk (a folder of the app's), so a 2 GB upload or a batch's results are never held whole in
memory; a download is streamed in pieces. Uploaded files expire `file_ttl_seconds` after their upload
(48 h by default: "Files are stored for 48 hours"); then they answer like files that never existed: 403
PERMISSION_DENIED "You do not have permission to access the File … or it may not exist." (files.get and a
fileData part alike). Generated files (batch results) stay until deleted or reset.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import secrets
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from aiohttp import web

from deploy.emulators.gemini import catalog, errors, responses
from deploy.emulators.gemini.access import api_endpoint, read_body
from deploy.emulators.gemini.request import check_fields, pick
from deploy.emulators.gemini.state import EmulatorState

# File.name: "files/" + up to 40 lowercase alphanumerics or dashes, not starting or ending with a dash
# (types.File.name).
FILE_ID: Final = r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?"
FILE_NAME: Final = re.compile(rf"files/({FILE_ID})")
# A fileData URI as this emulator hands it out (File.uri), under any host name it is reached by.
FILE_URI: Final = re.compile(rf"https?://[^/?#]+/(?:v1|v1beta)/files/({FILE_ID})")
FILE_FIELDS: Final = (
    "name", "displayName", "mimeType", "sizeBytes", "createTime", "updateTime", "expirationTime", "sha256Hash",
    "uri", "downloadUri", "state", "source", "error", "videoMetadata",
)  # fmt: skip
MAX_DISPLAY_NAME: Final = 512
# What the upload answers as its granularity; google-genai sends 8 MB pieces anyway.
UPLOAD_GRANULARITY: Final = 8 * 1024 * 1024
MAX_START_BODY: Final = 64 * 1024
DEFAULT_PAGE_SIZE: Final = 10
MAX_PAGE_SIZE: Final = 100
READ_PIECE: Final = 1024 * 1024
DOWNLOAD_PIECE: Final = 256 * 1024
RESULTS_MIME_TYPE: Final = "application/jsonl"
ID_ALPHABET: Final = string.ascii_lowercase + string.digits
Source = Literal["UPLOADED", "GENERATED"]


def new_id(length: int = 12) -> str:
    """Real file ids look like "85nave4ld71j": 12 lowercase alphanumerics."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(length))


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


@dataclass
class StoredFile:
    file_id: str
    mime_type: str
    size: int
    path: Path
    sha256: bytes
    source: Source
    created: float
    # None: kept until deleted (generated files).
    expires: float | None
    display_name: str | None
    # Creation order, for newest-first listing and stable page tokens.
    seq: int

    def alive(self, now: float) -> bool:
        return self.expires is None or now < self.expires

    def resource(self, base: str, version: str) -> dict[str, Any]:
        """The File resource (REST reference; types.File): int64 sizeBytes as a string, zero fields left out."""
        body: dict[str, Any] = {"name": f"files/{self.file_id}"}
        if self.display_name:
            body["displayName"] = self.display_name
        body.update({
            "mimeType": self.mime_type,
            "sizeBytes": str(self.size),
            "createTime": responses.timestamp(self.created),
            "updateTime": responses.timestamp(self.created),
        })  # fmt: skip
        if self.expires is not None:
            body["expirationTime"] = responses.timestamp(self.expires)
        body["sha256Hash"] = base64.b64encode(self.sha256).decode()
        body["uri"] = f"{base}/{version}/files/{self.file_id}"
        if self.source == "GENERATED":
            body["downloadUri"] = f"{base}/download/{version}/files/{self.file_id}:download?alt=media"
        body.update({"state": "ACTIVE", "source": self.source})
        return body


@dataclass
class UploadSession:
    file_id: str
    mime_type: str
    size: int
    display_name: str | None
    path: Path
    received: int = 0
    # One piece at a time: a second concurrent piece would race for the offset.
    busy: bool = field(default=False)


def _write_at(path: Path, offset: int, data: bytes) -> None:
    """`data` at `offset`, cutting anything after it: a piece whose caller went away half-way through
    leaves no stray bytes for the next piece to land after."""
    with path.open("r+b" if path.exists() else "wb") as out:
        out.seek(offset)
        out.write(data)
        out.truncate()


def sha256_of(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while piece := data.read(READ_PIECE):
            digest.update(piece)
    return digest.digest()


class FileStore:
    """Every file and upload in progress, by id; their bytes under `root`."""

    def __init__(self, root: Path, state: EmulatorState) -> None:
        self.root = root
        self.state = state
        self.files: dict[str, StoredFile] = {}
        self.sessions: dict[str, UploadSession] = {}
        self._seq = 0

    # --- bookkeeping -------------------------------------------------------------------------------------

    def path_for(self, file_id: str) -> Path:
        return self.root / file_id

    def sweep(self, now: float | None = None) -> None:
        """Drop expired files, and their bytes."""
        now = time.time() if now is None else now
        for file_id in [f.file_id for f in self.files.values() if not f.alive(now)]:
            self.delete(file_id)

    def get(self, file_id: str) -> StoredFile | None:
        self.sweep()
        return self.files.get(file_id)

    def delete(self, file_id: str) -> bool:
        stored = self.files.pop(file_id, None)
        if stored is None:
            return False
        stored.path.unlink(missing_ok=True)
        return True

    def taken(self, file_id: str) -> bool:
        return file_id in self.files or any(s.file_id == file_id for s in self.sessions.values())

    def add(
        self, file_id: str, mime_type: str, size: int, sha256: bytes, source: Source, display_name: str | None
    ) -> StoredFile:
        # Whole microseconds, as the API reports them: createTime and expirationTime then differ by exactly the TTL.
        now = round(time.time(), 6)
        ttl = self.state.config.file_ttl_seconds
        self._seq += 1
        stored = StoredFile(
            file_id=file_id, mime_type=mime_type, size=size, path=self.path_for(file_id), sha256=sha256,
            source=source, created=now, expires=now + ttl if source == "UPLOADED" else None,
            display_name=display_name, seq=self._seq,
        )  # fmt: skip
        self.files[file_id] = stored
        return stored

    def reset(self) -> None:
        self.files.clear()
        self.sessions.clear()
        for child in self.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # --- fileData parts ----------------------------------------------------------------------------------

    def read_image(self, uri: str) -> tuple[str, bytes]:
        """A fileData part's file: its MIME type and bytes (request.FileResolver). Called from the threads
        that parse requests, so it only reads: an expired file is refused here and swept later."""
        match = FILE_URI.fullmatch(uri)
        if match is None:
            raise errors.invalid_argument(
                f"Invalid file URI: {uri}. Use the `uri` of a file uploaded with the Files API.", "file_data.file_uri"
            )
        stored = self.files.get(match.group(1))
        if stored is None or not stored.alive(time.time()):
            raise errors.file_not_accessible(match.group(1))
        try:
            return stored.mime_type, stored.path.read_bytes()
        except FileNotFoundError:  # deleted while this request was being read
            raise errors.file_not_accessible(match.group(1)) from None

    def open_input(self, name: str) -> StoredFile:
        """A batch's input file ("files/…"): it must exist and be JSONL."""
        match = FILE_NAME.fullmatch(name)
        stored = self.get(match.group(1)) if match else None
        if stored is None:
            raise errors.not_found(f"File {name}")
        if stored.mime_type.lower() not in catalog.JSONL_MIME_TYPES:
            raise errors.invalid_argument(
                f"The input file {name} has MIME type {stored.mime_type}; a batch's input file must be JSONL "
                f"(upload it with mime_type 'jsonl').",
                "batch.input_config.file_name",
            )
        return stored


FILES_KEY: web.AppKey[FileStore] = web.AppKey("files", FileStore)


# --- upload ----------------------------------------------------------------------------------------------


def _upload_error(error: errors.ApiError) -> errors.ApiError:
    """A refused upload piece ends the upload: "final", so google-genai stops and raises at once."""
    error.headers["X-Goog-Upload-Status"] = "final"
    return error


def _declared_size(request: web.Request) -> int:
    raw = request.headers.get("X-Goog-Upload-Header-Content-Length", "")
    if not raw.isdigit():
        raise errors.invalid_argument("X-Goog-Upload-Header-Content-Length must give the file's size in bytes.")
    size = int(raw)
    if size > catalog.MAX_FILE_BYTES:
        raise errors.invalid_argument(
            f"The file is {size} bytes; the Files API takes at most {catalog.MAX_FILE_BYTES} bytes (2 GB) per file."
        )
    return size


async def _start_upload(request: web.Request) -> web.StreamResponse:
    store = request.app[FILES_KEY]
    if request.headers.get("X-Goog-Upload-Protocol", "").lower() != "resumable":
        raise errors.invalid_argument(
            "Only the resumable upload protocol is supported here (X-Goog-Upload-Protocol: resumable)."
        )
    if request.headers.get("X-Goog-Upload-Command", "").strip().lower() != "start":
        raise errors.invalid_argument("A resumable upload begins with X-Goog-Upload-Command: start.")
    size = _declared_size(request)
    raw = await read_body(request, MAX_START_BODY)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.invalid_argument(f"Invalid JSON payload received. {exc}") from None
    check_fields(body, ("file",), "", "CreateFileRequest")
    meta = check_fields(pick(body, "file") or {}, FILE_FIELDS, "file", "File")

    if (declared := pick(meta, "sizeBytes")) is not None and str(declared) != str(size):
        raise errors.invalid_argument(
            f"file.size_bytes ({declared}) differs from X-Goog-Upload-Header-Content-Length ({size}).",
            "file.size_bytes",
        )
    mime_type = pick(meta, "mimeType") or request.headers.get("X-Goog-Upload-Header-Content-Type")
    if not isinstance(mime_type, str) or not mime_type.strip():
        raise errors.invalid_argument("The file's MIME type must be given (file.mime_type).", "file.mime_type")
    display_name = pick(meta, "displayName")
    if display_name is not None and (not isinstance(display_name, str) or len(display_name) > MAX_DISPLAY_NAME):
        raise errors.invalid_argument(
            f"file.display_name must be a string of at most {MAX_DISPLAY_NAME} characters.", "file.display_name"
        )
    name = pick(meta, "name")
    if name:
        match = FILE_NAME.fullmatch(str(name))
        if match is None:
            raise errors.invalid_argument(
                f'Invalid file name {name!r}: "files/" and up to 40 lowercase letters, digits or dashes, '
                "not starting or ending with a dash.",
                "file.name",
            )
        file_id = match.group(1)
        store.sweep()
        if store.taken(file_id):
            raise errors.already_exists(f"A file named files/{file_id} already exists.")
    else:
        file_id = new_id()
        while store.taken(file_id):
            file_id = new_id()

    upload_id = secrets.token_urlsafe(48)
    store.sessions[upload_id] = UploadSession(
        file_id=file_id, mime_type=mime_type.strip(), size=size, display_name=display_name,
        path=store.root / "uploads" / upload_id,
    )  # fmt: skip
    version = request.match_info["version"]
    return web.Response(
        headers={
            "X-Goog-Upload-URL": f"{base_url(request)}/upload/{version}/files?upload_id={upload_id}"
            "&upload_protocol=resumable",
            "X-Goog-Upload-Status": "active",
            "X-Goog-Upload-Chunk-Granularity": str(UPLOAD_GRANULARITY),
        }
    )


async def _upload_piece(request: web.Request) -> web.StreamResponse:
    store = request.app[FILES_KEY]
    session = store.sessions.get(request.query.get("upload_id", ""))
    if session is None:
        raise _upload_error(errors.not_found("upload session (unknown or finished upload_id)"))
    commands = [c.strip().lower() for c in request.headers.get("X-Goog-Upload-Command", "").split(",")]
    if commands == ["query"]:
        return web.Response(
            headers={"X-Goog-Upload-Status": "active", "X-Goog-Upload-Size-Received": str(session.received)}
        )
    if not commands or not set(commands) <= {"upload", "finalize"} or commands[0] not in ("upload", "finalize"):
        raise _upload_error(errors.invalid_argument("X-Goog-Upload-Command must be upload, finalize or both."))
    if session.busy:
        raise _upload_error(errors.invalid_argument("Another piece of this upload is still being received."))
    session.busy = True
    try:
        offset = request.headers.get("X-Goog-Upload-Offset", "")
        if "upload" in commands and offset != str(session.received):
            raise _upload_error(
                errors.invalid_argument(
                    f"X-Goog-Upload-Offset is {offset or 'missing'}; {session.received} bytes were received so far."
                )
            )
        session.path.parent.mkdir(exist_ok=True)
        async for piece in request.content.iter_chunked(READ_PIECE):
            if session.received + len(piece) > session.size:
                raise _upload_error(
                    errors.invalid_argument(f"The upload is longer than the {session.size} bytes it declared.")
                )
            await asyncio.to_thread(_write_at, session.path, session.received, piece)
            session.received += len(piece)
        if "finalize" not in commands:
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        if session.received != session.size:
            raise _upload_error(
                errors.invalid_argument(
                    f"The upload has {session.received} bytes; it declared {session.size} (X-Goog-Upload-Header-"
                    "Content-Length)."
                )
            )
        if not session.path.exists():
            await asyncio.to_thread(session.path.touch)
        digest = await asyncio.to_thread(sha256_of, session.path)
        await asyncio.to_thread(session.path.replace, store.path_for(session.file_id))
    except errors.ApiError:
        store.sessions.pop(request.query["upload_id"], None)
        session.path.unlink(missing_ok=True)
        raise
    finally:
        session.busy = False
    store.sessions.pop(request.query["upload_id"], None)
    stored = store.add(session.file_id, session.mime_type, session.size, digest, "UPLOADED", session.display_name)
    store.state.files_uploaded += 1
    resource = stored.resource(base_url(request), request.match_info["version"])
    return web.json_response({"file": resource}, headers={"X-Goog-Upload-Status": "final"})


_start_endpoint = api_endpoint(_start_upload)
_piece_endpoint = api_endpoint(_upload_piece, keyed=False)


async def upload(request: web.Request) -> web.StreamResponse:
    """POST /upload/{version}/files: a new upload (keyed), or a piece of one (its upload_id is the key)."""
    return await (_piece_endpoint if "upload_id" in request.query else _start_endpoint)(request)


# --- get, list, delete, download ------------------------------------------------------------------------


def _file_id(tail: str) -> str:
    if re.fullmatch(FILE_ID, tail) is None:
        raise errors.file_not_accessible(tail)
    return tail


async def _get_or_download(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    if tail.endswith(":download"):
        return await _download(request, tail.removesuffix(":download"))
    stored = request.app[FILES_KEY].get(_file_id(tail))
    if stored is None:
        raise errors.file_not_accessible(tail)
    return web.json_response(stored.resource(base_url(request), request.match_info["version"]))


def page_size(request: web.Request) -> int:
    raw = request.query.get("pageSize", "")
    if raw == "":
        return DEFAULT_PAGE_SIZE
    if not raw.lstrip("-").isdigit() or int(raw) < 0:
        raise errors.invalid_argument(f"Invalid value for pageSize: {raw!r}.", "page_size")
    # Google clamps an oversized page instead of refusing it.
    return min(int(raw) or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode()


def decode_page_token(request: web.Request) -> int | None:
    """The creation number the page starts below (lists are newest first); None for the first page."""
    token = request.query.get("pageToken", "")
    if not token:
        return None
    try:
        kind, _, seq = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "after" or not seq.isdigit():
            raise ValueError(token)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.invalid_argument(f"Invalid page token: {token!r}.", "page_token") from None
    return int(seq)


async def _list(request: web.Request) -> web.StreamResponse:
    store = request.app[FILES_KEY]
    size = page_size(request)
    below = decode_page_token(request)
    store.sweep()
    ordered = sorted(store.files.values(), key=lambda f: f.seq, reverse=True)
    remaining = [f for f in ordered if below is None or f.seq < below]
    page = remaining[:size]
    body: dict[str, Any] = {}
    if page:
        base, version = base_url(request), request.match_info["version"]
        body["files"] = [f.resource(base, version) for f in page]
    if len(remaining) > size:
        body["nextPageToken"] = encode_page_token(page[-1].seq)
    return web.json_response(body)


async def _delete(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    store = request.app[FILES_KEY]
    store.sweep()
    if not store.delete(_file_id(tail)):
        raise errors.file_not_accessible(tail)
    return web.json_response({})


def _read_piece(path: Path, offset: int) -> bytes:
    with path.open("rb") as data:
        data.seek(offset)
        return data.read(DOWNLOAD_PIECE)


async def _download(request: web.Request, file_id: str) -> web.StreamResponse:
    """The file's bytes, streamed in pieces: a 2 GB results file never sits whole in memory."""
    if request.query.get("alt") != "media":
        raise errors.invalid_argument("A download must ask for the media: add ?alt=media.", "alt")
    store = request.app[FILES_KEY]
    stored = store.get(_file_id(file_id))
    if stored is None:
        raise errors.file_not_accessible(file_id)
    if stored.source != "GENERATED":
        raise errors.invalid_argument(
            f"Only generated files can be downloaded; files/{file_id} was uploaded. (google-genai files.py "
            "`download` refuses the same.)"
        )
    response = web.StreamResponse(headers={"Content-Type": stored.mime_type})
    response.content_length = stored.size
    await response.prepare(request)
    offset = 0
    while offset < stored.size:
        try:
            piece = await asyncio.to_thread(_read_piece, stored.path, offset)
        except FileNotFoundError:  # deleted (or reset) mid-download: end the stream short
            break
        if not piece:
            break
        await response.write(piece)
        offset += len(piece)
    await response.write_eof()
    store.state.file_downloads += 1
    return response


async def _plain_download(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    if not tail.endswith(":download"):
        raise errors.method_not_found(request.match_info["version"], tail)
    return await _download(request, tail.removesuffix(":download"))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/upload/{version}/files", upload)
    app.router.add_get("/{version}/files", api_endpoint(_list))
    app.router.add_get("/{version}/files/{tail}", api_endpoint(_get_or_download))
    app.router.add_delete("/{version}/files/{tail}", api_endpoint(_delete))
    app.router.add_get("/download/{version}/files/{tail}", api_endpoint(_plain_download))
