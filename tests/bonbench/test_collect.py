"""``bonbench/collect.py``: model names checked before loading, and draws that depend only on the
run's seed and the prompt, on the tiny random model."""

from __future__ import annotations

import pandas as pd
import pytest

from bonbench.collect import check_model_source, load_models, sample_policy, sample_pool
from bonbench.errors import UserError
from bonbench.rewards.function import FunctionReward


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


REWARD = f"{__name__}:length_reward"
BATCH = [{"index": 3, "id": "x", "document": "The council met on Monday and approved the budget."},
         {"index": 7, "id": "y", "document": "Heavy rain closed two roads near the river overnight."}]


def test_the_embedded_default_passes_and_an_uncached_hub_id_offline_is_refused_before_loading():
    check_model_source("--model", "default")
    with pytest.raises(UserError, match="is not a local folder"):
        check_model_source("--policy", "Qwen/Qwen2.5-0.5B-Instruct")


def test_a_model_folder_passes_and_a_missing_path_or_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(UserError) as error:
        check_model_source("--policy", str(tmp_path))
    assert str(error.value).startswith(f"the policy folder {tmp_path} holds no config.json or adapter_config.json")
    for marker in ("config.json", "adapter_config.json"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("{}")
        check_model_source("--policy", str(folder))
    for missing in (str(tmp_path / "no" / "such"), "no-such-runs/jbond/policy", "./no-such-policy"):
        with pytest.raises(UserError) as error:
            check_model_source("--policy", missing)
        assert str(error.value).startswith(f"the policy folder {missing} does not exist")


def test_a_prompts_draws_do_not_depend_on_its_batch(tiny_model_path):
    models = load_models(tiny_model_path, tiny_model_path, dtype="float32")
    reward = FunctionReward(REWARD)
    settings = dict(k=2, pool=2, max_tokens=5, temperature=1.0, seed=0)
    both = sample_pool(models, reward, BATCH, **settings)
    alone = sample_pool(models, reward, BATCH[1:], **settings)
    columns = ["prompt_index", "prompt_id", "role", "sample_index", "text", "num_tokens", "logprob", "reward"]
    assert (both["reward"] == both["text"].str.len()).all()
    assert both["role"].tolist() == ["reference", "reference", "candidate", "candidate"] * 2
    # the same tokens; log-probabilities up to float noise from the batch's padding
    pd.testing.assert_frame_equal(both[both["prompt_index"] == 7][columns].reset_index(drop=True), alone[columns],
                                  rtol=1e-4)

    policy = sample_policy(models, reward, BATCH, slug="self", samples=2, max_tokens=5, seed=0)
    assert policy["policy"].tolist() == ["self"] * 4 and policy["role"].eq("policy").all()
    # the policy is the reference: teacher forcing under the reference gives back the sampler's log π
    assert (policy["logprob"] - policy["ref_logprob"]).abs().max() < 1e-3
