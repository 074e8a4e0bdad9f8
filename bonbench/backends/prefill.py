"""Prefill a batch of prompts without computing on padding.

A batch of prompts of different lengths is usually left-padded to the longest and run as one
forward pass, which spends compute on every pad. The default task's prompts run from 141 to 296
tokens, so a third of such a pass is padding. Here each distinct prompt runs on its own, unpadded
(its rows, one per adapter, together), and the KV caches are then laid side by side, left-padded,
with an attention mask that hides the pads: what follows (decoding, scoring answers) sees the same
cache a padded pass would have built, up to float rounding. Gradients flow through the copies
when enabled.

Only caches whose layers are plain ``DynamicLayer`` (full attention) can be laid side by side; for
any other (sliding windows, quantised caches) the batch falls back to one padded pass.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from bonbench.backends.lora_stack import stacked_adapters


@dataclass
class Prefilled:
    logits: torch.Tensor  # (S, V): next-token logits after each prompt
    cache: object  # the model's KV cache, batch S, left-padded to the longest prompt
    mask: torch.Tensor  # (S, W) attention mask, 1 on real tokens


def forward_with_adapters(model, adapters: list[str] | None, cache=None, **kw):
    """``model(**kw)``, row ``i`` under PEFT adapter ``adapters[i]`` when ``adapters`` is given (through
    ``bonbench.backends.lora_stack``, else PEFT's ``adapter_names``), and the KV ``cache`` under the
    keyword the model's forward takes (``cache_keyword``)."""
    if cache is not None:
        kw[cache_keyword(model)] = cache
    if adapters is None:
        return model(**kw)
    with stacked_adapters(model, adapters) as stacked:
        return model(**kw) if stacked else model(**kw, adapter_names=adapters)


def cache_keyword(model) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before it (and in a model not yet renamed). A PEFT or DDP wrapper passes the
    keywords on, so the model it wraps is the one asked."""
    inner = model
    while True:
        unwrapped = inner.get_base_model() if hasattr(inner, "get_base_model") else getattr(inner, "module", None)
        if not isinstance(unwrapped, torch.nn.Module) or unwrapped is inner:
            break
        inner = unwrapped
    return _cache_keyword_of(type(inner))


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _returned_cache(out):
    """The KV cache a forward pass returned: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _padded(model, prompts: Sequence[Sequence[int]], adapters: list[str] | None, pad_id: int, device) -> Prefilled:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = forward_with_adapters(model, adapters, input_ids=ids, attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, logits_to_keep=1)
    return Prefilled(out.logits[:, -1, :], _returned_cache(out), mask)


def prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, adapters: Sequence[str] | None = None) -> Prefilled:
    """Prefill ``prompts`` (row ``s`` under PEFT adapter ``adapters[s]`` if given), one pass per
    distinct prompt; rows keep their input order."""
    from transformers.cache_utils import DynamicLayer

    device = next(model.parameters()).device
    adapters = list(adapters) if adapters is not None else None
    groups: dict[tuple[int, ...], list[int]] = {}
    for s, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(s)
    if len(groups) == 1:
        return _padded(model, prompts, adapters, pad_id, device)  # nothing to pad
    width = max(len(p) for p in groups)
    caches, logits, rows = [], [], []
    for prompt, members in groups.items():
        ids = torch.tensor([list(prompt)] * len(members), dtype=torch.long, device=device)
        out = forward_with_adapters(model, [adapters[s] for s in members] if adapters is not None else None,
                                    input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = _returned_cache(out)
        if any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
            return _padded(model, prompts, adapters, pad_id, device)
        caches.append((width - len(prompt), cache))
        logits.append(out.logits[:, -1, :])
        rows.extend(members)
    order = torch.argsort(torch.tensor(rows, device=device))  # back to input order
    cache = caches[-1][1]  # reused as the container of the laid-together tensors
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([F.pad(c.layers[i].keys, (0, 0, left, 0)) for left, c in caches])[order]
        layer.values = torch.cat([F.pad(c.layers[i].values, (0, 0, left, 0)) for left, c in caches])[order]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device) >= width - lengths[:, None]).long()
    return Prefilled(torch.cat(logits)[order], cache, mask)
