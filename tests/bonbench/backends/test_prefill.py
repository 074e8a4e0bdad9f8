"""Unpadded prefill (``bonbench.backends.prefill``): the laid-together cache behaves as a padded pass's."""

from __future__ import annotations

import torch

from bonbench.backends.prefill import _padded, prefill
from bonbench.backends.transformers import load_causal_lm


def _decode_two(model, done, tokens):
    """Two decoding steps on a prefilled batch; returns the logits of both."""
    mask, cache, out = done.mask, done.cache, []
    for t in tokens:
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        step = model(input_ids=t[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                     past_key_values=cache, use_cache=True)
        cache = step.past_key_values
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
