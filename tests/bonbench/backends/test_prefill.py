"""Unpadded prefill (``bonbench.backends.prefill``): the laid-together cache behaves as a padded pass's."""

from __future__ import annotations

import inspect

import torch

from bonbench.backends.prefill import _padded, cache_keyword, forward_with_adapters, prefill
from bonbench.backends.transformers import load_causal_lm


def _decode_two(model, done, tokens):
    """Two decoding steps on a prefilled batch; returns the logits of both."""
    mask, cache, out = done.mask, done.cache, []
    for t in tokens:
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        step = forward_with_adapters(model, None, cache=cache, input_ids=t[:, None], attention_mask=mask,
                                     position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True)
        out.append(step.logits[:, -1].float())
    return torch.stack(out, 1)


@torch.inference_mode()
def test_unpadded_prefill_continues_exactly_like_a_padded_one(tiny_model_path):
    model, tokenizer = load_causal_lm(tiny_model_path)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(5, 1000, (n,), generator=g).tolist() for n in (3, 17, 9))
    prompts = [b, a, c, a]  # lengths differ, one prompt twice, not in length order
    merged = prefill(model, prompts, pad_id=0)
    padded = _padded(model, prompts, None, 0, "cpu")
    assert merged.mask.tolist() == padded.mask.tolist()
    assert merged.cache.get_seq_length() == padded.cache.get_seq_length() == 17
    torch.testing.assert_close(merged.logits, padded.logits, atol=1e-4, rtol=0)
    tokens = torch.randint(5, 1000, (2, 4), generator=g)
    torch.testing.assert_close(_decode_two(model, merged, tokens), _decode_two(model, padded, tokens), atol=1e-4, rtol=0)
    # and each row equals its prompt run alone
    for row, p in enumerate(prompts):
        alone = model(input_ids=torch.tensor([p])).logits[0, -1].float()
        torch.testing.assert_close(merged.logits[row].float(), alone, atol=1e-4, rtol=0)


class _OlderModel(torch.nn.Module):
    """A forward as transformers wrote it before 5.24, which would ignore a ``cache=`` keyword."""

    def forward(self, input_ids, past_key_values=None, **kwargs):
        return past_key_values


@torch.inference_mode()
def test_the_kv_cache_goes_under_the_keyword_the_wrapped_model_takes(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    model, _ = load_causal_lm(tiny_model_path)
    takes = [name for name in ("cache", "past_key_values") if name in inspect.signature(model.forward).parameters]
    assert cache_keyword(model) == takes[0]
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_keyword(wrapped) == takes[0]  # not PEFT's own forward, which takes **kwargs
    older = _OlderModel()
    assert cache_keyword(older) == "past_key_values"
    assert forward_with_adapters(older, None, cache="the cache", input_ids=None) == "the cache"
    ids = torch.tensor([[5, 6, 7]])
    first = forward_with_adapters(wrapped, None, input_ids=ids, use_cache=True)
    cache = first["cache"] if "cache" in first else first["past_key_values"]
    step = forward_with_adapters(wrapped, None, cache=cache, input_ids=torch.tensor([[8]]),
                                 position_ids=torch.tensor([[3]]), use_cache=True)
    whole = wrapped(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], whole, atol=1e-5, rtol=0)  # the cache was used


@torch.inference_mode()
def test_prefill_reads_known_prompt_states_as_if_it_ran_them(tiny_model_path):
    from bonbench.backends.prefill import prompt_states

    model, _ = load_causal_lm(tiny_model_path)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(5, 1000, (n,), generator=g).tolist() for n in (4, 15, 8))
    prompts = [b, a, c, a]
    states = prompt_states(model, [a, c])  # b is not known: prefill runs it
    assert set(states) == {tuple(a), tuple(c)} and states[tuple(c)].keys[0].shape[-2] == 8
    read = prefill(model, prompts, pad_id=0, known=states)
    ran = prefill(model, prompts, pad_id=0)
    assert read.mask.tolist() == ran.mask.tolist()
    torch.testing.assert_close(read.logits, ran.logits, atol=1e-5, rtol=0)
    for mine, theirs in zip(read.cache.layers, ran.cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=0)
    tokens = torch.randint(5, 1000, (2, 4), generator=g)
    torch.testing.assert_close(_decode_two(model, read, tokens), _decode_two(model, ran, tokens), atol=1e-4, rtol=0)
    before = states[tuple(a)].keys[0].clone()
    prefill(model, [a, a], pad_id=0, known=states)  # one prompt twice: read, never written
    torch.testing.assert_close(states[tuple(a)].keys[0], before, atol=0, rtol=0)
