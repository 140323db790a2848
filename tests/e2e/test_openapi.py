"""The protocol in OpenAPI: what ``document_tasks`` adds, read from the served schemas, and a
``schemathesis`` run against the served FastAPI example: no response contradicts the schema."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import jsonschema
import pytest

from async_task_middleware import ConfigurationError, tasks_openapi

pytestmark = pytest.mark.anyio


async def test_the_fastapi_schema_shows_the_protocol(served_example: str) -> None:
    async with httpx.AsyncClient(base_url=served_example) as client:
        schema = (await client.get("/openapi.json")).json()
        assert (await client.get("/docs")).status_code == 200
    submit = schema["paths"]["/words"]["post"]
    assert submit["responses"]["303"]["headers"]["Location"]
    assert {"Prefer", "Idempotency-Key"} <= {p["name"] for p in submit["parameters"]}
    assert submit["responses"]["503"]["content"]["application/problem+json"]
    status = schema["paths"]["/words/{task_id}"]
    got = status["get"]["responses"]
    ref = got["202"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/AsyncTaskStatus"
    # The endpoint's own 200 is the result's.
    assert got["200"] == submit["responses"]["200"]
    assert {"404", "500"} <= set(got)
    assert set(status["delete"]["responses"]) >= {"204", "404"}
    # The status path's live answers (schemathesis cannot make a task): each one as documented.
    async with httpx.AsyncClient(base_url=served_example) as client:
        response = await client.post("/words", files={"text": ("t.txt", b"a b c " * 200_000)})
        location = response.headers["location"]
        seen: set[int] = set()
        while 200 not in seen:
            answer = await client.get(location)
            seen.add(answer.status_code)
            documented = got[str(answer.status_code)]["content"]["application/json"]["schema"]
            jsonschema.validate(answer.json(), {**documented, "components": schema["components"]})
        missing = await client.get(location.rsplit("/", 1)[0] + "/" + str(uuid.uuid4()))
        documented = got["404"]["content"]["application/problem+json"]["schema"]
        jsonschema.validate(missing.json(), {**documented, "components": schema["components"]})


def test_the_litestar_schema_shows_the_protocol() -> None:
    from examples.wordcount.litestar_app import litestar_app

    schema = next(
        plugin.provide_openapi_schema()
        for plugin in litestar_app.plugins
        if hasattr(plugin, "provide_openapi_schema")
    )
    assert "303" in schema["paths"]["/words"]["post"]["responses"]
    assert "202" in schema["paths"]["/words/{task_id}"]["get"]["responses"]


def test_a_route_missing_from_the_schema_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="POST /nowhere"):
        tasks_openapi({"paths": {}}, ["POST /nowhere"])


def test_path_parameters_carry_over_to_the_status_path() -> None:
    schema = {
        "paths": {
            "/reports/{year}": {
                "put": {
                    "parameters": [{"name": "year", "in": "path", "required": True}],
                    "responses": {"200": {"description": "ok"}},
                }
            }
        }
    }
    tasks_openapi(schema, ["PUT /reports/{year:int}"])
    names = [p["name"] for p in schema["paths"]["/reports/{year}/{task_id}"]["parameters"]]
    assert names == ["year", "task_id"]


def test_the_webhook_headers_and_payload_are_documented() -> None:
    schema = {"paths": {"/words": {"post": {"responses": {"200": {"description": "ok"}}}}}}
    tasks_openapi(schema, ["POST /words"])
    headers = [p["name"] for p in schema["paths"]["/words"]["post"]["parameters"]]
    assert {"Webhook-URL", "Webhook-Events"} <= set(headers)
    body = schema["webhooks"]["asyncTaskEvent"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"].endswith("/AsyncTaskWebhookEvent")
    event = schema["components"]["schemas"]["AsyncTaskWebhookEvent"]
    assert event["properties"]["data"]["required"] == ["task_id", "location", "route", "status"]


def test_schemathesis_finds_no_response_that_contradicts_the_schema(served_example: str) -> None:
    checks = ",".join(
        [
            "not_a_server_error",
            "status_code_conformance",
            "content_type_conformance",
            "response_headers_conformance",
            "response_schema_conformance",
        ]
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{served_example}/openapi.json",
            "--checks",
            checks,
            "--max-examples",
            "25",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
