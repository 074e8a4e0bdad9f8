"""Shared-prefix attention (``bonbench.backends.shared_prefix``) against attention over each row's full
copy of its keys and values, and the batch bookkeeping that rows joining and leaving rely on."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.cache_utils import Cache

from bonbench.backends.kv import BufferLayer
from bonbench.backends.shared_prefix import (SharedPrefixCache, _attend, _attend_explicit, product_dtype,
                                             shared_prefix_attention)

HEADS, KV_HEADS, DIM, LAYERS = 6, 2, 8, 1


class _Attention(torch.nn.Module):
    layer_idx = 0
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def _prefilled(g: torch.Generator, adapters: int, length: int) -> Cache:
    cache = Cache(layer_class_to_replicate=BufferLayer)
    keys = torch.randn(adapters, KV_HEADS, length, DIM, generator=g)
    cache.update(keys, torch.randn(keys.shape, generator=g), 0)
    return cache


def _brute_force(query, prefixes, own_keys, own_values, own_mask):
    """Row by row: softmax over the row's whole prompt then its own real tokens."""
    out = []
    for r, (pk, pv) in enumerate(prefixes):
        real = own_mask[r].bool()
        k = torch.cat([pk, own_keys[r][:, real]], dim=1).repeat_interleave(HEADS // KV_HEADS, 0)
        v = torch.cat([pv, own_values[r][:, real]], dim=1).repeat_interleave(HEADS // KV_HEADS, 0)
        weights = torch.softmax(query[r] @ k.transpose(-1, -2) * DIM**-0.5, -1)  # (H, 1, L)
        out.append((weights @ v).transpose(0, 1))  # (1, H, D)
    return torch.stack(out)


# bf16 autocast (distill/precision.py's trunk): float32 inputs, products in bf16 through oneDNN
@pytest.mark.parametrize("autocast", [False, True])
def test_attention_over_one_shared_copy_equals_attention_over_each_rows_own_copy(autocast):
    g = torch.Generator().manual_seed(0)
    cache = SharedPrefixCache()
    prompts = [_prefilled(g, 2, 5), _prefilled(g, 1, 9), _prefilled(g, 1, 3)]
    row_slots = [[0, 1, 0, 0], [0], [0, 0, 0]]  # first prompt under two adapters: two groups
    prefixes = []
    for prompt, slots in zip(prompts, row_slots):
        cache.add_prompt(prompt, slots)
        layer = prompt.layers[0]
        prefixes += [(layer.keys[s], layer.values[s]) for s in slots]
    assert cache.groups == 4 and cache.rows == 8 and cache.group_rows == 3
    # rows generate different numbers of tokens: each row's own part is left-padded
    for step in range(3):
        mask, positions = cache.next_step()
        if step == 0:
            assert positions[:, 0].tolist() == [5, 5, 5, 5, 9, 3, 3, 3]
        new = torch.randn(cache.rows, KV_HEADS, 1, DIM, generator=g)
        keys, values = cache.layers[0].update(new, torch.randn(new.shape, generator=g))
    cache.suffix_mask[[1, 6], 0] = 0  # as if two rows had joined a step later
    query = torch.randn(cache.rows, HEADS, 1, DIM, generator=g)
    mask4d = cache.suffix_mask.bool()[:, None, None, :]
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        out, _ = shared_prefix_attention(_Attention(), query, keys, values, mask4d, shared_prefix=cache)
    expected = _brute_force(query, prefixes, keys, values, cache.suffix_mask)
    tolerance = 3e-2 if autocast else 1e-5  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("attend", [_attend, _attend_explicit], ids=["fused", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_attention_kernels_return_the_output_and_the_log_sum_exp_of_a_masked_softmax(attend, dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(shape, generator=g) for shape in [(4, 2, 3, DIM), (4, 2, 11, DIM), (4, 2, 11, DIM)])
    mask = torch.rand(4, 1, 1, 11, generator=g) > 0.4
    mask[..., 0] = True  # every query sees at least one key, as in decoding
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    out, lse = attend(q.to(dtype), k.to(dtype), v.to(dtype), bias, 0.3)
    # float64, from the inputs as the kernel saw them
    scores = (q.to(dtype).double() @ k.to(dtype).double().transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(~mask, float("-inf"))
    expected = torch.softmax(scores, -1) @ v.to(dtype).double()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=tolerance, rtol=tolerance)


def test_the_products_dtype_is_autocasts_where_it_is_on():
    x = torch.zeros(2, dtype=torch.float32)
    assert product_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert product_dtype(x) == torch.bfloat16
        assert (x[:, None] @ x[None, :]).dtype == torch.bfloat16  # what the rule stands on
    assert product_dtype(x.bfloat16()) == torch.bfloat16


def test_selecting_rows_drops_groups_left_empty_and_padding_no_row_needs():
    g = torch.Generator().manual_seed(1)
    cache = SharedPrefixCache()
    short, long = _prefilled(g, 1, 3), _prefilled(g, 1, 7)
    cache.add_prompt(short, [0, 0])
    cache.add_prompt(long, [0])
    assert cache.prefix_mask.shape == (2, 7) and cache.prefix_mask[0].sum() == 3
    cache.next_step()
    cache.layers[0].update(*(torch.randn(3, KV_HEADS, 1, DIM, generator=g),) * 2)
    cache.select(torch.tensor([1]))
    assert cache.groups == 1 and cache.rows == 1 and cache.slot.tolist() == [0]
    assert cache.prefix_mask.shape == (1, 3) and bool(cache.prefix_mask.all())
    torch.testing.assert_close(cache.layers[0].prefix_keys[0], short.layers[0].keys[0])
    assert cache.layers[0].keys.shape == (1, KV_HEADS, 1, DIM) and cache.prompt_lengths.tolist() == [3]


def test_without_a_shared_prefix_it_is_plain_sdpa():
    g = torch.Generator().manual_seed(2)
    query = torch.randn(2, HEADS, 4, DIM, generator=g)
    keys, values = torch.randn(2, KV_HEADS, 4, DIM, generator=g), torch.randn(2, KV_HEADS, 4, DIM, generator=g)
    out, _ = shared_prefix_attention(_Attention(), query, keys, values, None, is_causal=True)
    k, v = keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
