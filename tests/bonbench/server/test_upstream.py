"""Upstream mode: a Best-of-4 front (``--upstream``) scoring candidates drawn by a plain
single-sample server (``--reward-model none --n 1``), the way it fronts a ``vllm serve`` fleet."""

from __future__ import annotations

import httpx
import pytest

from bonbench.server.launch import free_port

from .conftest import TINY_NAME, assert_error, chat_prompt_tokens, start_server, text_prompt_tokens

MESSAGES = [{"role": "user", "content": "Summarize the following article in one sentence.\n\n"
                                        "The harbour reopened after a week of storms."}]


def shortest_first(prompts, responses):
    """A reward for the front with a dead upstream (it never gets to score)."""
    return [-float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def plain_server(tiny_model_path, server_logs):
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--reward-model", "none", "--n", "1",
            "--max-tokens", "64", "--default-max-tokens", "16"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


@pytest.fixture(scope="module")
def front_server(plain_server, server_logs):
    # No --served-model-name and no --upstream-model: the front names itself after the upstream's model.
    args = ["--upstream", plain_server.base_url, "--n", "4", "--reward-model", "default"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


def _bon(reply) -> dict:
    bon = reply.model_extra["bon"]
    return bon[0] if isinstance(bon, list) else bon


def test_front_chat_scores_four_upstream_candidates_with_their_token_counts_and_logprobs(front_server, tiny_tokenizer):
    # The front's first request: its upstream connection must work on the server's own event loop.
    reply = front_server.client().chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=6,
                                                          seed=1, extra_body={"return_candidates": True})
    bon = _bon(reply)
    assert bon["best_of"] == 4 and bon["reward_model"] == "default"
    assert len(bon["candidates"]) == 4
    for c in bon["candidates"]:
        assert c["num_tokens"] == 6 and c["finish_reason"] == "length"
        assert isinstance(c["logprob"], float) and c["logprob"] < 0
        assert isinstance(c["reward"], float)
    rewards = [c["reward"] for c in bon["candidates"]]
    assert rewards[bon["chosen"][0]] == max(rewards)
    assert reply.choices[0].message.content == bon["candidates"][bon["chosen"][0]]["text"]
    assert reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tiny_tokenizer, MESSAGES)


def test_front_completion_scores_four_upstream_candidates_with_their_token_counts_and_logprobs(front_server,
                                                                                               tiny_tokenizer):
    prompts = ["The river", "A small town"]
    reply = front_server.client().completions.create(model=TINY_NAME, prompt=prompts, max_tokens=5, n=2, seed=2,
                                                     extra_body={"return_candidates": True})
    bons = reply.model_extra["bon"]
    assert len(bons) == 2 and len(reply.choices) == 4
    for bon in bons:
        assert len(bon["candidates"]) == 4
        assert all(c["num_tokens"] == 5 and isinstance(c["logprob"], float) for c in bon["candidates"])
        rewards = [c["reward"] for c in bon["candidates"]]
        assert [rewards[i] for i in bon["chosen"]] == sorted(rewards, reverse=True)[:2]
    assert reply.usage.completion_tokens == 2 * 4 * 5
    assert reply.usage.prompt_tokens == sum(text_prompt_tokens(tiny_tokenizer, p) for p in prompts)


def test_front_passes_chat_token_logprobs_and_seed_through(front_server):
    client = front_server.client()
    kw = dict(model=TINY_NAME, messages=MESSAGES, max_tokens=7, seed=99, logprobs=True,
              extra_body={"return_candidates": True})
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert first.choices[0].message.content == again.choices[0].message.content
    best = _bon(first)["candidates"][_bon(first)["chosen"][0]]
    content = first.choices[0].logprobs.content
    assert len(content) == 7
    assert sum(t.logprob for t in content) == pytest.approx(best["logprob"], abs=1e-4)


def test_front_streams_the_chosen_answer(front_server):
    client = front_server.client()
    kw = dict(model=TINY_NAME, messages=MESSAGES, max_tokens=8, seed=4)
    plain = client.chat.completions.create(**kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == plain.choices[0].message.content


def test_upstream_refusal_is_a_400_from_the_front(front_server):
    # the upstream allows max_tokens up to 64, the front up to 1024
    reply = front_server.post("/chat/completions", json={"model": TINY_NAME, "messages": MESSAGES, "max_tokens": 100})
    assert_error(reply, 400, "invalid_request_error", message_contains="max_tokens")
    assert front_server.post("/chat/completions", json={"model": TINY_NAME, "messages": MESSAGES,
                                                        "max_tokens": 3}).status_code == 200


def test_upstream_that_is_down_gives_502_and_the_front_stays_up(server_logs):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    args = ["--upstream", dead, "--upstream-model", TINY_NAME, "--n", "4",
            "--reward-model", f"{__name__}:shortest_first"]
    with start_server(args, server_logs, model=TINY_NAME) as front:
        for path, body in (("/chat/completions", {"messages": MESSAGES}), ("/completions", {"prompt": "hi"})):
            reply = front.post(path, json={"model": TINY_NAME, "max_tokens": 4, **body})
            assert_error(reply, 502, "upstream_error", message_contains="unreachable")
        assert httpx.get(f"{front.url}/health", timeout=10).status_code == 200
        assert front.metric("bonbench_requests_total", endpoint="/v1/completions", status="502") == 1
