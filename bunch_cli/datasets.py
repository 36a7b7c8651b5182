"""Turning a folder of images into one ZIP for POST /api/datasets."""

import zipfile
from collections.abc import Callable
from pathlib import Path

from bunch_cli.errors import usage

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


def find_images(folder: Path) -> list[Path]:
    """The folder's images (recursively, hidden files and folders left out), in a stable order."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part == "__MACOSX" for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return found


def pack(folder: Path, images: list[Path], dest: Path, progress: Callable[[int], None] | None = None) -> None:
    """Write the images into `dest` as they are: they are compressed already, so stored, not deflated."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for done, path in enumerate(images, 1):
            archive.write(path, path.relative_to(folder).as_posix())
            if progress is not None:
                progress(done)


def check_zip(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise usage(f"{path} is neither a folder nor a ZIP file.")
