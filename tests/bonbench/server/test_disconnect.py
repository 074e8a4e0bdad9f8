"""A client that goes away frees the model: its request is cancelled, counted, and the next
request does not wait behind the abandoned work."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import TINY_NAME

# 32 candidates of 1000 tokens: about a minute of work for the tiny model on two CPU cores.
ABANDONED = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Write a long story."}],
             "max_tokens": 1000, "best_of": 32}
NEXT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_client_timeout_cancels_the_request_and_frees_the_model(tiny_server, stream):
    cancelled = tiny_server.metric("bonbench_requests_cancelled_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{tiny_server.base_url}/chat/completions", json={**ABANDONED, "stream": stream}, timeout=1.0)
    assert _wait_for(lambda: tiny_server.metric("bonbench_requests_cancelled_total") == cancelled + 1, 10), \
        "the server did not notice the client leave"
    assert _wait_for(lambda: tiny_server.metric("bonbench_requests_in_flight") == 0, 10)
    started = time.monotonic()
    reply = httpx.post(f"{tiny_server.base_url}/chat/completions", json=NEXT, timeout=60)
    elapsed = time.monotonic() - started
    assert reply.status_code == 200, reply.text
    assert elapsed < 10, f"the next request waited {elapsed:.1f}s: the abandoned candidates kept the model busy"
