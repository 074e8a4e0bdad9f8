"""A key/value cache that is written in place, for a batch whose rows come and go.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every decoding step, which copies the whole
cache each time: with 64 rows of a 300-token prompt on SmolLM2-135M that is ~0.9 GB of copying
per step. ``StaticLayer`` preallocates, but for a fixed batch and one shared write position, which
a batch that rows join and leave cannot keep. ``BufferLayer`` sits between the two: its keys and
values live in a buffer with spare columns; a step writes its column in place and attention reads a
view of the filled part. The buffer is reallocated (with headroom) only when it is full or when the
batch changes (rows leave: ``select``; rows join: ``join``), which happens at a small fraction of
the steps.

Rows are left-padded to a common width ``W``; an attention mask of shape ``(rows, W)`` marks the
real columns. ``join`` lays two batches side by side, ``select`` keeps some rows; both drop the
leading columns that have become padding in every row.
"""

from __future__ import annotations

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
        raise NotImplementedError("use bonbench.backends.kv.select, which keeps the mask in step")

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


def check_full_attention(model) -> None:
    """Raise unless every layer of ``model`` is plain full attention (what ``BufferLayer`` stores)."""
    from transformers.cache_utils import DynamicCache

    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {"DynamicLayer"}:
        raise NotImplementedError(f"the in-process engine serves full-attention models only; this one has "
                                  f"{sorted(kinds)} cache layers (use --backend vllm)")


def _lead(mask: torch.Tensor) -> int:
    """Leading columns that are padding in every row."""
    used = mask.any(0)
    return int(used.long().argmax()) if bool(used.any()) else mask.shape[1]


def select(cache: Cache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep ``rows`` of the batch (in that order); returns their mask, leading padding dropped."""
    mask = mask[rows]
    lead = _lead(mask)
    for layer in cache.layers:
        keys, values = layer.keys[rows, :, lead:], layer.values[rows, :, lead:]
        layer.set(keys, values, keys.shape[-2] + HEADROOM)
    return mask[:, lead:]


def join(cache: Cache | None, mask: torch.Tensor | None, other: Cache, other_mask: torch.Tensor,
         ) -> tuple[Cache, torch.Tensor]:
    """Lay ``other``'s rows after ``cache``'s, both left-padded to the wider; returns the joined cache and mask.

    ``cache`` may be ``None`` (an empty batch): ``other`` is then the batch.
    """
    if cache is None or mask is None:
        return other, other_mask
    width = max(mask.shape[1], other_mask.shape[1])
    joined_mask = torch.cat([_left_pad(mask, width), _left_pad(other_mask, width)])
    for mine, theirs in zip(cache.layers, other.layers):
        keys = torch.cat([_left_pad(mine.keys, width, dim=2), _left_pad(theirs.keys, width, dim=2)])
        values = torch.cat([_left_pad(mine.values, width, dim=2), _left_pad(theirs.values, width, dim=2)])
        mine.set(keys, values, width + HEADROOM)
    return cache, joined_mask


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
