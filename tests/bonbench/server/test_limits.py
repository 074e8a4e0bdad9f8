"""No request stalls the others: an oversized body is refused before it is read, a prompt too long
in characters before it is tokenised, and tokenising a long request leaves the event loop free."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from .conftest import TINY_NAME, assert_error, start_server

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
MB = 2**20
LINE = "The committee met again to discuss the budget. "  # 9 tokens, 48 characters


def _body_of(size: int) -> bytes:
    """A well-formed completion request of about ``size`` bytes."""
    head, tail = f'{{"model": "{TINY_NAME}", "max_tokens": 1, "prompt": "'.encode(), b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _chunks(body: bytes, size: int = MB):
    for start in range(0, len(body), size):
        yield body[start:start + size]


def _good_completion(server) -> None:
    reply = server.post(COMPLETIONS, json={"model": server.model, "prompt": "Once upon", "max_tokens": 2})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_30_mb_body_is_refused_with_413_and_the_server_does_not_hold_it(tiny_server, framing):
    body = _body_of(30 * MB)
    before = tiny_server.rss_bytes()
    # Without a length, httpx sends the generator's pieces chunked, so the server must count as they come.
    content = body if framing == "content-length" else _chunks(body)
    reply = tiny_server.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
    assert_error(reply, 413, "invalid_request_error", param=None, code="request_too_large",
                 message_contains="at most 8 MB")
    assert tiny_server.rss_bytes() - before < 100 * MB
    _good_completion(tiny_server)


def test_a_prompt_longer_in_characters_than_the_context_can_hold_is_refused_untokenised(tiny_server):
    # The tiny model's context is 2048 tokens and no token is longer than 256 characters.
    text = "x" * (2048 * 256 + 1)
    reply = tiny_server.post(COMPLETIONS, json={"model": TINY_NAME, "prompt": text})
    assert_error(reply, 400, "invalid_request_error", param="prompt", code="context_length_exceeded",
                 message_contains=f"{len(text)} characters")
    half = {"role": "user", "content": text[: len(text) // 2 + 1]}
    reply = tiny_server.post(CHAT, json={"model": TINY_NAME, "messages": [half, half]})
    assert_error(reply, 400, "invalid_request_error", param="messages", code="context_length_exceeded",
                 message_contains="characters")
    _good_completion(tiny_server)


# -- a server with a raised body limit and no reward model -----------------------------------------


@pytest.fixture(scope="module")
def big_body_server(tiny_model_path, server_logs):
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--reward-model", "none", "--n", "1",
            "--max-body-mb", "12"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


def test_max_body_mb_sets_the_limit(big_body_server):
    reply = big_body_server.post(COMPLETIONS, content=_body_of(12 * MB + 1),
                                 headers={"content-type": "application/json"})
    assert_error(reply, 413, "invalid_request_error", code="request_too_large", message_contains="at most 12 MB")
    # A body just under the limit, chunked, is read and judged on its content: the prompt is too long.
    reply = big_body_server.post(COMPLETIONS, content=_chunks(_body_of(12 * MB - 1)),
                                 headers={"content-type": "application/json"})
    assert_error(reply, 400, "invalid_request_error", code="context_length_exceeded")
    _good_completion(big_body_server)


def test_health_answers_while_a_long_request_is_being_tokenised(big_body_server):
    """About 5 MB of prompts, each fitting the context but the last: the server tokenises them all,
    for seconds of CPU, before it refuses the request. ``/metrics`` shows the request in flight while
    its prompts are checked; /health must answer meanwhile, before the refusal arrives."""
    server = big_body_server
    prompts = [LINE * 160] * 650 + [LINE * 330]  # 1440 tokens each, then 2970: over the 2048 context
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = {"model": TINY_NAME, "prompt": prompts, "max_tokens": 1}
        refusal = pool.submit(server.post, COMPLETIONS, json=body)
        while server.metric("bonbench_requests_in_flight") < 1:
            assert not refusal.done(), f"the server was never seen checking the request: {refusal.result().text}"
            time.sleep(0.01)
        healths = [httpx.get(f"{server.url}/health", timeout=120) for _ in range(3)]
        still_checking = server.metric("bonbench_requests_in_flight") == 1
        assert_error(refusal.result(), 400, "invalid_request_error", param="prompt", code="context_length_exceeded")
    assert [h.json() for h in healths] == [{"status": "ok"}] * 3
    assert still_checking, "the long request was over before /health had answered three times"
    _good_completion(server)
