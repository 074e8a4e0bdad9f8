"""``bonbench/collect.py``: model names checked before loading, and draws that depend only on the
run's seed and the prompt, on the tiny random model."""

from __future__ import annotations

import pandas as pd
import pytest

import hashlib

import numpy as np

from bonbench.backends.base import Candidate
from bonbench.collect import (
    POOL,
    _draw,
    _encode,
    _partial_texts,
    check_model_source,
    load_models,
    sample_policy,
    sample_pool,
)
from bonbench.errors import UserError
from bonbench.rewards.function import FunctionReward


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def hashed(responses):
    return [int(hashlib.sha256(r.encode()).hexdigest()[:12], 16) / 16**12 for r in responses]


length_reward.score_partial = lambda prompts, responses: hashed(responses)
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


def test_pool_candidates_store_their_self_certainty_and_the_partial_rewards_of_their_first_tokens(tiny_model_path):
    from bonbench.tasks import summary_prompt

    models = load_models(tiny_model_path, dtype="float32")
    frame = sample_pool(models, FunctionReward(REWARD), BATCH, k=1, pool=2, max_tokens=5, temperature=1.0, seed=0,
                        partial_at=[2, 4])
    ref = models.reference
    ids = [_encode(ref.tokenizer, summary_prompt(item["document"]), 5, ref.model) for item in BATCH]
    again, _ = _draw(ref, ids, BATCH, n=3, max_tokens=5, temperature=1.0, seed=0, role=POOL)  # the same draws
    drawn = [c for prompt_cands in again for c in prompt_cands]
    assert frame["text"].tolist() == [c.text for c in drawn]
    assert frame["self_certainty"].to_numpy() == pytest.approx([c.self_certainty for c in drawn], rel=1e-4)
    for c, (_, row) in zip(drawn, frame.iterrows()):
        for checkpoint in (2, 4):
            value = row[f"partial_reward_{checkpoint}"]
            if row["role"] == "reference" or c.num_tokens <= checkpoint:
                assert np.isnan(value)
            else:
                prefix = ref.tokenizer.decode(c.token_ids[:checkpoint], skip_special_tokens=True)
                assert value == hashed([prefix])[0]
    candidates = frame["role"] == "candidate"
    assert (frame.loc[candidates, "partial_seconds"] >= 0).all()
    assert frame.loc[~candidates, "partial_seconds"].isna().all()
    assert frame.loc[candidates, "partial_reward_2"].notna().any()


def test_partial_texts_are_the_first_tokens_of_candidates_that_run_past_the_checkpoint(tiny_model_path):
    tokenizer = load_models(tiny_model_path, dtype="float32").reference.tokenizer
    ids = tokenizer.encode("The council met on Monday", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    finished = Candidate("", num_tokens=len(ids) + 1, finish_reason="stop", token_ids=[*ids, eos])
    texts = _partial_texts(tokenizer, finished, [2, len(ids), len(ids) + 1])
    assert texts == {2: tokenizer.decode(ids[:2]), len(ids): tokenizer.decode(ids)}  # not past its end
