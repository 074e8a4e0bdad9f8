"""The OpenAPI document tells the truth: every status the server answers with, each error with its
body's schema; schemathesis, fuzzing from that document, finds no server error and no reply the
document does not describe. Unknown request fields are ignored and logged."""

from __future__ import annotations

import httpx
import pytest

from .conftest import TINY_NAME, start_server

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
ERROR_STATUSES = {"400", "401", "404", "413", "500", "502", "503"}


def _openapi(server) -> dict:
    reply = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_openapi_lists_every_status_with_the_error_body_schema(tiny_server):
    doc = _openapi(tiny_server)
    for path in GENERATION_PATHS:
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200"} | ERROR_STATUSES, (path, sorted(responses))
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        for status in ERROR_STATUSES:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status, schema)
    assert set(doc["paths"]["/v1/models"]["get"]["responses"]) == {"200", "401"}
    schemas = doc["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    # Validation failures are 400s with the error body: FastAPI's 422 must not be promised anywhere.
    assert not any("422" in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    assert "HTTPValidationError" not in schemas


def test_unknown_request_fields_are_ignored_and_logged(tiny_server):
    client = tiny_server.client()
    reply = client.chat.completions.create(
        model=TINY_NAME, max_tokens=2,
        messages=[{"role": "user", "content": "Hello", "mood_unknown_field": "calm"}],
        extra_body={"frobnicate_unknown_field": 3},
    )
    assert reply.choices[0].message.content is not None
    log = tiny_server.log_tail(20000)
    assert "ChatCompletionRequest: ignored unknown fields frobnicate_unknown_field" in log, log[-2000:]
    assert "ChatMessage: ignored unknown fields mood_unknown_field" in log, log[-2000:]


# -- fuzzing ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_path, server_logs):
    """Best-of-2 with the default reward; small limits bound the work any one fuzzed request can ask for."""
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--n", "2", "--reward-model", "default",
            "--max-best-of", "4", "--max-tokens", "8", "--default-max-tokens", "4"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


def test_schemathesis_finds_no_server_error_and_no_undocumented_reply(fuzz_server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    doc = _openapi(fuzz_server)
    # The model name filled in, so that fuzzed requests get past the 404 and reach generation.
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        doc["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [TINY_NAME]}
    schema = schemathesis.openapi.from_dict(doc)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    fuzzed = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=15, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case):
            case.call_and_validate(base_url=fuzz_server.url, checks=checks, timeout=120)

        call()
        fuzzed += 1
    assert fuzzed == 5  # /health, /metrics, /v1/models and the two generation endpoints
    assert fuzz_server.metric("bonbench_candidates_total") > 0, "no fuzzed request reached generation"
    assert httpx.get(f"{fuzz_server.url}/health", timeout=10).status_code == 200
