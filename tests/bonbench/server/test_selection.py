"""Selection rules through real servers and the official ``openai`` client: per request
(``extra_body: {"selection": ..., "selection_params": ...}``) on the shared Best-of-4 server with the
default reward, at start-up (``--selection``) on a server without a reward model, and the refusals
as OpenAI's JSON errors."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from bonbench.select import Candidates, Majority, normalize_answer
from bonbench.serve import ServeConfig

from .conftest import TINY_NAME, start_server

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]


def _bon(reply) -> dict:
    return reply.model_extra["bon"]


def _chat(server, **extra):
    return server.client().chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=extra.pop("max_tokens", 4), seed=extra.pop("seed", 7),
        temperature=extra.pop("temperature", 1.0), extra_body={"return_candidates": True, **extra})


# ---------------------------------------------------------------------------------------
# Per request, on the shared server with the default reward


def test_the_default_selection_is_argmax_of_the_reward_and_reports_it(tiny_server):
    bon = _bon(_chat(tiny_server))
    assert bon["selection"] == "argmax" and bon["selection_params"] == {}
    rewards = [c["reward"] for c in bon["candidates"]]
    assert [c["score"] for c in bon["candidates"]] == rewards
    assert bon["chosen"] == [int(np.argmax(rewards))]


def test_majority_per_request_keeps_the_most_frequent_answer_without_scoring(tiny_server):
    # At temperature 0.08 the tiny model mostly writes a bare newline, an empty answer, and now and then a word
    reply = _chat(tiny_server, selection="majority", best_of=8, max_tokens=1, temperature=0.08)
    bon = _bon(reply)
    assert bon["selection"] == "majority" and bon["best_of"] == 8
    texts = [c["text"] for c in bon["candidates"]]
    expected = Majority().choose(Candidates(texts, np.ones(8)), 1, np.random.default_rng())
    assert bon["chosen"] == expected.chosen.tolist()
    assert [c["score"] for c in bon["candidates"]] == [float(v) for v in expected.scores]
    assert all("reward" not in c for c in bon["candidates"])  # a reward-free rule does not score (null: left out)
    assert reply.choices[0].message.content == texts[bon["chosen"][0]]
    answers = [normalize_answer(t) for t in texts]
    assert "" in answers and answers.count("") > 1  # the empty answer is the most frequent text ...
    assert normalize_answer(reply.choices[0].message.content) != ""  # ... but casts no vote


def test_soft_per_request_reports_softmax_probabilities_and_a_seed_fixes_its_draw(tiny_server):
    bons = [_bon(_chat(tiny_server, selection="soft", selection_params={"temperature": 0.05}, seed=11))
            for _ in range(2)]
    assert bons[0]["chosen"] == bons[1]["chosen"]
    bon = bons[0]
    assert bon["selection"] == "soft" and bon["selection_params"] == {"temperature": 0.05}
    rewards = np.array([c["reward"] for c in bon["candidates"]])
    expected = np.exp((rewards - rewards.max()) / 0.05)
    np.testing.assert_allclose([c["score"] for c in bon["candidates"]], expected / expected.sum(), rtol=1e-6)


def test_regularized_per_request_scores_reward_minus_beta_times_length(tiny_server):
    bon = _bon(_chat(tiny_server, selection="regularized", selection_params={"beta": 0.05}, max_tokens=12,
                     stop=["."]))
    assert bon["selection_params"] == {"beta": 0.05, "penalty": "length"}
    scores = [c["reward"] - 0.05 * c["num_tokens"] for c in bon["candidates"]]
    np.testing.assert_allclose([c["score"] for c in bon["candidates"]], scores)
    assert bon["chosen"] == [int(np.argmax(scores))]


def test_regularized_by_logprob_reads_the_candidates_log_probability(tiny_server):
    bon = _bon(_chat(tiny_server, selection="regularized", selection_params={"beta": 0.1, "penalty": "logprob"}))
    scores = [c["reward"] + 0.1 * c["logprob"] for c in bon["candidates"]]
    np.testing.assert_allclose([c["score"] for c in bon["candidates"]], scores)
    assert bon["chosen"] == [int(np.argmax(scores))]


def test_self_certainty_per_request_keeps_the_most_certain_candidate(tiny_server):
    reply = tiny_server.client().completions.create(
        model=TINY_NAME, prompt=["Once upon a time", "The weather"], max_tokens=5, n=2, seed=3,
        extra_body={"selection": "self-certainty", "best_of": 3, "return_candidates": True})
    assert len(reply.choices) == 4
    for bon in reply.model_extra["bon"]:
        assert bon["selection"] == "self-certainty"
        scores = [c["score"] for c in bon["candidates"]]
        assert all(s > 0 for s in scores)
        assert bon["chosen"] == list(np.argsort(scores, kind="stable")[::-1][:2])


@pytest.mark.parametrize("extra, param, message", [
    ({"selection": "best"}, "selection", "unknown selection rule 'best'"),
    ({"selection": "soft", "selection_params": {"temperature": -1}}, "selection", "temperature > 0"),
    ({"selection_params": {"beta": 1}}, "selection_params", "'argmax' takes no parameters"),
    ({"selection": "regularized", "selection_params": {"penalty": "logprob"}, "temperature": 0.7},
     "selection_params", "temperature 1 and top_p 1"),
])
def test_a_bad_selection_is_a_400_in_openais_error_format(tiny_server, extra, param, message):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(tiny_server, **extra)
    assert info.value.status_code == 400
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == param
    assert message in info.value.body["message"]


# ---------------------------------------------------------------------------------------
# At start-up, without a reward model


@pytest.fixture(scope="module")
def majority_server(tiny_model_path, server_logs):
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--reward-model", "none",
            "--selection", "majority", "--n", "4"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


def test_reward_none_with_majority_at_start_up_draws_n_and_allows_best_of_above_n(majority_server):
    bon = _bon(_chat(majority_server))
    assert "reward_model" not in bon and bon["selection"] == "majority" and bon["best_of"] == 4
    reply = _chat(majority_server, best_of=6, n=2, max_tokens=1, temperature=0.05)
    bon = _bon(reply)
    assert bon["best_of"] == 6 and len(reply.choices) == 2
    texts = [c["text"] for c in bon["candidates"]]
    expected = Majority().choose(Candidates(texts, np.ones(6)), 2, np.random.default_rng())
    assert bon["chosen"] == expected.chosen.tolist()
    reply = _chat(majority_server, selection="self-certainty", best_of=5)
    assert _bon(reply)["selection"] == "self-certainty" and _bon(reply)["best_of"] == 5


@pytest.mark.parametrize("selection", ["argmax", "soft", "regularized"])
def test_reward_none_refuses_a_rule_that_needs_a_reward(majority_server, selection):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(majority_server, selection=selection)
    assert info.value.status_code == 400 and info.value.body["param"] == "selection"
    assert f"selection '{selection}' needs a reward model" in info.value.body["message"]


def test_serve_config_allows_n_above_one_without_a_reward_only_for_reward_free_rules():
    assert ServeConfig(reward_model="none", n=4, selection="majority").n == 4
    assert ServeConfig(reward_model="none", n=4, selection="self-certainty").n == 4
    with pytest.raises(ValueError, match="reward-free rule"):
        ServeConfig(reward_model="none", n=4)
    with pytest.raises(ValueError, match="--selection: unknown selection rule 'best'"):
        ServeConfig(selection="best")
    with pytest.raises(ValueError, match="only the transformers backend"):
        ServeConfig(selection="self-certainty", upstream="http://127.0.0.1:9/v1")
