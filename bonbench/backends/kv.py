"""Key/value storage written in place, for a batch whose rows come and go.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every decoding step, which copies the whole
cache each time: with 64 rows of a 300-token prompt on SmolLM2-135M that is ~0.9 GB of copying
per step. ``StaticLayer`` preallocates, but for a fixed batch and one shared write position, which
a batch that rows join and leave cannot keep. ``BufferLayer`` sits between the two: its keys and
values live in a buffer with spare columns; a step writes its column in place and attention reads a
view of the filled part. The buffer is reallocated (with headroom) only when it is full or when the
batch changes (``bonbench.backends.shared_prefix.SharedPrefixCache`` adds and drops rows), which
happens at a small fraction of the steps. Prompts being prefilled use it too, chunk after chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

HEADROOM = 64  # spare columns allocated each time a buffer is (re)built


class BufferLayer(DynamicLayer):
    """One layer's keys and values, ``(rows, heads, capacity, head_dim)``, filled up to ``length``."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self._keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.keys, self.values = self._keys, self._values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._keys = _grown(self._keys, self.length, end + max(HEADROOM, end // 4))
            self._values = _grown(self._values, self.length, end + max(HEADROOM, end // 4))
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def set(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Hold ``keys``/``values`` (``(rows, heads, length, head_dim)``) in a fresh buffer of ``capacity``."""
        self.device = keys.device
        self.length = keys.shape[-2]
        self._keys = _grown(keys, self.length, capacity)
        self._values = _grown(values, self.length, capacity)
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        self.is_initialized = True

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("rows are selected by their batch (SharedPrefixCache.select), masks and all")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a BufferLayer is not cropped")


def _grown(tensor: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """A new ``(…, capacity, head_dim)`` buffer holding ``tensor[:, :, :used]`` at its start."""
    out = tensor.new_empty((*tensor.shape[:2], capacity, tensor.shape[-1]))
    out[:, :, :used] = tensor[:, :, :used]
    return out


def new_cache() -> Cache:
    """An empty cache of ``BufferLayer``s (one is added per attention layer on first use)."""
    return Cache(layer_class_to_replicate=BufferLayer)


class EngineContext(NamedTuple):
    """How long a sequence (prompt plus ``max_tokens``) the engine serves for a model, and why."""

    tokens: int | None  # None: the model does not say
    hint: str  # what a refusal adds ("" when the limit is the model's own context)


def attention_window(model) -> int | None:
    """The fewest tokens a layer of ``model`` attends to (its smallest sliding window or attention
    chunk), or ``None`` when every layer attends to the whole sequence.

    The engine computes full causal attention (``bonbench.backends.shared_prefix``). A layer that
    attends to the last W tokens (or within chunks of W) computes exactly that on any sequence of at
    most W tokens, so the engine serves such a model up to W (``engine_context``). Raises
    ``NotImplementedError`` for a model whose attention it cannot compute at any length.
    """
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    config = model.config.get_text_config(decoder=True)
    why = None
    if getattr(config, "attn_logit_softcapping", None) is not None:
        why = "its attention caps its logits (attn_logit_softcapping)"
    elif getattr(config, "use_bidirectional_attention", False):
        why = "its attention is bidirectional"
    elif any(isinstance(getattr(module, "sinks", None), torch.Tensor) for module in model.modules()):
        why = "its attention has sinks"
    layers = DynamicCache(config=model.config).layers
    kinds = {type(layer).__name__ for layer in layers} - {"DynamicLayer", "DynamicSlidingWindowLayer"}
    if kinds:
        why = f"it has {', '.join(sorted(kinds))} cache layers"
    if why is not None:
        raise NotImplementedError(f"the in-process engine computes causal attention over every token, plain or "
                                  f"within a sliding window; this model cannot be served by it: {why} "
                                  f"(use --backend vllm)")
    return min((layer.sliding_window for layer in layers if isinstance(layer, DynamicSlidingWindowLayer)),
               default=None)


def check_full_attention(model) -> None:
    """Raise unless the engine's attention is ``model``'s on the sequences ``engine_context`` admits."""
    attention_window(model)


def engine_context(model) -> EngineContext:
    """The longest prompt plus ``max_tokens`` the engine serves for ``model``: its context, or its
    smallest attention window where that is shorter (beyond it the engine's answers would be wrong)."""
    context = getattr(model.config, "max_position_embeddings", None)
    window = attention_window(model)
    if window is None or (context is not None and context <= window):
        return EngineContext(context, "")
    return EngineContext(window, f"this model attends within a sliding window of {window} tokens, and the "
                                 f"in-process engine serves only sequences that fit in it (use --backend vllm "
                                 f"for longer ones)")


def lead_padding(mask: torch.Tensor) -> int:
    """Leading columns of a ``(rows, width)`` mask that are padding in every row."""
    used = mask.any(0)
    return int(used.long().argmax()) if bool(used.any()) else mask.shape[1]


def left_pad(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
