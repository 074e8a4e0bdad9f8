"""A client that goes away frees the model: its request is cancelled, counted, its candidates stop
where they are, and the next request is answered."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import TINY_NAME

# 32 candidates of 1000 tokens: about a minute of work for the tiny model on two CPU cores, against
# a client that waits one second. With this seed none of the 32 draws EOS within 1000 tokens, so a
# candidate ends only by running to max_tokens or by being stopped by the cancellation.
ABANDONED = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Write a long story."}],
             "max_tokens": 1000, "best_of": 32, "seed": 0}
NEXT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}


def _wait_for(predicate, seconds: float) -> bool:
    """Poll until ``predicate()`` holds; ``seconds`` only guards against a hang."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_client_timeout_cancels_the_request_and_stops_its_candidates(tiny_server, stream):
    before = {name: tiny_server.metric(name) for name in (
        "bonbench_requests_cancelled_total", "bonbench_cancelled_candidates_total", "bonbench_cancelled_tokens_total")}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{tiny_server.base_url}/chat/completions", json={**ABANDONED, "stream": stream}, timeout=1.0)
    assert _wait_for(lambda: tiny_server.metric("bonbench_requests_cancelled_total")
                     == before["bonbench_requests_cancelled_total"] + 1, 120), "the server did not notice the client leave"
    assert _wait_for(lambda: tiny_server.metric("bonbench_requests_in_flight") == 0, 120)

    # One worker serves batches in turn: the next request runs once the abandoned batch has ended,
    # and the backend counts the candidates it stopped before it moves on.
    reply = httpx.post(f"{tiny_server.base_url}/chat/completions", json=NEXT, timeout=300)
    assert reply.status_code == 200, reply.text
    stopped = tiny_server.metric("bonbench_cancelled_candidates_total") - before["bonbench_cancelled_candidates_total"]
    drawn = tiny_server.metric("bonbench_cancelled_tokens_total") - before["bonbench_cancelled_tokens_total"]
    assert stopped == ABANDONED["best_of"], "the abandoned candidates were not stopped: they ran to their end"
    assert drawn < ABANDONED["best_of"] * ABANDONED["max_tokens"]
