"""Where an export puts each object in the destination bucket, and what it is called by the export.

by_group: <prefix>/<group>/<job_id>/<index>.<ext> and <prefix>/<group>/<job_id>/manifest.json
flat:     <prefix>/<job_id>-<index>.<ext>        and <prefix>/<job_id>-manifest.json

The group's folder is its name made path-safe (services/packager/zipper.py's rules for ZIP folders),
so a dataset pipeline finds it by name; the job id below it keeps two groups whose names come out
the same ("a/b" and "a_b") from ever sharing an object.
"""

from dataclasses import dataclass

from services.packager.zipper import safe_zip_path
from shared.export_destinations import Destination
from shared.planning import image_file_name
from shared.stores.exports import ExportLayout

MANIFEST_JSON = "manifest.json"
MANIFEST_JSONL = "manifest.jsonl"


@dataclass(frozen=True, slots=True)
class JobFolder:
    """The keys of one job's objects at the destination."""

    destination: Destination
    layout: ExportLayout
    group_name: str
    job_id: str

    @property
    def listing_prefix(self) -> str:
        """The prefix every image key of the job starts with (what one LIST looks under)."""
        if self.layout == ExportLayout.FLAT:
            return self.destination.key(f"{self.job_id}-")
        return self.destination.key(f"{safe_zip_path(self.group_name)}/{self.job_id}/")

    def image_key(self, index: int, mime_type: str | None) -> str:
        return self.listing_prefix + image_file_name(index, mime_type)

    def manifest_key(self, jsonl: bool) -> str:
        return self.listing_prefix + (MANIFEST_JSONL if jsonl else MANIFEST_JSON)


def image_member(job_id: str, index: int) -> str:
    """The object's name in the export's set of settled objects."""
    return f"{job_id}:{index}"


def manifest_member(job_id: str) -> str:
    return f"{job_id}:manifest"
