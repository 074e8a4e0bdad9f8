"""vLLM as the trainer's sampling engine (``--generation vllm``), checked against the trained model.

Opt-in like ``tests/bonbench/backends/test_vllm.py``: the vLLM tests run only with
``BONBENCH_TEST_VLLM=1`` where ``import vllm`` works (a GPU build, or vLLM's CPU build in its own
virtualenv with ``VLLM_CPU_KVCACHE_SPACE=1``; see tests/vllm_support.py). Exactness is checked by
scoring vLLM's samples with the trainer's model: log-probabilities must agree role by role, after
every weight change, and greedy answers must be the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from bonbench.backends.transformers import encode_prompt
from distill.jbond import JBond, JBondConfig
from distill.loop import build_context, train
from distill.policy import Draw
from tests.vllm_support import save_vllm_tiny_model, vllm_skip_reason

_SKIP = vllm_skip_reason()
needs_vllm = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
END_EVERY = 10  # one token id in ten ends an answer, so random answers stop early about as often
CHATS = [[{"role": "user", "content": "Summarise: the river rose after a week of rain."}],
         [{"role": "user", "content": "Say hello."}]]


def _config(model: str, out: Path, **kw) -> JBondConfig:
    base = dict(model=model, reward_model="tests.distill.rewards:distinct_characters", steps=2, batch_prompts=2,
                max_tokens=8, eval_prompts=2, eval_k=2, eval_every=1, save_every=1, out=str(out), lora_r=4,
                lora_top_layers=1, threads=1, generation="vllm", vllm_gpu_memory_utilization=0.3,
                vllm_enforce_eager=True)
    return JBondConfig(**{**base, **kw})


def _prompts(policies) -> list[list[int]]:
    return [encode_prompt(policies.tokenizer, chat) for chat in CHATS]


def _ids(rows) -> list[list[list[int]]]:
    return [[c.token_ids for c in row] for row in rows]


def _draw(generator, role, prompts, n, max_tokens, seed):
    return generator.generate(prompts, [Draw(role, n, seed)], max_tokens)[0]


def _assert_logprobs_match(policies, role, prompts, rows, atol=2e-3):
    """vLLM's log pi(answer) equals the trained model's, for every candidate."""
    flat = [c for row in rows for c in row]
    prompt_of = [p for p, row in zip(prompts, rows) for _ in row]
    trained = policies.logprobs(role, prompt_of, [c.token_ids for c in flat]).tolist()
    for c, lp in zip(flat, trained):
        assert c.logprob == pytest.approx(lp, abs=atol), (role, c.token_ids)


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> str:
    return save_vllm_tiny_model(tmp_path_factory.mktemp("vllm-tiny"), end_every=END_EVERY)


@pytest.fixture(scope="module")
def lora_run(vllm_model, tmp_path_factory):
    """A 2-step LoRA J-BOND run sampled by vLLM: its context and run folder."""
    cfg = _config(vllm_model, tmp_path_factory.mktemp("lora") / "run")
    with build_context(cfg, JBond(cfg)) as ctx:
        out = train(cfg, JBond(cfg), ctx)
        yield ctx, out


@pytest.fixture(scope="module")
def full_run(vllm_model, tmp_path_factory):
    """A full fine-tuning J-BOND context sampled by vLLM (not trained yet)."""
    cfg = _config(vllm_model, tmp_path_factory.mktemp("full") / "run", lora=False, lr=1e-3, eval_prompts=0)
    with build_context(cfg, JBond(cfg)) as ctx:
        yield cfg, ctx


def test_vllm_generation_without_vllm_says_how_to_install_it(vllm_model, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here, so its absence cannot be shown")
    cfg = _config(vllm_model, tmp_path / "run")
    with pytest.raises(ImportError, match="pip install"):
        build_context(cfg, JBond(cfg))


# -- LoRA: adapters exported per weight version ------------------------------------------------------


@pytest.mark.vllm
@needs_vllm
def test_lora_jbond_run_samples_with_vllm_and_exports_each_adapter_version_once(lora_run):
    ctx, out = lora_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval/kl_ref" in r] == [0, 1, 2]
    assert (out / "policy" / "adapter_model.safetensors").exists()
    generator = ctx.generator
    assert ctx.version == generator.version == 2
    # the last evaluation sampled the policy after step 2, so the engine holds version 2's adapter
    version, request = generator._adapters["policy"]
    assert version == 2 and request.lora_int_id > 1
    held = {r.lora_name for _, r in generator._adapters.values()}
    assert {p.name for p in generator.workdir.iterdir()} == held  # older exports were deleted


@pytest.mark.vllm
@needs_vllm
def test_lora_samples_follow_the_adapter_and_ref_ignores_it(lora_run):
    ctx, _ = lora_run
    policies, generator = ctx.policies, ctx.generator
    prompts = _prompts(policies)

    def draw(role):
        return _draw(generator, role, prompts, n=4, max_tokens=8, seed=5)

    policy, anchor, ref = draw("policy"), draw("anchor"), draw("ref")
    assert _ids(draw("policy")) == _ids(policy)  # seeded, same weights: the same answers
    for role, rows in (("policy", policy), ("anchor", anchor), ("ref", ref)):
        _assert_logprobs_match(policies, role, prompts, rows)
    old_id = generator._adapters["policy"][1].lora_int_id

    with torch.no_grad():
        for name, param in policies.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.add_(0.5 * torch.randn_like(param))
    ctx.weights_changed()
    moved_policy, moved_anchor, moved_ref = draw("policy"), draw("anchor"), draw("ref")
    assert generator._adapters["policy"][1].lora_int_id > old_id
    assert _ids(moved_policy) != _ids(policy)
    _assert_logprobs_match(policies, "policy", prompts, moved_policy)
    assert _ids(moved_anchor) == _ids(anchor)  # re-exported under a new id, same weights
    assert _ids(moved_ref) == _ids(ref)  # the base: no adapter


# -- the reference: what a candidate looks like, and its distribution ------------------------------------


@pytest.mark.vllm
@needs_vllm
def test_ref_candidates_end_like_the_in_process_samplers_and_respect_n_and_max_tokens(lora_run):
    ctx, _ = lora_run
    policies = ctx.policies
    eos = set(policies.eos)
    rows = _draw(ctx.generator, "ref", _prompts(policies), n=8, max_tokens=6, seed=1)
    assert [len(row) for row in rows] == [8, 8]
    reasons = set()
    for c in (c for row in rows for c in row):
        ids = c.token_ids
        assert 1 <= c.num_tokens == len(ids) <= 6
        assert not eos & set(ids[:-1])
        if c.finish_reason == "stop":
            assert ids[-1] in eos  # the end token is kept: the losses score it
        else:
            assert c.finish_reason == "length" and len(ids) == 6 and ids[-1] not in eos
        visible = ids[:-1] if c.finish_reason == "stop" else ids
        assert c.text == policies.tokenizer.decode(visible, skip_special_tokens=True)
        reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}
    assert _ids(_draw(ctx.generator, "ref", _prompts(policies), n=8, max_tokens=6, seed=2)) != _ids(rows)


@pytest.mark.vllm
@needs_vllm
def test_ref_first_tokens_are_drawn_from_pi_at_temperature_one(lora_run):
    """Over 600 one-token answers: the share that stop, and the mean surprisal, match pi's exact values."""
    ctx, _ = lora_run
    policies = ctx.policies
    prompt = _prompts(policies)[0]
    with torch.no_grad(), policies.model.disable_adapter():
        logits = policies.model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    logp = logits.log_softmax(-1)
    p_stop = float(logp[sorted(set(policies.eos))].exp().sum())
    entropy = float(-(logp.exp() * logp).sum())
    surprisal_sd = float((logp.exp() * (logp + entropy) ** 2).sum().sqrt())
    # in calls of 50: vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a batch of
    # seeded requests outgrows one scheduler step and a prefill is split
    rows = [c for seed in range(12) for c in _draw(ctx.generator, "ref", [prompt], n=50, max_tokens=1, seed=seed)[0]]
    n = len(rows)
    stop_share = sum(c.finish_reason == "stop" for c in rows) / n
    assert stop_share == pytest.approx(p_stop, abs=4 * math.sqrt(p_stop * (1 - p_stop) / n))
    mean_surprisal = -sum(c.logprob for c in rows) / n
    assert mean_surprisal == pytest.approx(entropy, abs=4 * surprisal_sd / math.sqrt(n))


# -- full fine-tuning: the engine reloads the role's weights -------------------------------------------------


def _on_vllm_cpu() -> bool:
    if _SKIP is not None:
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@pytest.mark.vllm
@needs_vllm
@pytest.mark.skipif(not _on_vllm_cpu(), reason="vLLM's CPU build only")
def test_full_fine_tuning_is_refused_on_vllms_cpu_build(vllm_model, tmp_path):
    cfg = _config(vllm_model, tmp_path / "run", lora=False, eval_prompts=0)
    with pytest.raises(NotImplementedError, match="CPU build does not serve reloaded full weights"):
        build_context(cfg, JBond(cfg))


@pytest.mark.vllm
@needs_vllm
@pytest.mark.skipif(_on_vllm_cpu(), reason="vLLM's CPU build refuses full weights (test above); needs a GPU build")
def test_full_fine_tuning_pushes_each_roles_weights_into_vllm(full_run):
    from vllm import SamplingParams as VLLMSamplingParams

    from bonbench.backends.base import SamplingParams
    from bonbench.backends.sampling import SampleRequest, sample

    cfg, ctx = full_run
    policies, generator = ctx.policies, ctx.generator
    prompts = _prompts(policies)

    def draw(role, seed=5):
        return _draw(generator, role, prompts, n=4, max_tokens=8, seed=seed)

    ref = draw("ref")
    assert _ids(draw("policy")) == _ids(ref)  # untrained: the policy's export is the reference
    with torch.no_grad():
        for param in policies.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ctx.weights_changed()
    moved = draw("policy")
    assert generator._held == ("policy", ctx.version)
    assert _ids(moved) != _ids(ref)
    _assert_logprobs_match(policies, "policy", prompts, moved)

    greedy = generator._generate("policy", prompts, [
        VLLMSamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=list(policies.eos)) for _ in prompts])
    in_process = sample(policies.model, policies.tokenizer,
                        [SampleRequest(p, SamplingParams(temperature=0.0, max_tokens=8)) for p in prompts],
                        policies.eos)
    assert _ids(greedy) == _ids(in_process)

    assert _ids(draw("ref")) == _ids(ref)  # back on the reference's weights
    _assert_logprobs_match(policies, "anchor", prompts, draw("anchor"))

    out = train(cfg, JBond(cfg), ctx)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    after = draw("policy", seed=6)
    assert generator._held == ("policy", ctx.version)
    _assert_logprobs_match(policies, "policy", prompts, after)
    _assert_logprobs_match(policies, "anchor", prompts, draw("anchor", seed=6))
