"""Every bad input gets its HTTP status and OpenAI's nested error body
``{"error": {"message", "type", "param", "code"}}``, before any model work; after each, a good
request still succeeds."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from .conftest import TINY_NAME, assert_error, start_server

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
GOOD_MESSAGES = [{"role": "user", "content": "Say something."}]


def good_chat(server) -> dict:
    reply = server.post(CHAT, json={"model": server.model, "messages": GOOD_MESSAGES, "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1
    return reply.json()


def _chat(**fields) -> dict:
    return {"model": TINY_NAME, "messages": GOOD_MESSAGES, "max_tokens": 4, **fields}


# (name, endpoint, body, status, type, param, code, words the message must contain)
BAD_REQUESTS = [
    ("missing model", CHAT, {"messages": GOOD_MESSAGES}, 400, "invalid_request_error", "model", None, "model"),
    ("missing messages", CHAT, {"model": TINY_NAME}, 400, "invalid_request_error", "messages", None, "messages"),
    ("empty messages", CHAT, _chat(messages=[]), 400, "invalid_request_error", "messages", None, "at least 1"),
    ("messages not a list", CHAT, _chat(messages="hi"), 400, "invalid_request_error", "messages", None, "list"),
    ("unknown role", CHAT, _chat(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_request_error",
     "messages.0.role", None, "role"),
    ("image content part", CHAT,
     _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
     400, "invalid_request_error", "messages.0.content", None, "text"),
    ("n zero", CHAT, _chat(n=0), 400, "invalid_request_error", "n", None, "greater than or equal to 1"),
    ("n not a number", CHAT, _chat(n="three"), 400, "invalid_request_error", "n", None, "integer"),
    ("n above max best_of", CHAT, _chat(n=65), 400, "invalid_request_error", "n", None, "at most 64"),
    ("best_of zero", CHAT, _chat(best_of=0), 400, "invalid_request_error", "best_of", None, "greater than"),
    ("best_of above max", CHAT, _chat(best_of=65), 400, "invalid_request_error", "best_of", None, "at most 64"),
    ("best_of below n", CHAT, _chat(n=3, best_of=2), 400, "invalid_request_error", "best_of", None,
     "at least n"),
    ("max_tokens over limit", CHAT, _chat(max_tokens=1025), 400, "invalid_request_error", "max_tokens", None,
     "at most 1024"),
    ("max_completion_tokens over limit", CHAT, _chat(max_completion_tokens=5000), 400, "invalid_request_error",
     "max_tokens", None, "at most 1024"),
    ("max_tokens zero", CHAT, _chat(max_tokens=0), 400, "invalid_request_error", "max_tokens", None,
     "greater than"),
    ("temperature too high", CHAT, _chat(temperature=2.5), 400, "invalid_request_error", "temperature", None,
     "less than or equal to 2"),
    ("top_p zero", CHAT, _chat(top_p=0), 400, "invalid_request_error", "top_p", None, "greater than 0"),
    ("prompt and max_tokens exceed the model context", CHAT,
     _chat(messages=[{"role": "user", "content": "word " * 1200}], max_tokens=1000), 400,
     "invalid_request_error", "messages", "context_length_exceeded", "context"),
    ("completion without prompt", COMPLETIONS, {"model": TINY_NAME}, 400, "invalid_request_error", "prompt", None,
     "prompt"),
    ("completion with an empty prompt list", COMPLETIONS, {"model": TINY_NAME, "prompt": []}, 400,
     "invalid_request_error", "prompt", None, "empty"),
    ("completion with an empty prompt", COMPLETIONS, {"model": TINY_NAME, "prompt": "", "max_tokens": 3}, 400,
     "invalid_request_error", "prompt", None, "empty"),
    ("completion asks for top alternatives", COMPLETIONS, {"model": TINY_NAME, "prompt": "a", "logprobs": 2}, 400,
     "invalid_request_error", "logprobs", None, "less than or equal to 0"),
    ("chat asks for top alternatives", CHAT, _chat(logprobs=True, top_logprobs=3), 400,
     "invalid_request_error", "top_logprobs", None, "less than or equal to 0"),
    ("completion best_of below n", COMPLETIONS, {"model": TINY_NAME, "prompt": "a", "n": 5, "best_of": 4}, 400,
     "invalid_request_error", "best_of", None, "at least n"),
    ("unknown model in chat", CHAT, _chat(model="gpt-9"), 404, "invalid_request_error", "model",
     "model_not_found", "gpt-9"),
    ("unknown model in completion", COMPLETIONS, {"model": "gpt-9", "prompt": "a"}, 404, "invalid_request_error",
     "model", "model_not_found", "gpt-9"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_an_openai_error_body(tiny_server, case):
    _, endpoint, body, status, type_, param, code, words = case
    assert_error(tiny_server.post(endpoint, json=body), status, type_, param=param, code=code,
                 message_contains=words)
    good_chat(tiny_server)


def test_a_mixed_batch_of_prompts_with_one_empty_fails_whole_request_with_400_before_generating(tiny_server):
    before = tiny_server.metric("bonbench_candidates_total")
    reply = tiny_server.post(COMPLETIONS, json={"model": TINY_NAME, "prompt": ["fine", ""], "max_tokens": 3})
    assert_error(reply, 400, "invalid_request_error", param="prompt")
    assert tiny_server.metric("bonbench_candidates_total") == before
    good_chat(tiny_server)


def test_invalid_json_is_a_400(tiny_server):
    reply = tiny_server.post(CHAT, content=b'{"model": "tiny-random", "messages": [', 
                             headers={"content-type": "application/json"})
    assert_error(reply, 400, "invalid_request_error", param=None, message_contains="not valid JSON")
    reply = tiny_server.post(COMPLETIONS, content=b"[1, 2, 3]", headers={"content-type": "application/json"})
    assert_error(reply, 400, "invalid_request_error")
    good_chat(tiny_server)


def test_unknown_routes_are_404_with_an_error_body(tiny_server):
    assert_error(httpx.get(f"{tiny_server.url}/v1/engines", timeout=10), 404, "invalid_request_error",
                 message_contains="/v1/engines")
    assert_error(httpx.post(f"{tiny_server.url}/nothing/here", json={}, timeout=10), 404,
                 "invalid_request_error")
    assert_error(httpx.get(f"{tiny_server.url}/v1/chat/completions", timeout=10), 405, "invalid_request_error")
    good_chat(tiny_server)


def test_unknown_routes_do_not_add_a_metrics_series_each(tiny_server):
    for i in range(5):
        httpx.get(f"{tiny_server.url}/v1/random-{i}", timeout=10)
    endpoints = {labels for (name, labels) in tiny_server.metrics() if name == "bonbench_requests_total"}
    assert not any("random-" in value for labels in endpoints for _, value in labels), endpoints


def test_openai_client_raises_its_typed_errors(tiny_server):
    client = tiny_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY_NAME, messages=GOOD_MESSAGES, max_tokens=99999)
    assert info.value.status_code == 400 and info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="a")
    assert info.value.body["code"] == "model_not_found"


# -- a server with an API key, a short prompt limit and room for one request at a time ------------


@pytest.fixture(scope="module")
def strict_server(tiny_model_path, server_logs):
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--reward-model", "none", "--n", "1",
            "--max-prompt-tokens", "64", "--max-in-flight", "1"]
    with start_server(args, server_logs, model=TINY_NAME, api_key="sesame") as server:
        yield server


def test_missing_or_wrong_api_key_is_401_while_health_and_metrics_stay_open(strict_server):
    url = strict_server.base_url
    body = {"model": TINY_NAME, "messages": GOOD_MESSAGES, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        for path in (CHAT, "/models"):
            reply = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=10) if path == CHAT else \
                httpx.get(f"{url}{path}", headers=headers, timeout=10)
            assert_error(reply, 401, "authentication_error", code="invalid_api_key")
    assert httpx.get(f"{strict_server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{strict_server.url}/metrics", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        strict_server.client(api_key="wrong").models.list()
    assert [m.id for m in strict_server.client().models.list().data] == [TINY_NAME]
    good_chat(strict_server)


def test_prompt_over_max_prompt_tokens_is_400_context_length_exceeded(strict_server):
    long_text = "The committee met again to discuss the budget. " * 12
    reply = strict_server.post(CHAT, json={"model": TINY_NAME, "messages": [{"role": "user", "content": long_text}]})
    assert_error(reply, 400, "invalid_request_error", param="messages", code="context_length_exceeded",
                 message_contains="at most 64")
    reply = strict_server.post(COMPLETIONS, json={"model": TINY_NAME, "prompt": ["short", long_text]})
    assert_error(reply, 400, "invalid_request_error", param="prompt", code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as info:
        strict_server.client().completions.create(model=TINY_NAME, prompt=long_text)
    assert info.value.body["code"] == "context_length_exceeded"
    good_chat(strict_server)


def test_best_of_above_n_without_a_reward_model_is_400(strict_server):
    reply = strict_server.post(CHAT, json={"model": TINY_NAME, "messages": GOOD_MESSAGES, "best_of": 4})
    assert_error(reply, 400, "invalid_request_error", param="best_of", message_contains="reward")
    good_chat(strict_server)


def test_requests_beyond_max_in_flight_get_503_and_the_rest_200(strict_server):
    rejected_before = strict_server.metric("bonbench_requests_rejected_total")
    body = {"model": TINY_NAME, "messages": GOOD_MESSAGES, "max_tokens": 300, "n": 4}

    def one(_):
        return strict_server.post(CHAT, json=body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) == {200, 503}, statuses
    for reply in replies:
        if reply.status_code == 503:
            assert_error(reply, 503, "server_overloaded", message_contains="busy")
        else:
            assert len(reply.json()["choices"]) == 4
    assert strict_server.metric("bonbench_requests_rejected_total") - rejected_before == statuses.count(503)
    deadline = time.monotonic() + 30
    while strict_server.metric("bonbench_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.1)
    good_chat(strict_server)


def test_a_sliding_window_model_is_served_up_to_its_window_and_refuses_beyond_it(tmp_path, tiny_tokenizer,
                                                                                 server_logs):
    from tests.sliding_models import WINDOW, save_sliding_model

    folder = save_sliding_model(tmp_path / "sliding", tiny_tokenizer)
    args = ["--model", str(folder), "--served-model-name", "sliding", "--reward-model", "none", "--n", "1"]
    prompt = "The committee met again to discuss the budget."
    fits = WINDOW - len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with start_server(args, server_logs, model="sliding") as server:
        with pytest.raises(openai.BadRequestError) as info:
            server.client().completions.create(model="sliding", prompt=prompt, max_tokens=fits + 1)
        assert info.value.body["code"] == "context_length_exceeded"
        assert f"context of {WINDOW} tokens" in info.value.body["message"]
        reply = server.client().completions.create(model="sliding", prompt=prompt, max_tokens=fits)
        assert reply.choices[0].finish_reason in ("stop", "length")
