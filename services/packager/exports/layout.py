"""Where an export puts each object in the destination bucket, and what it is called by the export.

by_group: <prefix>/<group>/<job_id>/<index>.<ext> and <prefix>/<group>/<job_id>/manifest.json
flat:     <prefix>/<job_id>-<index>.<ext>        and <prefix>/<job_id>-manifest.json

The group's folder is its name made path-safe (services/packager/zipper.py's rules for ZIP folders),
so a dataset pipeline finds it by name; the job id below it keeps two groups whose names come out
the same ("a/b" and "a_b") from ever sharing an object.
"""

from services.packager.zipper import safe_zip_path
from shared.export_destinations import Destination
from shared.planning import image_file_name
from shared.stores.exports import ExportLayout

MANIFEST_JSON = "manifest.json"
MANIFEST_JSONL = "manifest.jsonl"


class JobFolder:
    """The keys of one job's objects at the destination."""

    __slots__ = ("listing_prefix",)
    listing_prefix: str

    def __init__(self, destination: Destination, layout: ExportLayout, group_name: str, job_id: str) -> None:
        # Worked out once per job, not per image: safe_zip_path normalises the whole name.
        if layout == ExportLayout.FLAT:
            prefix = destination.key(f"{job_id}-")
        else:
            prefix = destination.key(f"{safe_zip_path(group_name)}/{job_id}/")
        self.listing_prefix = prefix  # every image key of the job starts with it (what one LIST looks under)

    def image_key(self, index: int, mime_type: str | None) -> str:
        return self.listing_prefix + image_file_name(index, mime_type)

    def manifest_key(self, jsonl: bool) -> str:
        return self.listing_prefix + (MANIFEST_JSONL if jsonl else MANIFEST_JSON)


def image_member(job_id: str, index: int) -> str:
    """The object's name in the export's set of settled objects."""
    return f"{job_id}:{index}"


def manifest_member(job_id: str) -> str:
    return f"{job_id}:manifest"
