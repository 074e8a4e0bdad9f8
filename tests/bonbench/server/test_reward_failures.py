"""A reward model that fails takes down its own request (a 500 that says why), never its neighbours.

The server under test scores with ``tests.bonbench.server.test_reward_failures:reward_with_traps``,
defined below: it raises, miscounts or returns NaN when the prompt carries a marker word.
"""

from __future__ import annotations

import concurrent.futures
import math

import pytest

from .conftest import TINY_NAME, assert_error, start_server

REWARD_SPEC = f"{__name__}:reward_with_traps"


def reward_with_traps(prompts, responses):
    """Distinct characters of each answer; fails in the way a marker word in the prompt names."""
    from bonbench.backends.base import prompt_text

    texts = [prompt_text(p) for p in prompts]
    if any("EXPLODE" in t for t in texts):
        raise ValueError("the reward refuses prompts that say EXPLODE")
    if any("SHORTCHANGE" in t for t in texts):
        return [1.0] * (len(responses) - 1)
    if any("NOTANUMBER" in t for t in texts):
        return [math.nan] * len(responses)
    return [float(len(set(r))) for r in responses]


@pytest.fixture(scope="module")
def trap_server(tiny_model_path, server_logs):
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--n", "4", "--reward-model", REWARD_SPEC]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


def _chat(server, content: str, **extra):
    return server.post("/chat/completions", json={"model": TINY_NAME, "max_tokens": 12,
                                                  "messages": [{"role": "user", "content": content}], **extra})


def test_a_raising_reward_fails_only_its_request_with_a_clear_500(trap_server):
    prompts = ["Say hello.", "Please EXPLODE now.", "Tell a story.", "Count to ten.", "Name a colour.",
               "Pick a fruit."]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: _chat(trap_server, p, return_candidates=True), prompts))
    for prompt, reply in zip(prompts, replies):
        if "EXPLODE" in prompt:
            error = assert_error(reply, 500, "reward_error", message_contains="the reward refuses prompts")
            assert REWARD_SPEC in error["message"] and "ValueError" in error["message"]
        else:
            assert reply.status_code == 200, reply.text
            body = reply.json()
            rewards = [c["reward"] for c in body["bon"]["candidates"]]
            assert rewards == [float(len(set(c["text"]))) for c in body["bon"]["candidates"]]
            best = rewards.index(max(rewards))  # the first of equal rewards wins
            assert body["choices"][0]["message"]["content"] == body["bon"]["candidates"][best]["text"]
    assert _chat(trap_server, "Still fine?").status_code == 200


@pytest.mark.parametrize("marker, words", [("SHORTCHANGE", "returned 3 scores for 4"), ("NOTANUMBER", "NaN")])
def test_a_reward_returning_a_wrong_count_or_nan_is_a_500_that_says_so(trap_server, marker, words):
    assert_error(_chat(trap_server, f"Hello {marker}"), 500, "reward_error", message_contains=words)
    assert _chat(trap_server, "Hello").status_code == 200


def test_a_raising_reward_in_a_completion_or_a_stream_still_answers_with_a_status(trap_server):
    reply = trap_server.post("/completions", json={"model": TINY_NAME, "prompt": ["ok", "EXPLODE"], "max_tokens": 4})
    assert_error(reply, 500, "reward_error")
    assert_error(_chat(trap_server, "EXPLODE", stream=True), 500, "reward_error")
    assert _chat(trap_server, "fine", stream=True).status_code == 200


def test_reward_failures_are_counted_as_500s(trap_server):
    key = ("bonbench_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "500")))
    before = trap_server.metrics().get(key, 0)
    _chat(trap_server, "EXPLODE")
    assert trap_server.metrics()[key] == before + 1
