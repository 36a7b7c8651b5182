"""Group names become folder names in download ZIPs: whatever a name holds (control characters,
dots, separators, bidi overrides, reserved device names, long unicode), every entry of the ZIP is
a safe relative path. Slashes, `..` and plain unicode are in tests/test_downloads.py."""

import asyncio
import io
import time
import unicodedata
import zipfile
from typing import Any

import httpx

from deploy.stack import Stack
from tests.security.conftest import KEY_A
from tests.stack_helpers import client, submit, wait_final

NAMES = [
    "tab\there",
    "line\nbreak\r",
    "nul\x00byte",
    "esc\x1b[31mred",
    "del\x7fchar",
    "bidi\u202egnp.exe",
    "...",
    ".hidden",
    "CON",
    "lpt1.txt",
    "back\\slash\\..\\..",
    "/etc/passwd",
    "C:\\Windows",
    "trailing dot.",
    'a:b*c?d"e<f>g|h',
    "x" * 200,
]
LONG_UNICODE = "\U0001f600" * 80  # 80 characters, 320 bytes in UTF-8
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{n}" for p in ("COM", "LPT") for n in range(1, 10)}


def component_problems(component: str) -> list[str]:
    problems = []
    if component in ("", ".", ".."):
        problems.append("empty or dot component")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in component):
        problems.append("control character")
    if any(ch in '\\<>:"|?*' or 0x202A <= ord(ch) <= 0x202E or 0x2066 <= ord(ch) <= 0x2069 for ch in component):
        problems.append("separator, Windows-forbidden or bidi character")
    if component != component.strip(" ."):
        problems.append("leading or trailing dot or space")
    if component.split(".", 1)[0].upper() in WINDOWS_RESERVED:
        problems.append("Windows device name")
    return problems


def path_problems(name: str) -> list[str]:
    if name.startswith("/"):
        return ["absolute"]
    return [f"{component!r}: {problem}" for component in name.split("/") for problem in component_problems(component)]


async def download_of(stack: Stack, names: list[str]) -> tuple[list[str], zipfile.ZipFile]:
    """One finished one-image job in a group of each name, then one download of every group."""
    async with client(stack, KEY_A) as api:
        group_ids = []
        for name in names:
            created = await api.post("/api/groups", json={"name": name})
            assert created.status_code == 201, (name, created.text)
            group_ids.append(created.json()["id"])
        job_ids = [
            await submit(api, {"mode": "semi_auto", "group": gid, "prompts": ["p"], "images_per_prompt": 1})
            for gid in group_ids
        ]
        finals = await asyncio.gather(*(wait_final(api, job_id, stack, within=90) for job_id in job_ids))
        assert [f["status"] for f in finals] == ["completed"] * len(job_ids), finals
        download_id = (await api.post("/api/downloads", json={"group_ids": group_ids})).json()["id"]
        deadline = time.monotonic() + 60
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = (await api.get(f"/api/downloads/{download_id}")).json()
            if body["status"] in ("ready", "failed"):
                break
            await asyncio.sleep(0.2)
        assert body["status"] == "ready", body
    async with httpx.AsyncClient(timeout=60) as plain:
        archive = zipfile.ZipFile(io.BytesIO((await plain.get(body["url"])).content))
    assert archive.testzip() is None
    return group_ids, archive


async def test_group_names_of_every_kind_become_safe_zip_paths(full_stack: Stack) -> None:
    _, archive = await download_of(full_stack, NAMES)
    names = archive.namelist()
    folders = {name.split("/", 1)[0] for name in names if "/" in name}
    assert len(folders) == len(NAMES), folders  # one folder per group, none merged, none split
    assert all(name.count("/") == 1 for name in names if name != "manifest.json"), names
    problems = {name: path_problems(name) for name in names}
    assert {name: found for name, found in problems.items() if found} == {}


async def test_long_unicode_group_names_fit_file_system_limits(full_stack: Stack) -> None:
    # Two groups (one image alone would be linked, not zipped) whose names only differ past the cut.
    _, archive = await download_of(full_stack, [LONG_UNICODE, LONG_UNICODE[:-1] + "!"])
    folders = {name.split("/")[0] for name in archive.namelist() if name.endswith(".png")}
    assert len(folders) == 2
    for name in archive.namelist():
        for component in name.split("/"):
            assert len(component.encode()) <= 255, (len(component.encode()), component[:20])
