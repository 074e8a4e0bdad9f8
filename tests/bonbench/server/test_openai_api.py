"""The OpenAI-compatible API through the official ``openai`` client, on a real Best-of-4 server
(tiny random model, default MiniLM reward)."""

from __future__ import annotations

import httpx
import pytest

from .conftest import TINY_NAME, chat_prompt_tokens, text_prompt_tokens

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarize the following article in one sentence.\n\n"
                                        "The council voted to close the old bridge for repairs next spring."}]


def _bon(response) -> dict:
    bon = response.model_extra["bon"]
    return bon[0] if isinstance(bon, list) else bon


def _assert_top_n_in_reward_order(bon: dict, n: int) -> None:
    rewards = [c["reward"] for c in bon["candidates"]]
    assert len(bon["chosen"]) == n
    assert len(set(bon["chosen"])) == n
    chosen_rewards = [rewards[i] for i in bon["chosen"]]
    assert chosen_rewards == sorted(chosen_rewards, reverse=True), "choices must come best first"
    assert chosen_rewards == sorted(rewards, reverse=True)[:n], "choices must be the n highest rewards"


def test_chat_returns_the_best_candidate_and_counts_every_candidates_tokens(tiny_server, tiny_tokenizer):
    client = tiny_server.client()
    reply = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=8, seed=3,
                                           extra_body={"return_candidates": True})
    assert reply.object == "chat.completion"
    assert reply.model == TINY_NAME
    assert len(reply.choices) == 1
    bon = _bon(reply)
    assert bon["best_of"] == 4 and bon["reward_model"] == "default"
    assert len(bon["candidates"]) == 4
    assert [c["index"] for c in bon["candidates"]] == [0, 1, 2, 3]
    _assert_top_n_in_reward_order(bon, 1)
    best = bon["candidates"][bon["chosen"][0]]
    choice = reply.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == best["text"]
    assert choice.finish_reason == best["finish_reason"]
    assert reply.usage.completion_tokens == sum(c["num_tokens"] for c in bon["candidates"])
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tiny_tokenizer, MESSAGES)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_best_of_in_extra_body_overrides_the_servers_n_and_n_top_choices_come_best_first(tiny_server):
    client = tiny_server.client()
    reply = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=6, n=3, seed=11,
                                           extra_body={"best_of": 7, "return_candidates": True})
    bon = _bon(reply)
    assert bon["best_of"] == 7 and len(bon["candidates"]) == 7
    assert [c.index for c in reply.choices] == [0, 1, 2]
    _assert_top_n_in_reward_order(bon, 3)
    for choice, i in zip(reply.choices, bon["chosen"]):
        assert choice.message.content == bon["candidates"][i]["text"]
    assert reply.usage.completion_tokens == sum(c["num_tokens"] for c in bon["candidates"])


def test_n_above_the_servers_default_draws_n_candidates(tiny_server):
    reply = tiny_server.client().chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=4, n=6,
                                                         extra_body={"return_candidates": True})
    bon = _bon(reply)
    assert len(reply.choices) == 6 and bon["best_of"] == 6
    _assert_top_n_in_reward_order(bon, 6)


def test_completion_returns_the_best_candidate_with_correct_usage(tiny_server, tiny_tokenizer):
    prompt = "The weather in the valley today is"
    reply = tiny_server.client().completions.create(model=TINY_NAME, prompt=prompt, max_tokens=7, n=2, seed=6,
                                                    extra_body={"best_of": 5, "return_candidates": True})
    assert reply.object == "text_completion"
    bon = _bon(reply)
    assert len(bon["candidates"]) == 5
    _assert_top_n_in_reward_order(bon, 2)
    assert [c.text for c in reply.choices] == [bon["candidates"][i]["text"] for i in bon["chosen"]]
    for c in bon["candidates"]:
        assert c["finish_reason"] == "length" and c["num_tokens"] == 7  # a random model never ends early
    assert {c.finish_reason for c in reply.choices} == {"length"}
    assert reply.usage.completion_tokens == 5 * 7
    assert reply.usage.prompt_tokens == text_prompt_tokens(tiny_tokenizer, prompt)


def test_completion_with_a_list_of_prompts_answers_each_prompt_in_order(tiny_server, tiny_tokenizer):
    prompts = ["Once upon a time", "The stock market", "In 1999 the team"]
    reply = tiny_server.client().completions.create(model=TINY_NAME, prompt=prompts, max_tokens=5, n=2, seed=7,
                                                    extra_body={"return_candidates": True})
    bons = reply.model_extra["bon"]
    assert len(bons) == 3 and len(reply.choices) == 6
    assert [c.index for c in reply.choices] == list(range(6))
    for p, bon in enumerate(bons):
        assert bon["best_of"] == 4
        _assert_top_n_in_reward_order(bon, 2)
        texts = [bon["candidates"][i]["text"] for i in bon["chosen"]]
        assert [reply.choices[2 * p + k].text for k in range(2)] == texts
    assert reply.usage.completion_tokens == sum(c["num_tokens"] for b in bons for c in b["candidates"]) == 3 * 4 * 5
    assert reply.usage.prompt_tokens == sum(text_prompt_tokens(tiny_tokenizer, p) for p in prompts)


def test_same_seed_gives_the_same_answer_and_a_different_seed_a_different_one(tiny_server):
    client = tiny_server.client()

    def ask(seed):
        return client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=10, seed=seed,
                                              extra_body={"return_candidates": True})

    first, again, other = ask(1234), ask(1234), ask(4321)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert _bon(first)["candidates"] == _bon(again)["candidates"]
    assert [c["text"] for c in _bon(first)["candidates"]] != [c["text"] for c in _bon(other)["candidates"]]
    # every candidate of one request is a different draw
    assert len({c["text"] for c in _bon(first)["candidates"]}) == 4


def test_a_huge_client_seed_is_reproducible_and_fails_no_request_batched_with_it(tiny_server):
    import concurrent.futures

    client = tiny_server.client()

    def ask(seed):
        return client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=6, seed=seed)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, [2**62, 1, -(2**62), 2]))
    assert all(len(r.choices) == 1 for r in replies)
    assert ask(2**62).choices[0].message.content == replies[0].choices[0].message.content


def test_stop_string_cuts_every_candidate_before_it(tiny_server):
    reply = tiny_server.client().completions.create(model=TINY_NAME, prompt="Tell me more", max_tokens=64,
                                                    stop=["e", "E"], seed=5, extra_body={"return_candidates": True})
    for c in _bon(reply)["candidates"]:
        assert "e" not in c["text"] and "E" not in c["text"]
        # a random model meets an 'e' long before 64 tokens; the token that held it still counts
        assert c["finish_reason"] == "stop" and 1 <= c["num_tokens"] < 64
    assert reply.choices[0].finish_reason == "stop"


def test_stop_string_applies_to_chat(tiny_server):
    reply = tiny_server.client().chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=64,
                                                         stop="a", seed=8, extra_body={"return_candidates": True})
    for c in _bon(reply)["candidates"]:
        assert "a" not in c["text"] and c["finish_reason"] == "stop"
    assert "a" not in reply.choices[0].message.content


def test_finish_reason_is_length_when_max_tokens_is_reached(tiny_server):
    reply = tiny_server.client().chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=3,
                                                         seed=10, extra_body={"return_candidates": True})
    assert reply.choices[0].finish_reason == "length"
    assert all(c["num_tokens"] == 3 for c in _bon(reply)["candidates"])


def test_chat_logprobs_give_each_token_of_the_chosen_answer(tiny_server):
    reply = tiny_server.client().chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=9,
                                                         logprobs=True, seed=21, extra_body={"return_candidates": True})
    bon = _bon(reply)
    best = bon["candidates"][bon["chosen"][0]]
    content = reply.choices[0].logprobs.content
    assert len(content) == best["num_tokens"] == 9
    assert all(isinstance(t.token, str) and t.logprob <= 0 for t in content)
    assert sum(t.logprob for t in content) == pytest.approx(best["logprob"], abs=1e-4)
    if not any("\ufffd" in t.token for t in content):  # a token that is part of a character decodes alone as U+FFFD
        assert "".join(t.token for t in content) == best["text"]
    assert [list(t.token.encode("utf-8")) for t in content] == [t.bytes for t in content]


def test_completion_logprobs_zero_still_returns_each_chosen_token(tiny_server):
    reply = tiny_server.client().completions.create(model=TINY_NAME, prompt="Hello there", max_tokens=6,
                                                    logprobs=0, seed=2, extra_body={"return_candidates": True})
    bon = _bon(reply)
    best = bon["candidates"][bon["chosen"][0]]
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    assert sum(lp.token_logprobs) == pytest.approx(best["logprob"], abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_echo_returns_prompt_and_answer_with_offsets_into_the_whole_text(tiny_server):
    prompt = "Hello there"
    reply = tiny_server.client().completions.create(model=TINY_NAME, prompt=prompt, max_tokens=5, logprobs=0,
                                                    echo=True, seed=4)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.text_offset) == 5
    assert lp.text_offset == [len(prompt) + sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_models_lists_the_served_model(tiny_server):
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == [TINY_NAME]
    assert models.data[0].object == "model"


def test_health_answers_ok(tiny_server):
    response = httpx.get(f"{tiny_server.url}/health", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_metrics_are_prometheus_text_and_count_requests_tokens_and_candidates(tiny_server):
    response = httpx.get(f"{tiny_server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE bonbench_requests_total counter" in response.text
    before = tiny_server.metrics()
    ok = ("bonbench_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    reply = tiny_server.client().chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=5,
                                                         extra_body={"best_of": 6})
    after = tiny_server.metrics()

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert after[ok] - before.get(ok, 0) == 1
    assert grew("bonbench_candidates_total") == 6
    assert grew("bonbench_generation_tokens_total") == reply.usage.completion_tokens
    assert grew("bonbench_prompt_tokens_total") == reply.usage.prompt_tokens
    assert grew("bonbench_request_seconds_count", (("endpoint", "/v1/chat/completions"),)) == 1
    assert grew("bonbench_reward_seconds_total") > 0
    assert after[("bonbench_requests_in_flight", ())] == 0
