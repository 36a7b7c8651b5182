"""A small client for Bunch's HTTP API. Every failure becomes a CliError with its exit code."""

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from bunch_cli import __version__, retries, sse
from bunch_cli.costs import refusal_text
from bunch_cli.errors import CliError, ExitCode, exit_code_for_status

DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD_BATCH = 100  # POST /api/uploads takes at most 100 files per request

Progress = Callable[[int], None]  # called with the number of bytes moved so far
Notice = Callable[[str], None]  # told what is going on when a request is sent again


def body_of(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def detail_of(response: httpx.Response) -> str:
    """The server's `detail` message, or what there is of a body that is not Bunch's JSON."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)
    text = response.text.strip()
    return text[:300] if text else response.reason_phrase


class BunchClient:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 30.0,
        notice: Notice | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.notice = notice
        headers = {"User-Agent": f"bunch-cli/{__version__}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        # Idle connections are let go before a server's usual 5 s keep-alive ends: reusing one the
        # server is closing at that moment fails with "Server disconnected" (a race of HTTP/1.1).
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(keepalive_expiry=2),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "BunchClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------

    def error(self, response: httpx.Response) -> CliError:
        status = response.status_code
        detail = detail_of(response)
        body = body_of(response) if status == 402 else None
        request = response.request
        where = f"{request.method} {request.url.path}"
        code = exit_code_for_status(status)
        if code == ExitCode.AUTH:
            hint = "set BUNCH_API_KEY or --api-key" if self.api_key is None else "check BUNCH_API_KEY / --api-key"
            message = f"Authentication failed ({status}): {detail} ({hint})"
        elif status in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            message = f"The server at {self.base_url} does not offer {where} (HTTP {status}); is it an older Bunch?"
        elif code == ExitCode.SERVER:
            message = f"The server failed on {where} (HTTP {status}): {detail}"
        elif code == ExitCode.BUDGET and body is not None:
            message = refusal_text(detail, body)
        else:
            message = f"{detail} (HTTP {status})"
        return CliError(message, code, status=status, detail=detail, body=body)

    def unreachable(self, exc: httpx.TransportError) -> CliError:
        if isinstance(exc, httpx.TimeoutException):
            reason = "it did not answer in time"
        else:
            reason = str(exc) or type(exc).__name__
        return CliError(
            f"Cannot reach the Bunch server at {self.base_url}: {reason}. "
            "Is it running? Point BUNCH_URL or --url at it.",
            ExitCode.SERVER,
        )

    def request(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """One request; with an Idempotency-Key `key` (one that creates something), sent again with
        the same key while its answer is lost or says to come back (bunch_cli/retries.py)."""
        try:
            if key is None:
                response = self._http.request(method, path, **kwargs)
            else:
                response = self._keyed(method, path, key, kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        if response.status_code >= 400:
            raise self.error(response)
        return response

    def _keyed(self, method: str, path: str, key: str, kwargs: dict[str, Any]) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), retries.IDEMPOTENCY_KEY_HEADER: key}
        # Built once, so every attempt sends the very same bytes: a multipart body rebuilt each time
        # would get a new boundary, and the gateway would take it for another request under that key.
        request = self._http.build_request(method, path, headers=headers, **kwargs)
        attempt = 1
        while True:
            _rewind(kwargs.get("files"))
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                wait = retries.wait_after_transport_error(attempt)
                if wait is None:
                    raise
                reason = str(exc) or type(exc).__name__
            else:
                wait = retries.wait_before_retry(response, attempt)
                if wait is None:
                    return response
                reason = f"HTTP {response.status_code}: {detail_of(response)}"
            if self.notice is not None:
                self.notice(
                    f"{method} {path} got no usable answer ({reason}); sending it again with the same "
                    f"Idempotency-Key in {wait:g} s (attempt {attempt + 1} of {retries.ATTEMPTS})."
                )
            time.sleep(wait)
            attempt += 1

    def json(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        response = self.request(method, path, key=key, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"The server answered {method} {path} with something that is not JSON: {response.text[:200]!r}",
                ExitCode.SERVER,
            ) from None

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self.error(response)
                yield response
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None

    # --- the API --------------------------------------------------------------------------

    def upload_images(self, paths: Sequence[Path]) -> list[str]:
        """POST /api/uploads in batches (each a request of its own, with a key of its own); the
        upload ids in the order of `paths`."""
        ids: list[str] = []
        for start in range(0, len(paths), UPLOAD_BATCH):
            batch = paths[start : start + UPLOAD_BATCH]
            with contextlib.ExitStack() as stack:
                files = [("files", (path.name, stack.enter_context(path.open("rb")))) for path in batch]
                body = self.json("POST", "/api/uploads", key=retries.new_key(), files=files, timeout=300)
            ids.extend(str(upload["id"]) for upload in body["uploads"])
        return ids

    def upload_dataset(self, path: Path, progress: Progress | None = None) -> dict[str, Any]:
        """POST /api/datasets with one ZIP; `progress` follows the bytes as they are sent."""
        with path.open("rb") as raw:
            file = ProgressReader(raw, progress)
            timeout = httpx.Timeout(60.0, connect=5.0, read=900.0)
            files = [("files", (path.name, file, "application/zip"))]
            body = self.json("POST", "/api/datasets", key=retries.new_key(), files=files, timeout=timeout)
        if not isinstance(body, dict):
            raise CliError(f"Unexpected answer from POST /api/datasets: {body!r}", ExitCode.SERVER)
        return body

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /api/jobs. The same `idempotency_key` with the same body within a day gets the first
        job back instead of a new one; without one, a key is made for this submit."""
        key = idempotency_key or retries.new_key()
        result: dict[str, Any] = self.json("POST", "/api/jobs", key=key, json=body)
        return result

    def quote(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/jobs/quote: what the job `body` would cost on each lane; nothing is created."""
        result: dict[str, Any] = self.json("POST", "/api/jobs/quote", json=body)
        return result

    def status(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/api/jobs/{job_id}/status")
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/api/jobs/{job_id}")
        return result

    def list_jobs(
        self, status: str | None = None, group: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, str | int] = {"limit": limit}
        if status:
            params["status"] = status
        if group:
            params["group"] = group
        if cursor:
            params["cursor"] = cursor
        result: dict[str, Any] = self.json("GET", "/api/jobs", params=params)
        return result

    def iter_jobs(
        self, status: str | None = None, group: str | None = None, limit: int = 20
    ) -> Iterator[dict[str, Any]]:
        """Up to `limit` jobs, newest first, following the cursor across pages."""
        cursor: str | None = None
        left = limit
        while left > 0:
            page = self.list_jobs(status, group, min(left, 100), cursor)
            jobs = page.get("jobs") or []
            yield from jobs[:left]
            left -= len(jobs)
            cursor = page.get("next_cursor")
            if not cursor:  # a filtered page may be short, even empty, with more after it
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", f"/api/jobs/{job_id}/cancel")
        return result

    def retry(self, job_id: str, idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or retries.new_key()
        result: dict[str, Any] = self.json("POST", f"/api/jobs/{job_id}/retry", key=key)
        return result

    def queue_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", "/api/queue/stats")
        return result

    def groups(self) -> list[dict[str, Any]]:
        """The project's groups (id, name, job_count)."""
        body = self.json("GET", "/api/groups")
        return list(body.get("groups") or []) if isinstance(body, dict) else []

    def export_destinations(self) -> dict[str, Any]:
        """GET /api/exports/destinations: the buckets the operator set up for this project."""
        result: dict[str, Any] = self.json("GET", "/api/exports/destinations")
        return result

    def create_export(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /api/exports: copy groups' or jobs' images to a destination. Keyed like a submit:
        sent again after a lost answer, it gets the first export back instead of a second copy."""
        key = idempotency_key or retries.new_key()
        result: dict[str, Any] = self.json("POST", "/api/exports", key=key, json=body)
        return result

    def export(self, export_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/api/exports/{export_id}")
        return result

    @contextlib.contextmanager
    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Iterator[sse.Event]]:
        """The job's Server-Sent Events; the stream ends when the server closes it or goes quiet for 60 s."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(60.0, connect=5.0)
        with self.stream("GET", f"/api/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
            yield sse.parse(response.iter_lines())

    def download_url(self, job_id: str) -> str:
        """Where the job's ZIP is (the gateway answers 302 with a presigned link)."""
        response = self.request("GET", f"/api/jobs/{job_id}/download", follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code not in (301, 302, 303, 307, 308) or not location:
            raise CliError(
                f"Expected a redirect to the ZIP, got HTTP {response.status_code} without a location.", ExitCode.SERVER
            )
        return str(response.url.join(location))

    def download(self, job_id: str, sink: IO[bytes], progress: Callable[[int, int | None], None] | None = None) -> int:
        """Stream the job's ZIP into `sink`; the number of bytes written."""
        url = self.download_url(job_id)
        received = 0
        # A presigned link carries its own signature: no Authorization header may go with it.
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True) as plain,
                plain.stream("GET", url) as response,
            ):
                if response.status_code >= 400:
                    response.read()
                    raise CliError(
                        f"Object storage refused the ZIP (HTTP {response.status_code}): {detail_of(response)}",
                        ExitCode.SERVER,
                        status=response.status_code,
                    )
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                for chunk in response.iter_bytes(1024 * 1024):
                    sink.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(received, total)
        except httpx.TransportError as exc:
            raise CliError(f"The download of the ZIP broke off: {exc or type(exc).__name__}", ExitCode.SERVER) from None
        if total is not None and received != total:
            raise CliError(f"The ZIP arrived incomplete: {received} of {total} bytes.", ExitCode.SERVER)
        return received


def _rewind(files: Any) -> None:
    """Back to the start of every file object of a multipart body, for another attempt to send it
    whole (httpx rewinds too when it renders the body; an attempt must not rely on that)."""
    for _, value in files or ():
        file = value[1] if isinstance(value, tuple) else value
        if hasattr(file, "seek"):
            file.seek(0)


class ProgressReader:
    """A binary file that reports how much of it has been read (httpx reads it as it sends)."""

    def __init__(self, raw: IO[bytes], progress: Progress | None) -> None:
        self._raw = raw
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        if self._progress is not None:
            self._progress(self._raw.tell())
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()
