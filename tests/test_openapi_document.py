"""The OpenAPI description is made for client generators, and docs/openapi.json is the running one:
readable and stable operation ids, one tag per operation, every error answer with its schema, an
example (that the body's schema accepts) beside every request body, and the Idempotency-Key header
on exactly the creating routes."""

import json
import re
from typing import Any

import jsonschema
import pytest

from services.gateway import openapi_document
from services.gateway.app import create_app
from shared.settings import Settings

CREATING = {
    ("post", "/api/jobs"),
    ("post", "/api/jobs/{job_id}/retry"),
    ("post", "/api/jobs/{job_id}/redo"),
    ("post", "/api/uploads"),
    ("post", "/api/datasets"),
    ("post", "/api/groups"),
    ("post", "/api/downloads"),
    ("post", "/api/exports"),
    ("post", "/api/batches"),
    ("post", "/api/batches/{batch_id}/jobs"),
    ("post", "/api/queue/retry"),
    ("post", "/api/queue/enqueue"),
    ("post", "/api/queue/redo"),
    ("post", "/api/generations/{job_id}/retry"),
}


@pytest.fixture(scope="module")
def description() -> dict[str, Any]:
    return create_app(Settings(_env_file=None)).openapi()


def operations(description: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in description["paths"].items() for method, op in ops.items()]


def test_the_checked_in_description_is_the_running_one(description: dict[str, Any]) -> None:
    checked_in = json.loads(openapi_document.DOCUMENT.read_text())
    assert checked_in == description, "docs/openapi.json is out of date: run `make openapi` and commit it"
    assert openapi_document.main(["--check"]) == 0


def test_operation_ids_are_unique_camel_case_names(description: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(description)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)*", op_id) for op_id in ids), ids
    by_route = {(method, path): op["operationId"] for method, path, op in operations(description)}
    assert by_route[("post", "/api/jobs")] == "submitJob"
    assert by_route[("get", "/api/jobs/{job_id}/status")] == "getJobStatus"


def test_every_operation_has_one_described_tag(description: dict[str, Any]) -> None:
    declared = {tag["name"] for tag in description["tags"]}
    assert all(tag.get("description") for tag in description["tags"])
    for method, path, op in operations(description):
        assert len(op.get("tags", [])) == 1 and op["tags"][0] in declared, (method, path, op.get("tags"))


def test_every_error_answer_has_its_schema(description: dict[str, Any]) -> None:
    schemas = description["components"]["schemas"]
    for method, path, op in operations(description):
        for code, answer in op["responses"].items():
            if code[0] not in "45":
                continue
            schema = answer.get("content", {}).get("application/json", {}).get("schema")
            assert schema, (method, path, code)
            refs = [ref.rsplit("/", 1)[1] for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema))]
            assert refs and all(ref in schemas for ref in refs), (method, path, code, refs)
            # The API's errors are problems; /readyz's 503 is the readiness report itself.
            assert not path.startswith("/api/") or all("Problem" in ref for ref in refs), (method, path, code, refs)


def test_every_request_body_has_examples_its_schema_accepts(description: dict[str, Any]) -> None:
    for method, path, op in operations(description):
        for media_type, media in op.get("requestBody", {}).get("content", {}).items():
            examples = media.get("examples")
            assert examples, (method, path, media_type)
            if media_type != "application/json":
                continue  # multipart: files, which an example can only name
            # Resolved against the whole description: its $refs point into components.
            schema = {**media["schema"], "components": description["components"]}
            for name, example in examples.items():
                errors = list(jsonschema.Draft202012Validator(schema).iter_errors(example["value"]))
                assert not errors, (op["operationId"], name, [error.message for error in errors])


def test_exactly_the_creating_routes_take_an_idempotency_key(description: dict[str, Any]) -> None:
    taking = {
        (method, path)
        for method, path, op in operations(description)
        if any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in op.get("parameters", []))
    }
    assert taking == CREATING
    for method, path in CREATING:
        answer = description["paths"][path][method]["responses"]["409"]
        assert "Idempotency-Key is still running" in answer["description"]
