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


def test_prompt_states_under_several_adapters_run_the_trunk_once_and_the_engine_continues_them(top_lora):
    """A trainer's prompt pass: the prompt under adapter 'a' (the trunk runs), then under 'b' and the
    base with the trunk replayed from 'a''s pass; the same keys, values and logits as running each
    whole, and the engine continues them for rows under 'a' with shadow rows under 'b', drawing
    and scoring what it draws and scores after its own prefill."""
    import torch

    from bonbench.backends.prefill import prompt_states

    model, tokenizer = top_lora
    prompts = [tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"],
               tokenizer("a much longer prompt about dogs and their owners", add_special_tokens=False)["input_ids"]]
    layers = decoder_layers(model)
    seen = []
    handle = layers[0].input_layernorm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    states = {}
    try:
        with torch.inference_mode():
            for adapter in ("a", "b"):
                model.set_adapter(adapter)
                states[adapter] = prompt_states(model, prompts, trunk_from=states.get("a"))
            with model.disable_adapter():
                states[BASE] = prompt_states(model, prompts, trunk_from=states["a"])
                whole_base = prompt_states(model, prompts)
            model.set_adapter("b")
            whole_b = prompt_states(model, prompts)
    finally:
        model.set_adapter("a")
        handle.remove()
    assert len(seen) == 2 + 2 + 2  # the trunk ran for 'a' and for the two passes run whole, never replayed
    for replayed, whole in ((states["b"], whole_b), (states[BASE], whole_base)):
        for p in map(tuple, prompts):
            torch.testing.assert_close(replayed[p].logits, whole[p].logits, atol=1e-5, rtol=0)
            for mine, theirs in zip(replayed[p].keys + replayed[p].values, whole[p].keys + whole[p].values):
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    requests = [SampleRequest(p, SamplingParams(n=2, max_tokens=6, seed=3 + i), adapter="a", score_with=("b",))
                for i, p in enumerate(prompts)]
    given = [SampleRequest(r.prompt_ids, r.params, adapter="a", score_with=("b",),
                           prefix={a: states[a][tuple(r.prompt_ids)] for a in ("a", "b")}) for r in requests]
    plain, seen_plain = run(model, tokenizer, requests, share=True)
    continued, seen_continued = run(model, tokenizer, given, share=True)
    assert [[c.token_ids for c in r] for r in continued] == [[c.token_ids for c in r] for r in plain]
    assert flat(continued, lambda c: c.logprob_under["b"]) == pytest.approx(flat(plain, lambda c: c.logprob_under["b"]),
                                                                           abs=1e-4)
    assert seen_plain[0] - seen_continued[0] == sum(len(p) for p in prompts)  # no prefill through the trunk
    with pytest.raises(ValueError, match="no state under adapter 'b'"):
        Engine(model, tokenizer, eos_ids(model, tokenizer), adapters=True).add(
            SampleRequest(prompts[0], requests[0].params, adapter="a", score_with=("b",),
                          prefix={"a": states["a"][tuple(prompts[0])]}), lambda c: None)
