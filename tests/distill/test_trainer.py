"""The training loop and the recipes on a tiny random model with the real default reward."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from bonbench.config import load_yaml, parse_config
from distill.bonbon import BonBon, BonBonConfig
from distill.bond import Bond, BondConfig
from distill.jbond import JBond, JBondConfig
from distill.loop import TrainingError, build_context, step_indices, train
from distill.rloo import Rloo, RlooConfig
from tests.distill.rewards import SCORED_DIR

CONFIGS = Path(__file__).parents[2] / "distill" / "configs"


def small(tiny_model_path, tmp_path, **kw) -> dict:
    base = dict(model=tiny_model_path, reward_model="tests.distill.rewards:distinct_characters", steps=3, batch_prompts=2, max_tokens=8, eval_prompts=2, eval_k=2,
                eval_every=1, save_every=1, out=str(tmp_path / "run"), lora_r=4, lora_top_layers=0)
    return {**base, **kw}


def trainable_snapshot(ctx) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ctx.policies.model.named_parameters() if p.requires_grad}


RECIPES = [
    ("jbond", JBondConfig, JBond, {}),
    ("bond", BondConfig, Bond, dict(n=2, k=2, samples=2)),
    ("vbon", BondConfig, Bond, dict(n=2, k=2, samples=2, beta=1.0)),
    ("bon-sft", BondConfig, Bond, dict(n=2, k=2, beta=0.0)),
    ("iterative-bond", BondConfig, Bond, dict(n=2, k=2, samples=2, anchor_every=1)),
    ("rloo", RlooConfig, Rloo, dict(samples=2)),
    ("bonbon", BonBonConfig, BonBon, dict(n=2)),
]


@pytest.mark.parametrize("name,config_cls,recipe_cls,extra", RECIPES, ids=[r[0] for r in RECIPES])
def test_every_recipe_changes_every_trainable_parameter_and_writes_its_run(
        name, config_cls, recipe_cls, extra, tiny_model_path, tmp_path):
    cfg = config_cls(**small(tiny_model_path, tmp_path, **extra))
    recipe = recipe_cls(cfg)
    assert recipe.name == name
    ctx = build_context(cfg, recipe)
    before = trainable_snapshot(ctx)
    assert before, "nothing to train"
    out = train(cfg, recipe, ctx)
    unchanged = [n for n, p in ctx.policies.model.named_parameters()
                 if n in before and torch.equal(before[n], p.detach())]
    assert not unchanged, f"{name}: parameters that never moved: {unchanged[:5]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    evals = [r for r in rows if "eval/win_rate" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert (out / "checkpoint" / "state.pt").exists() and (out / "policy" / "adapter_config.json").exists()
    assert list((out / "tensorboard").iterdir())


def test_jbond_with_more_anchor_samples_trains_every_parameter(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, steps=2, eval_prompts=0, anchor_samples=3))
    recipe = JBond(cfg)
    ctx = build_context(cfg, recipe)
    before = trainable_snapshot(ctx)
    out = train(cfg, recipe, ctx)
    assert all(not torch.equal(before[n], p.detach()) for n, p in ctx.policies.model.named_parameters() if n in before)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["forward"]) for r in rows)
    with pytest.raises(ValueError, match="anchor_samples >= 2"):
        JBondConfig(**small(tiny_model_path, tmp_path, anchor_samples=1))


def test_first_evaluation_compares_the_reference_with_itself(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, steps=1, eval_prompts=3, eval_k=3))
    out = train(cfg, JBond(cfg))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    assert abs(first["eval/kl_ref"]) < 1e-3  # policy == reference before any step


def test_anchor_is_an_exponential_moving_average_of_the_policy(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path))
    ctx = build_context(cfg, JBond(cfg))
    pairs = list(ctx.policies._adapter_pairs())
    with torch.no_grad():
        for policy, _ in pairs:
            policy.add_(torch.randn_like(policy))
    old = [(p.clone(), a.clone()) for p, a in pairs]
    ctx.policies.update_anchor(0.25)
    for (p_old, a_old), (_, anchor) in zip(old, pairs):
        torch.testing.assert_close(anchor, 0.75 * a_old + 0.25 * p_old)


def test_full_fine_tuning_keeps_a_frozen_reference_and_an_ema_anchor(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, lora=False, lr=1e-3, eval_prompts=0))
    ctx = build_context(cfg, JBond(cfg))
    ref_before = [p.clone() for p in ctx.policies.ref_model.parameters()]
    anchor_before = [p.clone() for p in ctx.policies.anchor_model.parameters()]
    policy_before = [p.clone() for p in ctx.policies.model.parameters()]
    train(cfg, JBond(cfg), ctx)
    assert all(torch.equal(a, b) for a, b in zip(ref_before, ctx.policies.ref_model.parameters()))
    moved = [not torch.equal(a, b) for a, b in zip(policy_before, ctx.policies.model.parameters())]
    assert all(moved)
    anchor_moved = [not torch.equal(a, b) for a, b in zip(anchor_before, ctx.policies.anchor_model.parameters())]
    assert all(anchor_moved)


def test_lora_top_layers_puts_adapters_on_the_top_layers_only(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, lora_top_layers=1))
    ctx = build_context(cfg, JBond(cfg))
    names = [n for n, p in ctx.policies.model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)


def test_resumed_run_repeats_the_uninterrupted_run(tiny_model_path, tmp_path):
    args = small(tiny_model_path, tmp_path, steps=4, eval_every=2, save_every=2)
    whole = train(JBondConfig(**{**args, "out": str(tmp_path / "whole")}), JBond(JBondConfig(**args)))
    first = JBondConfig(**{**args, "steps": 2, "out": str(tmp_path / "split")})
    train(first, JBond(first))
    second = JBondConfig(**{**args, "out": str(tmp_path / "split")})
    split = train(second, JBond(second))

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(whole), rows(split)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (x["step"], k)


def test_snapshots_keep_the_policy_of_every_nth_step(tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    args = small(tiny_model_path, tmp_path, steps=4, eval_prompts=0, save_every=4, snapshot_every=2)
    out = train(JBondConfig(**args), JBond(JBondConfig(**args)))
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-0002", "step-0004"]

    def weights(folder):
        return load_file(next(folder.glob("*.safetensors")))

    last, middle, final = weights(out / "snapshots" / "step-0004"), weights(out / "snapshots" / "step-0002"), \
        weights(out / "policy")
    assert last.keys() == final.keys() == middle.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last snapshot is the saved policy
    assert any(not torch.equal(middle[k], final[k]) for k in final)  # step 2's policy is an earlier one
    with pytest.raises(ValueError, match="snapshot_every"):
        JBondConfig(**{**args, "snapshot_every": -1})


def test_a_run_killed_between_the_checkpoint_renames_resumes_from_the_old_checkpoint(tiny_model_path, tmp_path):
    args = small(tiny_model_path, tmp_path, steps=2, eval_prompts=0, save_every=2)
    out = Path(args["out"])
    train(JBondConfig(**args), JBond(JBondConfig(**args)))
    (out / "checkpoint").rename(out / "checkpoint.old")  # the state save_checkpoint's first rename leaves
    log = out / "metrics.jsonl"
    log.write_text("".join(json.dumps({**json.loads(line), "first_run": 1}) + "\n"
                           for line in log.read_text().splitlines()))
    more = JBondConfig(**{**args, "steps": 3})
    train(more, JBond(more))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    # steps 1 and 2 are the first run's (resumed after step 2), not redone from scratch
    assert [(r["step"], r.get("first_run", 0)) for r in rows] == [(1, 1), (2, 1), (3, 0)]


def test_non_finite_loss_stops_loudly_and_keeps_the_checkpoint(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, steps=3, eval_prompts=0))
    recipe = JBond(cfg)
    ctx = build_context(cfg, recipe)
    original = recipe.loss
    calls = itertools.count(1)

    def poisoned(ctx, batch, seed):
        out = original(ctx, batch, seed)
        if next(calls) == 2:  # the second step (one micro-batch a step)
            return out._replace(loss=out.loss * float("nan"))
        return out

    recipe.loss = poisoned
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(cfg, recipe, ctx)
    state = torch.load(Path(cfg.out) / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 1


def test_saved_lora_policy_loads_as_a_model_with_the_trained_log_probs(tiny_model_path, tmp_path):
    from bonbench.backends.transformers import load_causal_lm
    from bonbench.logprobs import sequence_logprobs

    cfg = JBondConfig(**small(tiny_model_path, tmp_path, eval_prompts=0, lr=1e-2))
    ctx = build_context(cfg, JBond(cfg))
    out = train(cfg, JBond(cfg), ctx)
    prompts, answers = [[1, 2, 3, 4]], [[5, 6, 7, 2]]
    trained = ctx.policies.logprobs("policy", prompts, answers)
    reference = ctx.policies.logprobs("ref", prompts, answers)
    model, tokenizer = load_causal_lm(str(out / "policy"))
    with torch.no_grad():
        loaded = sequence_logprobs(model, tokenizer, prompts, answers)
    torch.testing.assert_close(loaded, trained, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(loaded, reference, atol=1e-3)


def test_step_indices_cover_each_epoch_once_in_a_seeded_order():
    seen = [i for s in range(5) for i in step_indices(10, 4, s, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen == [i for s in range(5) for i in step_indices(10, 4, s, seed=3)]
    assert seen != [i for s in range(5) for i in step_indices(10, 4, s, seed=4)]


RECIPE_YAMLS = {"jbond": (JBondConfig, JBond), "jbond_long": (JBondConfig, JBond), "bond": (BondConfig, Bond), "iterative_bond": (BondConfig, Bond),
                "vbon": (BondConfig, Bond), "bon_sft": (BondConfig, Bond), "rloo": (RlooConfig, Rloo),
                "bonbon": (BonBonConfig, BonBon)}
ACCELERATE_YAMLS = {"accelerate_ddp"}


def test_every_shipped_yaml_is_a_recipe_or_an_accelerate_config():
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert shipped == set(RECIPE_YAMLS) | ACCELERATE_YAMLS


@pytest.mark.parametrize("stem", sorted(RECIPE_YAMLS))
def test_every_recipe_yaml_sets_its_options_and_builds_the_recipe_it_is_named_for(stem):
    config_cls, recipe_cls = RECIPE_YAMLS[stem]
    options = load_yaml(config_cls, CONFIGS / f"{stem}.yaml")
    cfg = config_cls(**options)
    assert options and {k: getattr(cfg, k) for k in options} == options
    assert recipe_cls(cfg).name == stem.removesuffix("_long").replace("_", "-")


def test_accelerate_config_is_data_parallel_on_one_machine():
    import yaml

    data = yaml.safe_load((CONFIGS / "accelerate_ddp.yaml").read_text())
    assert data["distributed_type"] == "MULTI_GPU" and data["num_machines"] == 1 and not data["use_cpu"]


def test_bad_configs_are_refused_with_a_reason(capsys):
    with pytest.raises(SystemExit):
        parse_config(BondConfig, ["--n", "8", "--k", "4"])
    assert "n <= k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(JBondConfig, ["--batch-prompts", "6", "--grad-accum", "4"])
    assert "multiple of grad_accum" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(JBondConfig, ["--temperature", "0.7"])
    assert "temperature" in capsys.readouterr().err


def test_two_process_launch_trains_with_ddp_and_writes_once(tiny_model_path, tmp_path):
    import os
    import subprocess
    import sys

    out, scored = tmp_path / "ddp", tmp_path / "scored"
    scored.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "distill.jbond",
           "--model", tiny_model_path,
           "--reward-model", "tests.distill.rewards:distinct_characters_by_rank", "--steps", "2", "--batch-prompts", "4",
           "--eval-prompts", "0", "--max-tokens", "8", "--lora-r", "4", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), SCORED_DIR: str(scored)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    prompts = {f.name: set(f.read_text().split()) for f in scored.iterdir()}
    assert set(prompts) == {"rank-0", "rank-1"}, "both processes trained"
    # each takes its own half of every step's prompts: 2 steps x 4 prompts, 4 distinct ones each
    assert len(prompts["rank-0"]) == len(prompts["rank-1"]) == 4
    assert not prompts["rank-0"] & prompts["rank-1"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # written once, by the main process
    assert (out / "policy" / "adapter_model.safetensors").exists()
