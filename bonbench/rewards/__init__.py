"""Reward models behind one protocol (``RewardModel``), chosen by a short spec string."""

from __future__ import annotations

import re

from bonbench.errors import UserError
from bonbench.rewards.base import RewardError, RewardModel, checked_scores, scores_partial

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

REWARD_HELP = (
    "'default' (the embedded MiniLM summary reward), 'none' (no reward: plain sampling), "
    "'judge' (an LLM judge, see --judge-model/--judge-base-url), 'module:function' (your "
    "Python callable; a score_partial attribute on it scores partial answers, for --early-rejection), "
    "or a Hugging Face reward model id or folder (sequence classifier)"
)


def load_reward(spec: str, *, device: str = "cpu", judge_model: str | None = None,
                judge_base_url: str | None = None, judge_api_key: str | None = None) -> RewardModel | None:
    """Build the reward model a spec names (see ``REWARD_HELP``); ``None`` for 'none'. A spec that names
    nothing usable (no such module, function or model) is a ``UserError``."""
    if spec == "none":
        return None
    if spec == "default":
        from bonbench.rewards.embedding import EmbeddingReward

        return EmbeddingReward(device=device)
    if spec == "judge":
        if not judge_model:
            raise UserError("--reward-model judge needs --judge-model (the judge's model name).")
        from bonbench.rewards.judge import JudgeReward

        return JudgeReward(judge_model, base_url=judge_base_url, api_key=judge_api_key)
    if _CALLABLE.match(spec):
        from bonbench.rewards.function import FunctionReward

        return FunctionReward(spec)
    from bonbench.rewards.sequence_classifier import SequenceClassifierReward

    return SequenceClassifierReward(spec, device=device)


__all__ = ["RewardError", "RewardModel", "checked_scores", "load_reward", "scores_partial", "REWARD_HELP"]
