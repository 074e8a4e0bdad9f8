"""``load_reward``: the spec string picks the reward model."""

from __future__ import annotations

import re

import pytest

from bonbench.errors import UserError
from bonbench.rewards import REWARD_HELP, load_reward
from bonbench.rewards.base import RewardModel


def test_none_means_no_reward_model():
    assert load_reward("none") is None


def test_default_is_the_embedded_minilm_reward():
    from bonbench.rewards.embedding import EmbeddingReward

    reward = load_reward("default")
    assert isinstance(reward, EmbeddingReward) and isinstance(reward, RewardModel)
    assert reward.name == "default"


def test_module_function_spec_is_a_function_reward():
    from bonbench.rewards.function import FunctionReward

    reward = load_reward("tests.bonbench.rewards.test_function:brevity")
    assert isinstance(reward, FunctionReward) and isinstance(reward, RewardModel)
    assert reward.score(["p"], ["a b c"]) == [-3]


def test_judge_needs_a_judge_model():
    from bonbench.rewards.judge import JudgeReward

    with pytest.raises(UserError, match="--judge-model"):
        load_reward("judge")
    judge = load_reward("judge", judge_model="gpt-4o-mini", judge_base_url="http://127.0.0.1:9/v1")
    assert isinstance(judge, JudgeReward) and judge.name == "judge:gpt-4o-mini"


def test_any_other_spec_is_a_sequence_classifier_path_and_a_missing_one_is_a_user_error(tmp_path):
    missing = tmp_path / "no-such-reward-model"
    with pytest.raises(UserError, match=re.escape(f"the reward model folder {missing} does not exist")):
        load_reward(str(missing))


def test_help_names_every_kind_of_spec():
    for word in ("default", "none", "judge", "module:function", "Hugging Face"):
        assert word in REWARD_HELP
