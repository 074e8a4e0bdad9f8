"""``--precision``: which hardware gets bf16, and what a bf16 trunk leaves in fp32."""

from __future__ import annotations

import json

import pytest
import torch

from distill.jbond import JBond, JBondConfig
from distill.loop import build_context, train
from bonbench.hardware import cpu_flags, native_bf16
from distill.precision import resolve_precision
from tests.distill.test_trainer import small, trainable_snapshot

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ICE_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
COOPER_LAKE = "flags\t\t: fpu avx512f avx512_bf16\n"


def test_cpu_flags_are_read_from_the_flags_line():
    assert cpu_flags(ICE_LAKE) == {"fpu", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_flags("processor\t: 0\n") == set()


@pytest.mark.parametrize("cpuinfo,expected", [(SAPPHIRE_RAPIDS, "bf16"), (COOPER_LAKE, "bf16"), (ICE_LAKE, "fp32"),
                                              ("", "fp32")])
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(cpuinfo, expected):
    assert resolve_precision("auto", "cpu", cpu_flags(cpuinfo)) == expected
    assert native_bf16("cpu", cpu_flags(cpuinfo)) == (expected == "bf16")


def test_explicit_precision_is_kept_and_unknown_is_refused():
    assert resolve_precision("fp32", "cpu", cpu_flags(SAPPHIRE_RAPIDS)) == "fp32"
    assert resolve_precision("bf16", "cpu", cpu_flags(ICE_LAKE)) == "bf16"  # emulated, with a warning
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu", set())
    with pytest.raises(ValueError, match="precision must be one of"):
        JBondConfig(precision="half")


def test_bf16_jbond_step_moves_every_trainable_parameter_and_keeps_lora_in_fp32(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, precision="bf16", lora_top_layers=1, steps=2,
                              eval_prompts=0, diagnostics=True))
    ctx = build_context(cfg, JBond(cfg))
    assert ctx.policies.bf16_layers == 1
    params = dict(ctx.policies.model.named_parameters())
    frozen_layer = [p for n, p in params.items() if ".layers.0." in n]
    assert frozen_layer and all(p.dtype == torch.bfloat16 for p in frozen_layer)
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    before = trainable_snapshot(ctx)
    out = train(cfg, JBond(cfg), ctx)
    after = dict(ctx.policies.model.named_parameters())
    assert not [n for n in before if torch.equal(before[n], after[n].detach())]
    assert all(after[n].dtype == torch.float32 for n in lora)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert torch.isfinite(torch.tensor(row["loss"])) and row["diag/grad_norm_forward"] > 0


def test_bf16_trunk_changes_log_probs_a_little_and_log_ratios_less(tiny_model_path, tmp_path):
    cfgs = {p: JBondConfig(**small(tiny_model_path, tmp_path, precision=p, lora_top_layers=1)) for p in ("fp32", "bf16")}
    contexts = {p: build_context(c, JBond(c)) for p, c in cfgs.items()}
    torch.manual_seed(1)
    noise = {n: torch.randn_like(p) * 0.05 for n, p in contexts["fp32"].policies.model.named_parameters()
             if "lora_B" in n and ".policy." in n}
    ids = contexts["fp32"].policies.tokenizer(["A short prompt about the weather", "Another one, longer than that"])
    prompts = ids["input_ids"]
    answers = [list(range(100, 112)), list(range(300, 309))]
    scored = {}
    for p, ctx in contexts.items():
        params = dict(ctx.policies.model.named_parameters())
        with torch.no_grad():
            for n, v in noise.items():
                params[n].copy_(v)
            scored[p] = {r: ctx.policies.logprobs(r, prompts, answers) for r in ("policy", "ref")}
    diff = (scored["bf16"]["policy"] - scored["fp32"]["policy"]).abs()
    ratio = lambda s: s["policy"] - s["ref"]  # noqa: E731
    ratio_diff = (ratio(scored["bf16"]) - ratio(scored["fp32"])).abs()
    assert (diff > 0).all(), "the bf16 trunk did not change the computation"
    assert diff.max() < 0.5 and ratio_diff.max() < 0.1
