"""``load_reward``: the spec string picks the reward model."""

from __future__ import annotations

import re

import pytest
import torch

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


def test_any_other_spec_is_a_sequence_classifier_folder_that_scores_each_answer(tiny_model_path, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from bonbench.rewards.sequence_classifier import SequenceClassifierReward

    config = AutoConfig.from_pretrained(tiny_model_path, num_labels=1)
    torch.manual_seed(0)  # the random head's scores, and so the gap between the two answers, are fixed
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"))
    assert isinstance(reward, SequenceClassifierReward) and isinstance(reward, RewardModel)
    prompts, answers = ["Say hi.", "Say hi.", "Say hi."], ["Hi!", "Hello there.", "Hi!"]
    scores = reward.score(prompts, answers)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    # Unseeded, the random head once scored near 0, where identical rows differ by more than approx's
    # relative tolerance (7e-9 on 0.004); seeded, they score -0.120 and the other answer -0.135.
    assert scores[0] == pytest.approx(scores[2]) and abs(scores[0] - scores[1]) > 1e-3



def test_a_missing_reward_model_folder_is_a_user_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-reward-model"
    with pytest.raises(UserError, match=re.escape(f"the reward model folder {missing} does not exist")):
        load_reward(str(missing))


def test_help_names_every_kind_of_spec():
    for word in ("default", "none", "judge", "module:function", "Hugging Face"):
        assert word in REWARD_HELP
