"""The TypeScript client (clients/typescript, @bunch/client): its generated types are those of
docs/openapi.json, it type-checks under `strict`, and its end-to-end program passes against the
real stack (clients/typescript/e2e/run.ts: upload, idempotent submits, SSE, download, one typed
error of each kind), the same client works in a Chromium page of another origin (e2e/browser.ts),
and its SSE parser reads what the gateway does not send (e2e/sse_parser.ts)."""

import difflib
import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Browser

from deploy.processes import ROOT, free_port, scratch_dir
from deploy.stack import Stack, start_stack
from tests.chromium import chromium, needs_chromium

PACKAGE = ROOT / "clients" / "typescript"
SCHEMA = Path("src") / "generated" / "schema.ts"
KEY = "ts-client-key"
POOR_KEY = "ts-client-poor-key"  # a project whose budget no job fits: the 402 of the program
BROWSER_KEY = "ts-client-browser-key"  # the browser page's own project, apart from the program's quota
QUEUED_IMAGES_QUOTA = 100  # BUNCH_PROJECT_MAX_QUEUED_IMAGES: the 429 of the program
MIN_NODE_MAJOR = 20


def node_tools() -> tuple[str, str]:
    """node and npm, and the package's installed dependencies, or a failure saying what to run: CI
    must not pass by skipping these tests."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js is missing: apt-get install nodejs npm (Node 20 or later), then make install-ts")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        pytest.fail(f"Node {version} is too old for clients/typescript: it needs {MIN_NODE_MAJOR} or later")
    stamp = PACKAGE / "node_modules" / ".installed"
    if not stamp.exists():
        pytest.fail(
            "clients/typescript/node_modules is missing: run `make install-ts` (npm ci there; `make test` runs it)"
        )
    if stamp.stat().st_mtime < (PACKAGE / "package-lock.json").stat().st_mtime:
        pytest.fail("clients/typescript/node_modules is older than package-lock.json: run `make install-ts`")
    return node, npm


def run(args: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    output = f"{done.stdout}\n{done.stderr}".strip()
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output}"
    return output


def test_generated_types_are_those_of_the_checked_in_openapi_description(tmp_path: Path) -> None:
    """`npm run generate`, run as it is written in package.json on a copy of the layout it expects
    (../../docs/openapi.json), makes exactly the committed src/generated/schema.ts."""
    _, npm = node_tools()
    copy = tmp_path / "clients" / "typescript"
    (copy / SCHEMA.parent).mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "openapi.json", tmp_path / "docs" / "openapi.json")
    shutil.copy(PACKAGE / "package.json", copy / "package.json")
    (copy / "node_modules").symlink_to(PACKAGE / "node_modules", target_is_directory=True)
    run([npm, "run", "--silent", "generate"], cwd=copy, timeout=60)
    made = (copy / SCHEMA).read_text()
    committed = (PACKAGE / SCHEMA).read_text()
    if made != committed:
        diff = difflib.unified_diff(
            committed.splitlines(), made.splitlines(), "committed schema.ts", "generated now", lineterm="", n=1
        )
        shown = "\n".join(list(diff)[:80])
        pytest.fail(f"clients/typescript/{SCHEMA} is out of date with docs/openapi.json: run `make openapi`\n{shown}")


def test_the_library_type_checks_strictly() -> None:
    node, _ = node_tools()
    tsc = str(PACKAGE / "node_modules" / "typescript" / "bin" / "tsc")
    run([node, tsc, "-p", "tsconfig.json", "--strict", "--noEmit"], cwd=PACKAGE, timeout=120)


@dataclass(frozen=True)
class Built:
    node: str
    folder: Path  # a copy of the package, built: dist/ and dist-e2e/


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The package and its programs compiled in a copy of their own, so that runs of the suite at
    the same time never write the same files (the programs import the package by its name, which
    resolves to the copy's own dist/)."""
    node, npm = node_tools()
    folder = tmp_path_factory.mktemp("ts-client") / "typescript"
    folder.mkdir()
    for name in ("package.json", "tsconfig.json"):
        shutil.copy(PACKAGE / name, folder / name)
    for name in ("src", "e2e"):
        shutil.copytree(PACKAGE / name, folder / name)
    (folder / "node_modules").symlink_to(PACKAGE / "node_modules", target_is_directory=True)
    run([npm, "run", "--silent", "build"], cwd=folder, timeout=180)
    return Built(node, folder)


def test_the_sse_parser_reads_what_other_servers_send(built: Built) -> None:
    output = run([built.node, "dist-e2e/sse_parser.js"], cwd=built.folder, timeout=30)
    assert "all cases passed" in output, output


@pytest.fixture(scope="module")
def page_site(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A static site of its own origin serving e2e/browser.html, the built package and
    openapi-fetch's ES module (the page's import map names them); its origin."""
    site = tmp_path_factory.mktemp("ts-client-site")
    shutil.copy(built.folder / "e2e" / "browser.html", site / "index.html")
    shutil.copytree(built.folder / "dist", site / "bunch")
    shutil.copytree(built.folder / "dist-e2e", site / "e2e")
    shutil.copy(PACKAGE / "node_modules" / "openapi-fetch" / "dist" / "index.mjs", site / "openapi-fetch.mjs")
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript"}

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stack(page_site: str) -> Iterator[Stack]:
    workdir = scratch_dir("bunch-ts-client-")
    stack = start_stack(
        workdir,
        api_keys=f"{KEY}:ts-client,{POOR_KEY}:ts-client-poor,{BROWSER_KEY}:ts-client-browser",
        service_env={
            "BUNCH_MAX_CONCURRENCY": "4",
            "BUNCH_PROJECT_BUDGETS": "ts-client-poor:0.0001/month",
            "BUNCH_PROJECT_MAX_QUEUED_IMAGES": str(QUEUED_IMAGES_QUOTA),
            "BUNCH_CORS_ORIGINS": page_site,
        },
    )
    yield stack
    stack.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_the_end_to_end_program_passes_against_the_stack(built: Built, stack: Stack) -> None:
    env = {
        "BUNCH_URL": stack.gateway_url,
        "BUNCH_API_KEY": KEY,
        "BUNCH_POOR_API_KEY": POOR_KEY,
        "BUNCH_QUEUED_IMAGES_QUOTA": str(QUEUED_IMAGES_QUOTA),
    }
    output = run([built.node, "dist-e2e/run.js"], cwd=built.folder, timeout=150, env=env)
    assert "all steps passed" in output, output


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


@needs_chromium
async def test_the_client_works_in_a_browser_page_of_another_origin(
    browser: Browser, page_site: str, stack: Stack
) -> None:
    page = await browser.new_page()
    try:
        await page.goto(f"{page_site}/index.html")
        await page.wait_for_function("typeof window.runBunchChecks === 'function'")
        report = await page.evaluate(
            "([url, key]) => window.runBunchChecks(url, key)", [stack.gateway_url, BROWSER_KEY]
        )
    finally:
        await page.close()
    lines = "\n".join(report["lines"])
    assert report["failures"] == 0 and len(report["lines"]) == 8, lines
