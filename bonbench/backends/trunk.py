"""The frozen trunk: decoder layers below the lowest LoRA adapter compute the same thing under every adapter.

A trainer with LoRA on the top L layers samples one prompt under several adapters (J-BOND: the
policy and the anchor; BOND and RLOO: the policy and the adapter-free reference). Prefilling the
prompt once per adapter runs the layers below the adapters once per adapter too, on identical
inputs with identical weights. ``shared_trunk`` runs those layers on one row and widens the hidden
states to one row per adapter where the first adapted layer begins, so the prompt's trunk costs
one pass however many adapters continue it. The widened rows are copies: every layer above sees
exactly the inputs a batch of identical rows would have given it (up to float rounding between
batch sizes).

The trunk's keys and values then hold one row where the adapted layers hold one per adapter;
``widen_cache`` repeats them before the rows join a batch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: the longest ``ModuleList`` whose name ends in ``layers``."""
    stacks = [m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and name.endswith("layers")]
    if not stacks:
        raise ValueError(f"found no decoder layer stack (a ModuleList named '...layers') in {type(model).__name__}")
    return max(stacks, key=len)


def first_adapted_layer(model: torch.nn.Module) -> int:
    """Index of the lowest decoder layer that holds LoRA weights: the layers below it are the frozen
    trunk. 0 when the lowest layer has adapters, when none has (nothing to share), or when the model
    has no recognisable layer stack."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return 0
    adapted = [i for i, layer in enumerate(layers) if any("lora_" in name for name, _ in layer.named_parameters())]
    return adapted[0] if adapted else 0


@contextlib.contextmanager
def shared_trunk(model: torch.nn.Module, first: int, rows: int) -> Iterator[None]:
    """Inside the block, a forward pass given ONE row runs the layers below ``first`` on it and the
    layers from ``first`` on ``rows`` copies of it (PEFT's ``adapter_names`` then names ``rows`` rows)."""
    if first <= 0 or rows <= 1:
        yield
        return

    def widen(module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
            return (hidden.expand(rows, *hidden.shape[1:]).contiguous(), *rest), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].expand(rows, *kwargs["hidden_states"].shape[1:]).contiguous()
        return args, kwargs

    handle = decoder_layers(model)[first].register_forward_pre_hook(widen, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def widen_cache(cache, rows: int) -> None:
    """Repeat the one-row keys and values of the trunk's layers to ``rows`` rows (views, no copy)."""
    for layer in cache.layers:
        if layer.keys.shape[0] == 1 and rows > 1:
            layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            layer.values = layer.values.expand(rows, *layer.values.shape[1:])
