"""The OpenAPI description, made for client generators, and its checked-in copy docs/openapi.json.

Each operation id is its endpoint function's name in camelCase (`submit_job` → `submitJob`), so a
generated client reads like the API; a rename changes the checked-in copy, which a test compares
with the running description (tests/test_openapi_document.py), so no id changes unnoticed. Each
operation has one tag, its area, described below.

    python -m services.gateway.openapi_document          # write docs/openapi.json
    python -m services.gateway.openapi_document --check  # exit 1 when it is out of date
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic.alias_generators import to_camel

from services.gateway.schemas.examples import REQUEST_EXAMPLES

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"

TAGS: list[dict[str, Any]] = [
    {"name": "jobs", "description": "Submit, quote, follow, change, cancel, retry and redo jobs; their results."},
    {"name": "uploads", "description": "Reference and input images, stored by content hash."},
    {"name": "datasets", "description": "The inputs of an automatic job at once: one ZIP or many files."},
    {"name": "groups", "description": "Named groups of jobs of a project."},
    {"name": "downloads", "description": "One ZIP of several groups' results, built on request."},
    {"name": "exports", "description": "Jobs' and groups' images copied to a bucket of the project's own."},
    {"name": "batches", "description": "Saved job definitions, queued (again) later."},
    {"name": "queue", "description": "The project's queue: pause, resume, cancel, retry, its figures."},
    {"name": "events", "description": "Server-sent events of a job or of the whole project."},
    {"name": "webhooks", "description": "The secret that signs the project's own webhooks."},
    {
        "name": "queue-management",
        "description": "The queue management API of the earlier specifications (docs/compatible_api.md).",
    },
    {
        "name": "generations",
        "description": "The queue-based generation API of the earlier specifications (docs/compatible_api.md).",
    },
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "internal", "description": "RunPod's webhook; not for API clients."},
]


def operation_id(route: APIRoute) -> str:
    return to_camel(route.name)


def with_examples(description: dict[str, Any]) -> dict[str, Any]:
    """`description` with the examples of services/gateway/schemas/examples.py beside every request
    body; a body without one is an error, so a new route cannot go without."""
    for operations in description.get("paths", {}).values():
        for operation in operations.values():
            body = operation.get("requestBody")
            if body is None:
                continue
            examples = REQUEST_EXAMPLES.get(operation["operationId"])
            if examples is None:
                raise LookupError(f"no request example for {operation['operationId']} (schemas/examples.py)")
            for media in body["content"].values():
                media["examples"] = examples
    return description


def describe(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The app's `openapi`: FastAPI's description (built once, then cached by FastAPI) with examples."""
    built = app.openapi

    def openapi() -> dict[str, Any]:
        return with_examples(built())

    return openapi


def render(description: dict[str, Any]) -> str:
    return json.dumps(description, indent=2, ensure_ascii=False) + "\n"


def current() -> str:
    # Imported here: the app's module imports this one for its ids and tags.
    from services.gateway.app import create_app
    from shared.settings import Settings

    # The description depends on no setting; defaults keep a developer's .env out of it anyway.
    return render(create_app(Settings(_env_file=None)).openapi())


def main(argv: list[str]) -> int:
    text = current()
    if "--check" in argv:
        if not DOCUMENT.exists() or DOCUMENT.read_text() != text:
            print(f"{DOCUMENT} is out of date: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    DOCUMENT.write_text(text)
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
