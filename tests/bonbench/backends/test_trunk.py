"""The shared frozen trunk (``bonbench.backends.trunk``): a prompt sampled under several adapters runs
the layers below the adapters once, and every draw and log-probability is what it was without sharing."""

from __future__ import annotations

import pytest

from bonbench.backends.base import SamplingParams
from bonbench.backends.engine import Engine
from bonbench.backends.rows import BASE, SampleRequest
from bonbench.backends.transformers import eos_ids, load_causal_lm
from bonbench.backends.trunk import decoder_layers, first_adapted_layer
from tests.lora_models import two_adapter_model


@pytest.fixture(scope="module")
def top_lora(tiny_model_path):
    """The 2-layer tiny model with adapters 'a' and 'b' on its top layer only: layer 0 is the trunk."""
    return two_adapter_model(tiny_model_path, layers=[1])


def run(model, tokenizer, requests, *, share: bool, max_step_tokens=None):
    """Sample ``requests`` to the end; counts the rows the trunk's first layer and the adapted layer saw."""
    engine = Engine(model, tokenizer, eos_ids(model, tokenizer), adapters=True, max_step_tokens=max_step_tokens)
    if not share:
        engine._trunk = 0
    seen = {0: 0, 1: 0}  # layer -> row-tokens its attention's input norm saw

    def count(i):
        return lambda module, args: seen.__setitem__(i, seen[i] + args[0].shape[0] * args[0].shape[1])

    layers = decoder_layers(model)
    handles = [layers[i].input_layernorm.register_forward_pre_hook(count(i)) for i in (0, 1)]
    out = [None] * len(requests)
    try:
        for k, r in enumerate(requests):
            engine.add(r, lambda c, k=k: out.__setitem__(k, c))
        while not engine.idle:
            engine.step()
    finally:
        for h in handles:
            h.remove()
    return out, seen


def flat(out, f):
    return [f(c) for r in out for c in r]


def test_the_lowest_adapted_layer_is_found(top_lora, tiny_model_path):
    assert first_adapted_layer(top_lora[0]) == 1
    plain, _ = load_causal_lm(tiny_model_path)
    assert first_adapted_layer(plain) == 0  # no adapters: nothing to share


@pytest.mark.parametrize("max_step_tokens", [None, 7])  # whole prompts, and prompts prefilled in chunks
def test_sharing_the_trunk_changes_no_draw_and_runs_the_trunk_once_per_prompt(top_lora, max_step_tokens):
    model, tokenizer = top_lora
    prompts = [tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"],
               tokenizer("a much longer prompt about dogs and their owners", add_special_tokens=False)["input_ids"]]
    requests = [SampleRequest(p, SamplingParams(n=2, max_tokens=6, seed=3 + i), adapter=a,
                              score_with=("b",) if a == "a" else ())
                for i, p in enumerate(prompts) for a in ("a", "b", BASE)]
    shared, seen_shared = run(model, tokenizer, requests, share=True, max_step_tokens=max_step_tokens)
    alone, seen_alone = run(model, tokenizer, requests, share=False, max_step_tokens=max_step_tokens)
    assert [[c.token_ids for c in r] for r in shared] == [[c.token_ids for c in r] for r in alone]
    assert flat(shared, lambda c: c.logprob) == pytest.approx(flat(alone, lambda c: c.logprob), abs=1e-4)
    assert flat(shared, lambda c: c.logprob_under.get("b", 0.0)) == pytest.approx(
        flat(alone, lambda c: c.logprob_under.get("b", 0.0)), abs=1e-4)
    # three adapters per prompt: the trunk saw each prompt token once instead of three times
    prompt_tokens = sum(len(p) for p in prompts)
    assert seen_alone[0] - seen_shared[0] == 2 * prompt_tokens
    assert seen_alone[1] == seen_shared[1]  # the adapted layer still runs every adapter's row
