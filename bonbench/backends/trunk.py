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


class _Replay(torch.nn.Module):
    """Stands in for a trunk layer whose outputs are known: writes the layer's keys and values into the
    pass's cache and hands on the hidden state (the trunk's output, after its last layer)."""

    def __init__(self, layer: torch.nn.Module, index: int, keys: torch.Tensor, values: torch.Tensor,
                 output: torch.Tensor | None):
        super().__init__()
        self.layer, self.index, self.keys, self.values, self.output = layer, index, keys, values, output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes a model reads off its layers (attention type, index)
            return getattr(self.layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            cache.update(self.keys, self.values, self.index)
        return self.output if self.output is not None else hidden_states


@contextlib.contextmanager
def replayed_trunk(model: torch.nn.Module, keys, values, output: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward pass of ``model`` over one prompt does not run the layers below the
    first adapted one: it takes their keys and values (``keys[i]``, ``values[i]`` for layer ``i``) and
    the hidden state they pass on (``output``) from an earlier pass over the same prompt, under any
    adapter, since those layers hold none."""
    first = first_adapted_layer(model)
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(first)]
    for i in range(first):
        layers[i] = _Replay(originals[i], i, keys[i], values[i], output if i == first - 1 else None)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@contextlib.contextmanager
def trunk_output(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, each forward pass appends to the yielded list the hidden state the frozen trunk
    hands the first adapted layer (detached); nothing for a model without a trunk."""
    seen: list[torch.Tensor] = []
    first = first_adapted_layer(model)
    if first <= 0:
        yield seen
        return

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = decoder_layers(model)[first].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
