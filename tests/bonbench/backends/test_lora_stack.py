"""Mixed-adapter forward passes through stacked LoRA factors (``bonbench.backends.lora_stack``): the same
logits as PEFT's ``adapter_names``, base rows bit for bit, fresh factors after a weight update, and PEFT's
path wherever the stack does not apply."""

from __future__ import annotations

import pytest
import torch

from bonbench.backends.lora_stack import lora_layers, stacked_adapters
from bonbench.backends.prefill import forward_with_adapters
from bonbench.backends.rows import BASE
from tests.lora_models import two_adapter_model

ROWS = ["a", BASE, "b", "a", BASE]


@pytest.fixture(scope="module")
def lora(tiny_model_path):
    return two_adapter_model(tiny_model_path, layers=[1])


def ids(tokenizer, rows: int) -> torch.Tensor:
    one = tokenizer("the cat sat on the mat and looked at the dog", add_special_tokens=False)["input_ids"]
    return torch.tensor([one] * rows)


def peft_logits(model, input_ids, adapters):
    return model(input_ids=input_ids, adapter_names=list(adapters)).logits


def stacked_logits(model, input_ids, adapters):
    with stacked_adapters(model, adapters) as stacked:
        assert stacked
        return model(input_ids=input_ids).logits


@torch.no_grad()
def test_stacked_rows_match_peft_and_base_rows_are_exact(lora):
    model, tokenizer = lora
    x = ids(tokenizer, len(ROWS))
    want, got = peft_logits(model, x, ROWS), stacked_logits(model, x, ROWS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        base = model(input_ids=x[:1]).logits[0]
    for i, adapter in enumerate(ROWS):
        if adapter == BASE:
            assert torch.equal(got[i], want[i])  # W x + 0: the adapters' zeros add nothing
    torch.testing.assert_close(got[1], base, rtol=1e-5, atol=1e-5)
    # the three roles really differ, so the comparison above can tell them apart
    assert (got[0] - got[1]).abs().max() > 1e-2 and (got[0] - got[2]).abs().max() > 1e-2


@torch.no_grad()
def test_the_layers_forward_is_restored_and_base_only_batches_skip_every_adapter(lora):
    model, tokenizer = lora
    x = ids(tokenizer, 2)
    with model.disable_adapter():
        base = model(input_ids=x).logits
    assert torch.equal(stacked_logits(model, x, [BASE, BASE]), base)
    assert all("forward" not in layer.__dict__ for layer in lora_layers(model))
    active = model(input_ids=x).logits  # outside the block the active adapter applies again
    torch.testing.assert_close(active, peft_logits(model, x, [model.active_adapter] * 2))


@torch.no_grad()
def test_a_weight_update_between_passes_is_seen(lora):
    model, tokenizer = lora
    x = ids(tokenizer, len(ROWS))
    before = stacked_logits(model, x, ROWS)
    factor = next(p for n, p in model.named_parameters() if "lora_B.b" in n)
    saved = factor.clone()
    try:
        factor.add_(0.5)  # in place, as an optimiser step does
        after = stacked_logits(model, x, ROWS)
        torch.testing.assert_close(after, peft_logits(model, x, ROWS), rtol=1e-5, atol=1e-5)
        assert (after[2] - before[2]).abs().max() > 1e-3  # adapter b's row moved
        assert torch.equal(after[0], before[0])  # adapter a's did not
    finally:
        factor.copy_(saved)


def test_an_unknown_adapter_is_refused(lora):
    model, tokenizer = lora
    with pytest.raises(ValueError, match="no adapter named \\['c'\\]"):
        forward_with_adapters(model, ["a", "c"], input_ids=ids(tokenizer, 2))
    assert all("forward" not in layer.__dict__ for layer in lora_layers(model))


def test_with_gradients_on_peft_computes_the_pass(lora):
    model, tokenizer = lora
    x = ids(tokenizer, len(ROWS))
    with stacked_adapters(model, ROWS) as stacked:
        assert not stacked
    out = forward_with_adapters(model, ROWS, input_ids=x).logits
    out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A.a" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def peft_model(tiny_model_path, **lora):
    from peft import LoraConfig, get_peft_model

    from bonbench.backends.transformers import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, config, adapter_name="a")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model, tokenizer


@torch.no_grad()
def test_dropout_that_acts_falls_back_to_peft(tiny_model_path):
    model, tokenizer = peft_model(tiny_model_path, lora_dropout=0.5)
    model.train()
    with stacked_adapters(model, ["a", BASE]) as stacked:
        assert not stacked  # PEFT's path draws the dropout masks
    model.eval()  # nn.Dropout in eval mode passes its input through: stackable
    x = ids(tokenizer, 2)
    torch.testing.assert_close(stacked_logits(model, x, ["a", BASE]), peft_logits(model, x, ["a", BASE]),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_lora_variant_is_left_to_peft(tiny_model_path):
    model, tokenizer = peft_model(tiny_model_path, use_dora=True)
    model.eval()
    with stacked_adapters(model, ["a", BASE]) as stacked:
        assert not stacked
    with pytest.raises(ValueError, match="DoRA"):  # PEFT's own answer to mixed batches with DoRA
        forward_with_adapters(model, ["a", BASE], input_ids=ids(tokenizer, 2))
