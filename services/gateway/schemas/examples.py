"""An example of every request body, by operation id, for the OpenAPI description (and so for the
docs UI and generated clients): services/gateway/openapi_document.py puts each beside its body."""

from typing import Any

UPLOAD_ID = "9f2b6c1e4d8a4f0b8c3e5a7d1b2c4e6f"
JOB_ID = "3c5e7a9b1d2f4a6c8e0b2d4f6a8c0e1d"
GROUP_ID = "7a1c3e5b9d0f2a4c6e8b0d2f4a6c8e9b"
OTHER_GROUP_ID = "2b4d6f8a0c1e3a5c7e9b0d2f4a6c8e0a"
BATCH_ID = "5d7f9b1c3e4a6c8e0a2b4d6f8a0c2e3f"
DATASET_ID = "1e3a5c7e9b0d2f4a6c8e0b2d4f6a8c9d"

_SEMI_AUTO = {
    "mode": "semi_auto",
    "group": "spring-catalogue",
    "prompts": ["A product photo of the sneaker on a beach at sunset", "The same sneaker on a city street"],
    "reference_ids": [UPLOAD_ID],
    "images_per_prompt": 4,
    "params": {"aspect_ratio": "1:1"},
}
_AUTOMATIC = {
    "mode": "automatic",
    "group": "training-set",
    "base_prompt": "The same scene in watercolour",
    "dataset_id": DATASET_ID,
    "variations_per_image": 2,
}


def _one(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


_JOB = {
    "semi_auto": _one("Semi-automatic: images per prompt for each prompt, with a reference", _SEMI_AUTO),
    "automatic": _one("Automatic: variations of every image of a dataset", _AUTOMATIC),
}
_FILES = {"files": _one("Image files (multipart/form-data, field `files`)", {"files": ["shoe.png", "box.jpg"]})}

REQUEST_EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "submitJob": _JOB,
    "quoteJob": _JOB,
    "changeJobPriority": {"priority": _one("Run before jobs of lower priority", {"priority": 10})},
    "redoJobImages": {"indices": _one("Make images 0 and 5 again", {"indices": [0, 5]})},
    "createUploads": _FILES,
    "createDataset": {
        "archive": _one("One ZIP archive of images (multipart/form-data, field `files`)", {"files": ["inputs.zip"]}),
        **_FILES,
    },
    "createGroup": {"name": _one("A group's name", {"name": "spring-catalogue"})},
    "requestDownload": {
        "groups": _one("One ZIP of two groups", {"group_ids": [GROUP_ID, "2b4d6f8a0c1e3a5c7e9b0d2f4a6c8e0a"]})
    },
    "createExport": {
        "groups": _one(
            "Two groups to the project's bucket, a folder per group",
            {"destination": "archive", "group_ids": [GROUP_ID, OTHER_GROUP_ID]},
        ),
        "jobs": _one(
            "One job's images in one folder, no manifest",
            {"destination": "archive", "job_ids": [JOB_ID], "layout": "flat", "include_manifest": False},
        ),
    },
    "saveBatch": {"semi_auto": _one("A semi-automatic job saved under a name", {**_SEMI_AUTO, "name": "Sneakers"})},
    "queueBatch": {
        "as_saved": _one("Queue the batch as it was saved", {}),
        "priority": _one("Queue it with another priority", {"priority": 5}),
    },
    "cancelJobs": {
        "jobs": _one("Cancel these jobs", {"job_ids": [JOB_ID]}),
        "all": _one("Cancel every queued and processing job", {}),
        "document": _one(
            "Queue management style: the jobs of these batches", {"projectId": "demo", "batchIds": [BATCH_ID]}
        ),
    },
    "retryJobs": {
        "one": _one("Retry one failed job", {"job_id": JOB_ID}),
        "all": _one("Retry every failed job not retried yet", {"retry_all": True}),
        "document": _one("Queue management style", {"projectId": "demo", "jobId": JOB_ID}),
    },
    "enqueueBatches": {"batch": _one("Queue a saved batch", {"projectId": "demo", "batchId": BATCH_ID, "priority": 0})},
    "redoCells": {
        "cells": _one(
            "Make two cells of row 3 again",
            {
                "projectId": "demo",
                "batchId": BATCH_ID,
                "rowIndex": 3,
                "redoColumnIds": ["v0", "v2"],
                "croppedImageIds": {},
            },
        )
    },
}
