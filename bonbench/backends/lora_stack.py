"""Mixed-adapter forward passes with every row's LoRA term in two matrix products.

A batch whose rows run under different PEFT adapters (the trainer's policy, anchor and the
adapter-free reference, sampled together) can go through PEFT's ``adapter_names``: each LoRA layer
then loops over the adapters present, gathers each adapter's rows, runs its two small products and
scatters the result back, and PEFT registers and removes a hook on every LoRA layer per forward pass.
When decoding, where a forward pass is one token per row, those small operations cost as much as
the base model's own.

Here the adapters' factors are stacked instead: ``A = [A_1; ...; A_m]`` (``R x in``, ``R`` the sum of
their ranks) and ``B = [s_1 B_1, ..., s_m B_m]`` (``out x R``, each scaled by its ``alpha / r``). A
``rows x R`` mask keeps, in each row, the block of that row's adapter and zeros the rest (all of it
for a row under ``BASE``), so

    y = W x + B (mask * (A x))

is ``W x + s_a B_a A_a x`` for a row under adapter ``a`` and exactly ``W x`` for a ``BASE`` row:
three operations per layer, whatever the number of adapters. The stacked factors are rebuilt only
when a factor's weights change (a trainer's optimiser step between two sampling calls).

Layers this does not cover (a LoRA variant such as DoRA, active dropout) keep PEFT's path; so
does every layer of a model that has one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from bonbench.backends.rows import BASE

_STACKS = "_bonbench_lora_stacks"  # model attribute: (adapters, layer id) -> _Stack


@dataclass
class _Stack:
    versions: tuple[int, ...]  # the factors' ``_version`` counters when stacked
    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (out, R), scaling included
    blocks: dict[str, slice]  # adapter -> its columns of ``b`` (rows of ``a``)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PEFT's LoRA linear layers of ``model`` (empty for a model without adapters)."""
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def _stackable(layer, adapters: Sequence[str]) -> bool:
    """Plain LoRA, unmerged, without dropout that acts (an ``nn.Dropout`` in eval mode does nothing)."""
    def plain(a: str) -> bool:
        dropout = layer.lora_dropout[a]
        return a not in layer.lora_variant and (isinstance(dropout, torch.nn.Identity) or not dropout.training)

    return not layer.merged and all(plain(a) for a in adapters if a in layer.lora_A)


def _stack(model, layer, adapters: tuple[str, ...]) -> _Stack | None:
    """The layer's stacked factors for ``adapters`` (those it holds; None if it holds none of them),
    rebuilt if any factor changed."""
    held = [a for a in adapters if a in layer.lora_A]
    if not held:
        return None
    factors = [w for a in held for w in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
    versions = tuple(w._version for w in factors)
    stacks = model.__dict__.setdefault(_STACKS, {})
    key = (adapters, id(layer))
    cached = stacks.get(key)
    if cached is not None and cached.versions == versions:
        return cached
    blocks, start = {}, 0
    for a in held:
        rank = layer.lora_A[a].weight.shape[0]
        blocks[a] = slice(start, start + rank)
        start += rank
    with torch.no_grad():
        a_cat = torch.cat([layer.lora_A[a].weight for a in held])
        b_cat = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in held], dim=1)
    stacks[key] = _Stack(versions, a_cat, b_cat, blocks)
    return stacks[key]


def _row_mask(stack: _Stack, adapters: Sequence[str], dtype, device) -> torch.Tensor:
    mask = torch.zeros(len(adapters), stack.a.shape[0], dtype=dtype)
    for row, a in enumerate(adapters):
        if a in stack.blocks:
            mask[row, stack.blocks[a]] = 1
    return mask.to(device)


def _stacked_forward(layer, stack: _Stack | None, mask: torch.Tensor | None):
    """The layer's forward for the block: the base layer plus the masked stacked term (none for ``None``)."""
    base = layer.base_layer

    def forward(x, *args, **kwargs):
        result = base(x, *args, **kwargs)
        if stack is None:
            return result
        h = x.to(stack.a.dtype) @ stack.a.T  # (rows, ..., R)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return result + (h @ stack.b.T).to(result.dtype)

    return forward


@contextlib.contextmanager
def stacked_adapters(model: torch.nn.Module, adapters: Sequence[str]) -> Iterator[bool]:
    """Inside the block, a forward pass of ``model`` runs row ``i`` under adapter ``adapters[i]``
    (``BASE``: none) through the stacked factors. Yields False, changing nothing, where some LoRA
    layer is not covered or gradients are on (the stacks are built without them): the caller then
    passes ``adapter_names`` to PEFT instead."""
    layers = lora_layers(model)
    names = tuple(dict.fromkeys(a for a in adapters if a != BASE))
    known = {a for layer in layers for a in layer.lora_A}
    if layers and set(names) - known:  # PEFT refuses these too; unchecked, their rows would run as the base
        raise ValueError(f"no adapter named {sorted(set(names) - known)}: the model has {sorted(known)}")
    if torch.is_grad_enabled() or not layers or not all(_stackable(layer, names) for layer in layers):
        yield False
        return
    masks: dict[tuple, torch.Tensor] = {}  # layers with the same blocks share one mask
    patched = []
    try:
        for layer in layers:
            stack, mask = _stack(model, layer, names), None  # stack None: no row's adapter is in this layer
            if stack is not None:
                key = tuple((a, s.start, s.stop) for a, s in stack.blocks.items())
                if key not in masks:
                    masks[key] = _row_mask(stack, adapters, stack.a.dtype, stack.a.device)
                mask = masks[key]
            layer.forward = _stacked_forward(layer, stack, mask)  # a function: set as an instance attribute
            patched.append(layer)
        yield True
    finally:
        for layer in patched:
            del layer.forward
