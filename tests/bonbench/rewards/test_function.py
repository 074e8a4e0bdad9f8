"""A user's ``module:function`` reward: loaded by name, called on whole batches, failures loud."""

from __future__ import annotations

import math
import re

import pytest

from bonbench.errors import UserError
from bonbench.rewards.base import RewardError, checked_scores, scores_partial
from bonbench.rewards.function import FunctionReward

SPEC = f"{__name__}:brevity"
calls: list[tuple[list, list]] = []


def brevity(prompts, responses):
    calls.append((list(prompts), list(responses)))
    return [-len(r.split()) for r in responses]


class Scorers:
    @staticmethod
    def shout(prompts, responses):
        return [float(r.isupper()) for r in responses]


def with_partial(prompts, responses):
    return [float(len(r)) for r in responses]


with_partial.score_partial = lambda prompts, responses: [-float(len(r)) for r in responses]


def raises(prompts, responses):
    raise KeyError("no such rubric")


def too_few(prompts, responses):
    return [0.0] * (len(responses) - 1)


def nan(prompts, responses):
    return [math.nan for _ in responses]


def not_numbers(prompts, responses):
    return ["high" for _ in responses]


NOT_CALLABLE = 3


def words(prompts, responses):
    return [float(len(r.split())) for r in responses]


words.score_partial = lambda prompts, responses: [-float(len(r)) for r in responses]


def bad_partial(prompts, responses):
    return [0.0] * len(responses)


bad_partial.score_partial = "not a function"


class Rubric:
    """A callable object with a partial scorer of its own."""

    def __call__(self, prompts, responses):
        return [1.0] * len(responses)

    def score_partial(self, prompts, responses):
        return [0.5] * len(responses)


RUBRIC = Rubric()


def test_function_reward_scores_a_whole_batch_in_one_call():
    calls.clear()
    reward = FunctionReward(SPEC)
    chat = [{"role": "user", "content": "Be brief."}]
    assert reward.name == SPEC
    assert reward.score([chat, "plain prompt"], ["one two three", "one"]) == [-3, -1]
    assert calls == [([chat, "plain prompt"], ["one two three", "one"])]


def test_function_reward_resolves_dotted_attributes():
    assert FunctionReward(f"{__name__}:Scorers.shout").score(["p", "p"], ["LOUD", "quiet"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_anywhere:f", "no module 'no_such_module_anywhere' to import"),
    ("no_such_package_anywhere.rewards:f", "no module 'no_such_package_anywhere.rewards' to import"),
    (f"{__name__}:missing", "has no attribute 'missing'"),
    (f"{__name__}:Scorers.missing", "has no attribute 'Scorers.missing'"),
    (f"{__name__}:NOT_CALLABLE", "not callable (it is a int)"),
])
def test_a_spec_that_names_nothing_callable_is_a_user_error(spec, words):
    with pytest.raises(UserError, match=re.escape(words)):
        FunctionReward(spec)


@pytest.mark.parametrize("source, words", [
    ("raise RuntimeError('no rubric file')\n", "raised RuntimeError: no rubric file"),
    ("import no_such_dependency_anywhere\n", "No module named 'no_such_dependency_anywhere'"),
    ("def broken(:\n", "raised SyntaxError"),
])
def test_a_module_that_fails_to_import_is_a_user_error_that_keeps_its_cause(tmp_path, monkeypatch, source, words):
    (tmp_path / "user_rewards_that_break.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=re.escape(words)) as info:
        FunctionReward("user_rewards_that_break:score")
    assert "user_rewards_that_break" in str(info.value)
    assert info.value.__cause__ is not None  # --log-level debug shows the user's own traceback


@pytest.mark.parametrize("function, words", [
    ("raises", "KeyError: 'no such rubric'"),
    ("too_few", "returned 1 scores for 2 responses"),
    ("nan", "returned NaN"),
    ("not_numbers", "ValueError"),
])
def test_checked_scores_turns_every_failure_into_a_reward_error_that_says_why(function, words):
    reward = FunctionReward(f"{__name__}:{function}")
    with pytest.raises(RewardError, match=words) as info:
        checked_scores(reward, ["p", "p"], ["a", "b"])
    assert f"{__name__}:{function}" in str(info.value)


def test_checked_scores_returns_floats():
    scores = checked_scores(FunctionReward(SPEC), ["p"], ["a b"])
    assert scores == [-2.0] and isinstance(scores[0], float)


def test_a_function_with_a_score_partial_attribute_scores_partial_answers_and_others_do_not():
    reward = FunctionReward(f"{__name__}:with_partial")
    assert scores_partial(reward)
    assert checked_scores(reward, ["p", "p"], ["ab", "abc"], partial=True) == [-2.0, -3.0]
    assert checked_scores(reward, ["p", "p"], ["ab", "abc"]) == [2.0, 3.0]
    assert not scores_partial(FunctionReward(SPEC))


def test_a_callable_with_a_score_partial_attribute_scores_partial_answers_and_one_without_does_not():
    reward = FunctionReward(f"{__name__}:words")
    assert scores_partial(reward)
    assert checked_scores(reward, ["p", "p"], ["one two", "three"]) == [2.0, 1.0]
    assert checked_scores(reward, ["p", "p"], ["one two", "three"], partial=True) == [-7.0, -5.0]
    rubric = FunctionReward(f"{__name__}:RUBRIC")
    assert scores_partial(rubric) and checked_scores(rubric, ["p"], ["x"], partial=True) == [0.5]
    assert not scores_partial(FunctionReward(SPEC))


def test_a_score_partial_that_is_not_callable_is_a_user_error():
    with pytest.raises(UserError, match="score_partial is not callable"):
        FunctionReward(f"{__name__}:bad_partial")
