"""Early rejection through real servers and the official ``openai`` client: the server's default
(``--early-rejection``), a request's own plan or ``false`` (``extra_body``), what the reply reports
(``bon``, ``usage``, /metrics), and the refusals as OpenAI's 400s.

The servers score with ``letters`` below, a function reward with a ``score_partial`` attribute; a
second server's reward (``whole_answers_only``) has none, and a third fronts the first as an upstream.
"""

from __future__ import annotations

import zlib

import numpy as np
import openai
import pytest

from bonbench.backends.base import prompt_text
from bonbench.rejection import EarlyRejection, estimated_tokens_saved, simulate
from bonbench.serve import ServeConfig

from .conftest import TINY_NAME, assert_error, start_server

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
DEFAULT = "2,4:0.5"


def letters(prompts, responses):
    """Distinct characters of each whole answer."""
    return [float(len(set(r))) for r in responses]


def _partial_hash(prompts, responses):
    """A partial answer's score: a hash of its text into 5 levels (ties happen); raises for a prompt
    that says EXPLODE."""
    if any("EXPLODE" in prompt_text(p) for p in prompts):
        raise ValueError("the partial scorer refuses prompts that say EXPLODE")
    return [float(zlib.crc32(r.encode()) % 5) for r in responses]


letters.score_partial = _partial_hash


def whole_answers_only(prompts, responses):
    return letters(prompts, responses)


@pytest.fixture(scope="module")
def er_server(tiny_model_path, server_logs):
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--n", "8", "--reward-model",
            f"{__name__}:letters", "--early-rejection", DEFAULT, "--default-max-tokens", "8"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


def _chat(server, **extra):
    return server.client().chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=extra.pop("max_tokens", 8), seed=extra.pop("seed", 3),
        n=extra.pop("n", 2), temperature=extra.pop("temperature", 1.0),
        extra_body={"return_candidates": True, **extra})


def _bon(reply) -> dict:
    return reply.model_extra["bon"]


def _expected(plan: EarlyRejection, rejecting: dict, whole: dict, n: int):
    """``simulate`` on the candidates drawn to their end (``whole``), with the partial scores the
    server reported in ``rejecting`` (padded with NaN past the checkpoints a candidate reached)."""
    partial = np.full((len(whole["candidates"]), len(plan.checkpoints)), np.nan)
    for i, c in enumerate(rejecting["candidates"]):
        partial[i, :len(c["partial_scores"])] = c["partial_scores"]
    texts = [c["text"] for c in whole["candidates"]]
    return simulate(plan, partial, [c["num_tokens"] for c in whole["candidates"]], letters(None, texts), n)


def test_the_server_default_rejects_and_the_reply_says_what_it_did(er_server):
    before = {name: er_server.metric(name) for name in (
        "bonbench_rejected_candidates_total", "bonbench_rejection_tokens_saved_total")}
    reply = _chat(er_server)
    bon = _bon(reply)
    whole = _bon(_chat(er_server, early_rejection=False))  # the same seeded candidates, drawn to their end
    assert bon["early_rejection"] == DEFAULT and "early_rejection" not in whole
    cands = bon["candidates"]
    predicted = _expected(EarlyRejection((2, 4), 0.5), bon, whole, n=2)
    assert [c.get("rejected_at", 0) for c in cands] == predicted.rejected_at.tolist()
    assert bon["chosen"] == predicted.chosen.tolist()
    assert [choice.message.content for choice in reply.choices] == [cands[i]["text"] for i in bon["chosen"]]
    for c, w in zip(cands, whole["candidates"]):
        if "rejected_at" in c:  # stopped: its checkpoint's tokens, no reward, no score
            assert c["finish_reason"] == "rejected" and c["num_tokens"] == c["rejected_at"]
            assert "reward" not in c and "score" not in c
        else:  # ran to its end: the very candidate drawn without rejection, scored whole
            assert (c["text"], c["num_tokens"]) == (w["text"], w["num_tokens"])
            assert c["reward"] == letters(None, [c["text"]])[0]
    rejected = [c for c in cands if "rejected_at" in c]
    assert len(rejected) == 6  # 8 running at 2 tokens keep 4; at 4 tokens, 2 (= n) of them
    usage = reply.usage
    assert usage.completion_tokens == sum(c["num_tokens"] for c in cands) < sum(c["num_tokens"] for c in
                                                                                   whole["candidates"])
    assert usage.model_extra["rejected_candidates"] == 6
    saved = estimated_tokens_saved([c["num_tokens"] for c in cands], [c.get("rejected_at", 0) for c in cands])
    assert usage.model_extra["tokens_saved_estimate"] == pytest.approx(saved) and saved > 0
    assert er_server.metric("bonbench_rejected_candidates_total") - before["bonbench_rejected_candidates_total"] == 6
    grown = er_server.metric("bonbench_rejection_tokens_saved_total") - before["bonbench_rejection_tokens_saved_total"]
    assert grown == pytest.approx(saved)


def test_a_request_can_name_its_own_plan_or_turn_the_default_off(er_server):
    bon = _bon(_chat(er_server, early_rejection={"checkpoints": [3], "keep": 0.25}, best_of=6, n=1))
    assert bon["early_rejection"] == "3:0.25"
    assert [c.get("rejected_at") for c in bon["candidates"]].count(3) == 4  # ceil(0.25 * 6) = 2 go on
    bon = _bon(_chat(er_server, early_rejection={"checkpoints": [3], "keep": 0.25}, best_of=6, n=3))
    assert [c.get("rejected_at") for c in bon["candidates"]].count(3) == 3  # at least n = 3 go on
    assert all(len(c["partial_scores"]) == 1 for c in bon["candidates"])
    reply = _chat(er_server, early_rejection=False)
    bon = _bon(reply)
    assert "early_rejection" not in bon
    assert all("rejected_at" not in c and "partial_scores" not in c and c["finish_reason"] != "rejected"
               for c in bon["candidates"])
    assert not reply.usage.model_extra  # the extension fields are there only when early rejection ran


def test_completions_with_several_prompts_sum_the_rejections_in_usage_and_stream_them(er_server):
    client = er_server.client()
    reply = client.completions.create(model=TINY_NAME, prompt=["Once upon a time", "The sea"], max_tokens=6,
                                      seed=1, extra_body={"return_candidates": True})
    bons = reply.model_extra["bon"]
    assert [b["early_rejection"] for b in bons] == [DEFAULT, DEFAULT]
    rejected = sum(c.get("finish_reason") == "rejected" for b in bons for c in b["candidates"])
    assert reply.usage.model_extra["rejected_candidates"] == rejected == 12
    chunks = list(client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=8, seed=3,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].model_extra["rejected_candidates"] == 6  # n = 1: 4 go on at 2 tokens, 2 at 4


def test_the_default_does_not_apply_where_it_cannot_run(er_server):
    assert "early_rejection" not in _bon(_chat(er_server, selection="majority", n=1))
    greedy = _bon(_chat(er_server, temperature=0.0))
    assert "early_rejection" not in greedy and len({c["text"] for c in greedy["candidates"]}) == 1


def test_a_partial_scorer_that_raises_fails_its_request_with_a_500_and_the_server_goes_on(er_server):
    response = er_server.post("/chat/completions", json={
        "model": TINY_NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "Please EXPLODE now."}]})
    error = assert_error(response, 500, "reward_error", message_contains="refuses prompts that say EXPLODE")
    assert f"{__name__}:letters" in error["message"]
    assert _bon(_chat(er_server))["early_rejection"] == DEFAULT


@pytest.mark.parametrize("extra, message", [
    ({"early_rejection": {"checkpoints": [4, 2], "keep": 0.5}}, "checkpoints must increase"),
    ({"early_rejection": {"checkpoints": [0], "keep": 0.5}}, "checkpoints are token counts >= 1"),
    ({"early_rejection": {"checkpoints": [4], "keep": 1.5}}, "keep is the fraction"),
    ({"early_rejection": {"checkpoints": [4]}}, "keep: Field required"),
    ({"early_rejection": {"checkpoints": [], "keep": 0.5}}, "at least one checkpoint"),
    ({"early_rejection": True}, "or false to turn it off"),
    ({"early_rejection": {"checkpoints": [4], "keep": 0.5}, "selection": "majority"}, "ranks no reward"),
    ({"early_rejection": {"checkpoints": [4], "keep": 0.5}, "temperature": 0.0}, "temperature 0"),
])
def test_a_plan_that_cannot_run_is_a_400_at_early_rejection(er_server, extra, message):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(er_server, **extra)
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == "early_rejection"
    assert message in info.value.body["message"]


@pytest.fixture(scope="module")
def whole_only_server(tiny_model_path, server_logs):
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--n", "4", "--reward-model",
            f"{__name__}:whole_answers_only"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


@pytest.fixture(scope="module")
def upstream_server(er_server, server_logs):
    args = ["--upstream", er_server.base_url, "--n", "4", "--reward-model", f"{__name__}:letters"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


@pytest.mark.parametrize("server, message", [
    ("whole_only_server", "cannot score partial answers (it has no score_partial)"),
    ("upstream_server", "only the transformers backend can pause its candidates"),
])
def test_a_server_that_cannot_run_early_rejection_refuses_it_with_a_400(request, server, message):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(request.getfixturevalue(server), early_rejection={"checkpoints": [2], "keep": 0.5})
    assert info.value.body["param"] == "early_rejection" and message in info.value.body["message"]
    assert "early_rejection" not in _bon(_chat(request.getfixturevalue(server), best_of=4))


@pytest.mark.parametrize("options, message", [
    (dict(early_rejection="16;0.5"), "CHECKPOINTS:KEEP"),
    (dict(early_rejection="16:2"), "keep is the fraction"),
    (dict(early_rejection="16:0.5", backend="vllm"), "only the transformers backend"),
    (dict(early_rejection="16:0.5", upstream="http://127.0.0.1:9/v1"), "only the transformers backend"),
    (dict(early_rejection="16:0.5", reward_model="none", n=1), "needs a reward model"),
    (dict(early_rejection="16:0.5", selection="majority"), "not --selection majority"),
])
def test_the_server_option_is_checked_at_start_up(options, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**options)
