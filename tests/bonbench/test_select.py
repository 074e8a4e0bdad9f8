"""Selection rules on hand-made candidates: what each selects, how ties fall, what it refuses; ``soft``'s
draws against the softmax law by chi-square over many seeded draws."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from bonbench.bon import bon_select
from bonbench.select import (RULES, Argmax, Candidates, Majority, Regularized, SelectionError, SelfCertainty, Soft,
                             make_rule, normalize_answer, parse_rule)


def cands(texts=None, rewards=None, num_tokens=None, logprobs=None, self_certainty=None) -> Candidates:
    size = len(next(v for v in (texts, rewards, num_tokens, logprobs, self_certainty) if v is not None))
    return Candidates(texts=texts or [f"answer {i}" for i in range(size)],
                      num_tokens=np.asarray(num_tokens if num_tokens is not None else [5] * size),
                      rewards=rewards, logprobs=logprobs, self_certainty=self_certainty)


RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------
# argmax


def test_argmax_keeps_the_highest_rewards_best_first_and_ties_go_to_the_earlier_draw():
    c = cands(rewards=[0.2, 0.9, 0.9, -1.0, 0.5])
    choice = Argmax().choose(c, 1, RNG)
    assert choice.chosen.tolist() == [1]
    assert Argmax().choose(c, 4, RNG).chosen.tolist() == [1, 2, 4, 0]
    np.testing.assert_array_equal(choice.scores, [0.2, 0.9, 0.9, -1.0, 0.5])


def test_argmax_agrees_with_the_projects_strict_order_on_random_rewards():
    rng = np.random.default_rng(1)
    for _ in range(50):
        rewards = rng.integers(0, 4, size=7).astype(float)  # many ties
        assert Argmax().choose(cands(rewards=rewards), 3, rng).chosen.tolist() == bon_select(rewards, 3).tolist()


def test_rules_that_read_a_reward_refuse_candidates_without_one():
    for rule in (Argmax(), Soft(), Regularized()):
        assert rule.needs_reward
        with pytest.raises(SelectionError, match="needs a reward model"):
            rule.choose(cands(texts=["a", "b"]), 1, RNG)
    assert not SelfCertainty.needs_reward and not Majority.needs_reward


def test_a_rule_cannot_keep_more_candidates_than_were_drawn():
    with pytest.raises(SelectionError, match="cannot choose 3 of 2"):
        Argmax().choose(cands(rewards=[1.0, 2.0]), 3, RNG)
    with pytest.raises(SelectionError, match="cannot choose 0"):
        Majority().choose(cands(texts=["a", "b"]), 0, RNG)


def test_candidates_refuse_arrays_that_do_not_match_the_texts():
    with pytest.raises(SelectionError, match="rewards has shape"):
        Candidates(texts=["a", "b"], num_tokens=np.array([1, 1]), rewards=np.array([1.0]))
    with pytest.raises(SelectionError, match="NaN"):
        Candidates(texts=["a", "b"], num_tokens=np.array([1, 1]), rewards=np.array([1.0, np.nan]))
    with pytest.raises(SelectionError, match="no candidates"):
        Candidates(texts=[], num_tokens=np.array([]))


# ---------------------------------------------------------------------------------------
# soft


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def test_soft_draws_follow_softmax_of_reward_over_lambda():
    rewards = np.array([0.0, 1.0, 2.0, 0.5, 2.0])
    rule = Soft(temperature=0.8)
    expected = _softmax(rewards / 0.8)
    draws = 20_000
    counts = np.bincount([rule.choose(cands(rewards=rewards), 1, np.random.default_rng(seed)).chosen[0]
                          for seed in range(draws)], minlength=5)
    # Fixed seeds make this deterministic; under the softmax law it fails with probability 1e-4.
    assert chisquare(counts, expected * draws).pvalue > 1e-4
    # and a wrong law is rejected by the same test: argmax's, or softmax at another temperature
    assert chisquare(counts, _softmax(rewards / 0.4) * draws).pvalue < 1e-10
    np.testing.assert_allclose(rule.choose(cands(rewards=rewards), 1, RNG).scores, expected)


def test_soft_keeps_n_by_drawing_without_replacement():
    rewards = np.array([0.0, 1.0, 2.0])
    p = _softmax(rewards)
    pairs = list(itertools.permutations(range(3), 2))
    # first draw i from p, then j from p restricted to the others
    expected = np.array([p[i] * p[j] / (1.0 - p[i]) for i, j in pairs])
    draws = 20_000
    seen = [tuple(Soft().choose(cands(rewards=rewards), 2, np.random.default_rng(seed)).chosen) for seed in range(draws)]
    counts = np.array([seen.count(pair) for pair in pairs])
    assert counts.sum() == draws  # never the same candidate twice
    assert chisquare(counts, expected * draws).pvalue > 1e-4


def test_soft_with_a_tiny_lambda_is_argmax_and_with_equal_rewards_is_uniform():
    rewards = [0.3, 0.7, 0.1]
    assert {int(Soft(temperature=1e-4).choose(cands(rewards=rewards), 1, np.random.default_rng(s)).chosen[0])
            for s in range(200)} == {1}
    counts = np.bincount([Soft().choose(cands(rewards=[1.0] * 4), 1, np.random.default_rng(s)).chosen[0]
                          for s in range(8000)], minlength=4)
    assert chisquare(counts).pvalue > 1e-4


def test_soft_is_reproducible_from_its_generator():
    rewards = np.linspace(0, 1, 8)
    first = [Soft().choose(cands(rewards=rewards), 3, np.random.default_rng(42)).chosen.tolist() for _ in range(3)]
    assert first[0] == first[1] == first[2]


# ---------------------------------------------------------------------------------------
# regularized


def test_regularized_by_length_prefers_the_shorter_answer_once_beta_outweighs_the_reward_gap():
    c = cands(rewards=[1.0, 1.2], num_tokens=[10, 40])
    assert Regularized(beta=0.001).choose(c, 1, RNG).chosen.tolist() == [1]  # 1.2 - 0.04 > 1.0 - 0.01
    choice = Regularized(beta=0.01).choose(c, 1, RNG)  # 1.2 - 0.4 < 1.0 - 0.1
    assert choice.chosen.tolist() == [0]
    np.testing.assert_allclose(choice.scores, [0.9, 0.8])


def test_regularized_by_logprob_prefers_the_likelier_answer_and_ties_go_to_the_earlier_draw():
    c = cands(rewards=[1.0, 1.0, 1.5], logprobs=[-30.0, -10.0, -70.0])
    choice = Regularized(beta=0.01, penalty="logprob").choose(c, 3, RNG)
    np.testing.assert_allclose(choice.scores, [0.7, 0.9, 0.8])
    assert choice.chosen.tolist() == [1, 2, 0]
    tied = cands(rewards=[0.5, 1.0], logprobs=[-10.0, -60.0])  # both score 0.4
    assert Regularized(beta=0.01, penalty="logprob").choose(tied, 1, RNG).chosen.tolist() == [0]


def test_regularized_by_logprob_refuses_candidates_without_logprobs():
    with pytest.raises(SelectionError, match="log-probability"):
        Regularized(penalty="logprob").choose(cands(rewards=[1.0, 2.0]), 1, RNG)


# ---------------------------------------------------------------------------------------
# self-certainty


def test_self_certainty_keeps_the_most_certain_candidate_and_ties_go_to_the_earlier_draw():
    c = cands(self_certainty=[0.4, 1.3, 0.2, 1.3])
    choice = SelfCertainty().choose(c, 2, RNG)
    assert choice.chosen.tolist() == [1, 3]
    np.testing.assert_array_equal(choice.scores, [0.4, 1.3, 0.2, 1.3])
    with pytest.raises(SelectionError, match="transformers backend"):
        SelfCertainty().choose(cands(rewards=[1.0, 2.0]), 1, RNG)


# ---------------------------------------------------------------------------------------
# majority


@pytest.mark.parametrize("text, expected", [
    ("Paris", "paris"),
    ("  Paris.\nIt is the capital of France.", "paris"),
    ("\n\nTwenty-four!", "twentyfour"),
    ("New   York, NY", "new york ny"),
    ("« Über »", "über"),
    ("...", ""),
    ("", ""),
])
def test_normalize_answer_reads_the_first_line_lowercased_without_punctuation(text, expected):
    assert normalize_answer(text) == expected


def test_majority_keeps_the_most_frequent_normalised_answer():
    texts = ["London", "Paris", "paris.", "  PARIS!\nbecause it is", "London", "Rome"]
    choice = Majority().choose(cands(texts=texts), 1, RNG)
    assert choice.chosen.tolist() == [1]
    np.testing.assert_array_equal(choice.scores, [2, 3, 3, 3, 2, 1])


def test_majority_ties_go_to_the_answer_drawn_first_and_n_takes_one_of_each_answer_first():
    texts = ["b", "a", "a", "c", "b", "d"]
    choice = Majority().choose(cands(texts=texts), 6, RNG)
    # b and a have two votes each, b was drawn first; then c and d; then the second b and a
    assert choice.chosen.tolist() == [0, 1, 3, 5, 4, 2]


def test_majority_ignores_empty_answers_and_needs_no_reward():
    texts = ["", " ?! ", "seven", "", "eight"]
    choice = Majority().choose(cands(texts=texts), 5, RNG)
    assert choice.chosen.tolist() == [2, 4, 0, 1, 3]
    np.testing.assert_array_equal(choice.scores, [0, 0, 1, 0, 1])
    assert Majority().choose(cands(texts=["", ""]), 1, RNG).chosen.tolist() == [0]


# ---------------------------------------------------------------------------------------
# names and parameters


def test_every_rule_is_registered_under_its_own_name():
    assert list(RULES) == ["argmax", "soft", "regularized", "self-certainty", "majority"]
    for name, cls in RULES.items():
        assert cls.name == name
        assert make_rule(name).name == name


def test_parse_rule_reads_name_and_parameters():
    assert parse_rule("soft:temperature=0.5") == Soft(temperature=0.5)
    assert parse_rule("regularized:beta=0.1, penalty=logprob") == Regularized(beta=0.1, penalty="logprob")
    assert parse_rule("majority") == Majority()


@pytest.mark.parametrize("name, params, message", [
    ("best", {}, "unknown selection rule 'best'; the rules are argmax, soft"),
    ("soft", {"lambda": 1}, "'soft' takes temperature; got lambda"),
    ("majority", {"k": 3}, "'majority' takes no parameters; got k"),
    ("soft", {"temperature": 0}, "temperature > 0"),
    ("soft", {"temperature": "hot"}, "temperature > 0"),
    ("regularized", {"beta": -1}, "beta > 0"),
    ("regularized", {"penalty": "words"}, "penalty length or logprob, got 'words'"),
])
def test_make_rule_refuses_unknown_names_and_bad_parameters_with_a_sentence(name, params, message):
    with pytest.raises(SelectionError, match=message):
        make_rule(name, params)


def test_parse_rule_refuses_a_parameter_without_a_value():
    with pytest.raises(SelectionError, match="key=value"):
        parse_rule("soft:temperature")
