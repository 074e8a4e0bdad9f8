"""``bonbench/collect.py``: model names checked before loading, and draws that depend only on the
run's seed and the prompt, on the tiny random model."""

from __future__ import annotations

import pandas as pd
import pytest

from bonbench.collect import check_model_source, load_models, sample_policy, sample_pool
from bonbench.models import ModelNotFound
from bonbench.rewards.function import FunctionReward


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


REWARD = f"{__name__}:length_reward"
BATCH = [{"index": 3, "id": "x", "document": "The council met on Monday and approved the budget."},
         {"index": 7, "id": "y", "document": "Heavy rain closed two roads near the river overnight."}]


@pytest.mark.parametrize("name", ["default", "Qwen/Qwen2.5-0.5B-Instruct", "gpt2"])
def test_names_that_can_be_hub_ids_pass(name):
    check_model_source("--policy", name)


def test_a_model_folder_passes_and_a_missing_path_or_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelNotFound) as error:
        check_model_source("--policy", str(tmp_path))
    assert str(error.value) == (f"--policy {tmp_path}: the folder holds no model (neither config.json nor a LoRA "
                                "adapter's adapter_config.json)")
    for marker in ("config.json", "adapter_config.json"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("{}")
        check_model_source("--policy", str(folder))
    for missing in (str(tmp_path / "no" / "such"), "runs/jbond/policy", "./policy"):
        with pytest.raises(ModelNotFound) as error:
            check_model_source("--policy", missing)
        assert str(error.value).startswith(f"--policy {missing}: no such folder")


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
