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

A trainer samples answers to a prompt under its policy and then runs the same prompt under the same
weights again, with gradients, to score them. ``prompt_states`` runs each prompt once, with
gradients, and keeps what that pass leaves (``PromptState``): the sampling engine continues a
detached view of it (``SampleRequest.prefix``) and ``prefill(known=...)`` reads it for the gradient
pass, so the prompt costs one forward pass a step instead of two. The other roles the sampler needs
(the anchor, the reference) are run the same way, without gradients, each reading the frozen trunk
below the LoRA layers from the policy's pass (``trunk_from``) instead of running it again.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from bonbench.backends.lora_stack import stacked_adapters
from bonbench.backends.trunk import replayed_trunk, trunk_output


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


@dataclass(frozen=True)
class PromptState:
    """One prompt run through the model as one row: what continues it, per layer, and the logits after it.
    A trainer computes it once, with gradients, and both its sampler (``SampleRequest.prefix``,
    detached) and its teacher-forced pass (``prefill``'s ``known``) read it instead of running the
    prompt again. Never written in place: everyone who continues it copies."""

    logits: torch.Tensor  # (V,): next-token logits after the prompt
    keys: tuple[torch.Tensor, ...]  # per layer, (1, kv_heads, P, head_dim)
    values: tuple[torch.Tensor, ...]
    trunk_output: torch.Tensor | None = None  # (1, P, hidden): what the frozen trunk hands the first adapted layer

    def detached(self) -> "PromptState":
        return PromptState(self.logits.detach(), tuple(k.detach() for k in self.keys),
                           tuple(v.detach() for v in self.values), self.trunk_output)


def prompt_states(model, prompts: Sequence[Sequence[int]], trunk_from: Mapping[tuple[int, ...], PromptState] | None = None
                  ) -> dict[tuple[int, ...], PromptState] | None:
    """Each distinct prompt run once, unpadded, as the model stands (its active adapter, gradients if
    enabled); None for a model whose cache is not plain full attention (``prefill`` pads those).
    Prompts in ``trunk_from`` (states of the same model under another adapter) take the frozen
    trunk's part from there instead of running it (``bonbench.backends.trunk.replayed_trunk``)."""
    from transformers.cache_utils import DynamicLayer

    device = next(model.parameters()).device
    states = {}
    for prompt in dict.fromkeys(tuple(p) for p in prompts):
        earlier = (trunk_from or {}).get(prompt)
        replay = contextlib.nullcontext() if earlier is None or earlier.trunk_output is None else \
            replayed_trunk(model, earlier.keys, earlier.values, earlier.trunk_output)
        with replay, trunk_output(model) as handed_on:
            out = model(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True, logits_to_keep=1)
        cache = _returned_cache(out)
        if any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
            return None
        states[prompt] = PromptState(out.logits[0, -1], tuple(layer.keys for layer in cache.layers),
                                     tuple(layer.values for layer in cache.layers), handed_on[0] if handed_on else None)
    return states


def prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, adapters: Sequence[str] | None = None,
            known: Mapping[tuple[int, ...], PromptState] | None = None) -> Prefilled:
    """Prefill ``prompts`` (row ``s`` under PEFT adapter ``adapters[s]`` if given), one pass per
    distinct prompt; rows keep their input order. Without adapters, prompts in ``known`` are read
    from there instead of run (``prompt_states`` of the same model, as it stands)."""
    from transformers.cache_utils import DynamicLayer

    device = next(model.parameters()).device
    adapters = list(adapters) if adapters is not None else None
    known = known if known is not None and adapters is None else {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for s, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(s)
    if len(groups) == 1 and not known:
        return _padded(model, prompts, adapters, pad_id, device)  # nothing to pad
    width = max(len(p) for p in groups)
    parts, logits, rows = [], [], []  # parts: (left padding, per-layer keys, per-layer values)
    for prompt, members in groups.items():
        if prompt in known:
            state = known[prompt]
            keys, values, last = state.keys, state.values, state.logits[None]
            if len(members) > 1:
                keys, values = [k.expand(len(members), *k.shape[1:]) for k in keys], \
                    [v.expand(len(members), *v.shape[1:]) for v in values]
                last = last.expand(len(members), -1)
        else:
            ids = torch.tensor([list(prompt)] * len(members), dtype=torch.long, device=device)
            out = forward_with_adapters(model, [adapters[s] for s in members] if adapters is not None else None,
                                        input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = _returned_cache(out)
            if any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
                return _padded(model, prompts, adapters, pad_id, device)
            keys, values = [la.keys for la in cache.layers], [la.values for la in cache.layers]
            last = out.logits[:, -1, :]
        parts.append((width - len(prompt), keys, values))
        logits.append(last)
        rows.extend(members)
    order = torch.argsort(torch.tensor(rows, device=device))  # back to input order
    layers = [(torch.cat([F.pad(k[i], (0, 0, left, 0)) for left, k, _ in parts])[order],
               torch.cat([F.pad(v[i], (0, 0, left, 0)) for left, _, v in parts])[order])
              for i in range(len(parts[0][1]))]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device) >= width - lengths[:, None]).long()
    return Prefilled(torch.cat(logits)[order], _cache_of(layers), mask)


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A ``DynamicCache`` holding these (keys, values) per layer as they are (its constructor copies them)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache
