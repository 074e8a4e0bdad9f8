"""Shared-prefix ("cascade") attention: the N candidates of a prompt read one copy of its keys and values.

Best-of-N decodes N rows that share a 150-300-token prompt. With one cache row per candidate each
decoding step reads N copies of that prompt's keys and values; attention is then a third of a step
on the default model, and memory-bound. Here the batch keeps

  - per group (one prompt under one adapter): the prompt's keys and values once,
    ``(groups, kv_heads, P, head_dim)``, left-padded to the longest prompt, ``prefix_mask (groups, P)``;
  - per row: the tokens it generated, in ``BufferLayer``s (what ``cache.update`` sees),
    left-padded, ``suffix_mask (rows, S)``,

and ``shared_prefix_attention`` computes each row's attention over both parts and merges them by
their log-sum-exp (exact up to float rounding): the prefix part as one batched product in which
each group's queries (its rows x query heads) meet its keys once.

It plugs into transformers through its attention interfaces: the function is registered under
``ATTENTION`` (``AttentionInterface``, with ``sdpa_mask`` in ``AttentionMaskInterface``) and finds
the prefix through the ``shared_prefix`` keyword that a model's forward passes down to its
attention function. Without that keyword (prefill, training, any other call) it is plain SDPA.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from bonbench.backends.kv import HEADROOM, BufferLayer, lead_padding, left_pad

ATTENTION = "bonbench_shared_prefix"


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix: SharedPrefixCache | None = None, **kwargs):
    """Attention over a group's shared prompt plus the row's own tokens; plain SDPA without ``shared_prefix``.

    query: (R, Hq, 1, D) (one decoding step); key, value: (R, Hkv, S, D), each row's own tokens;
    attention_mask: (R, 1, 1, S) bool or None. Returns ((R, 1, Hq, D), None) as transformers expects.
    """
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[2] != 1:
        raise ValueError("shared-prefix attention decodes one token per row")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("shared-prefix attention computes plain attention: no logit soft-capping, no sinks")
    return _decode_attention(module.layer_idx, query, key, value, attention_mask, scaling, shared_prefix)


@contextlib.contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """oneDNN on or off for the block, and nothing else (``torch.backends.mkldnn.flags`` also sets
    the TF32 flag, which warns on every call on a CPU build)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def product_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of ``tensor`` runs in: autocast's where it is on for its device."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _decode_attention(layer_idx, query, key, value, attention_mask, scaling, c: SharedPrefixCache):
    layer = c.layers[layer_idx]
    rows, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    per_kv = q_heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    # Every product runs in one dtype, autocast's where it is on (the bf16 trunk of distill/precision.py,
    # whose queries and keys come out of the rotary embedding in float32). The prompt's keys and values
    # are cast to it once and kept: casting them at each step took as long as the products themselves.
    dtype = product_dtype(query)
    if layer.prefix_keys.dtype != dtype or layer.prefix_values.dtype != dtype:
        layer.prefix_keys, layer.prefix_values = layer.prefix_keys.to(dtype), layer.prefix_values.to(dtype)
    q = query.reshape(rows, kv_heads, per_kv, dim).to(dtype)  # query head h reads key/value head h // per_kv
    own_bias = None if attention_mask is None else _bias(attention_mask.view(rows, 1, 1, -1))
    own_out, own_lse = _attend(q, key.to(dtype), value.to(dtype), own_bias, scaling)  # (R, Hkv, per_kv, ...)

    # (G, Hkv, M * per_kv, D): each group's rows' queries side by side, M = most rows in a group
    grouped = q.new_zeros((c.groups * c.group_rows, kv_heads, per_kv, dim))
    grouped.index_copy_(0, c.group * c.group_rows + c.slot, q)
    grouped = grouped.view(c.groups, c.group_rows, kv_heads, per_kv, dim).transpose(1, 2)
    grouped = grouped.reshape(c.groups, kv_heads, c.group_rows * per_kv, dim)
    shared_out, shared_lse = _attend(grouped, layer.prefix_keys, layer.prefix_values,
                                     _bias(c.prefix_mask[:, None, None, :]), scaling)
    shared = torch.cat([shared_out, shared_lse[..., None]], -1)  # one gather back to rows for both
    shared = shared.view(c.groups, kv_heads, c.group_rows, per_kv, dim + 1)[c.group, :, c.slot]
    shared_out, shared_lse = shared[..., :dim], shared[..., dim]

    top = torch.maximum(own_lse, shared_lse)
    w_own, w_shared = (own_lse - top).exp()[..., None], (shared_lse - top).exp()[..., None]
    out = (own_out * w_own + shared_out * w_shared) / (w_own + w_shared)
    return out.to(query.dtype).reshape(rows, 1, q_heads, dim), None


def _bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as the additive float32 bias the attention kernels take: 0 where True, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attend(q, k, v, bias, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` (B, H, L, D) over ``k``, ``v`` (B, H, S, D), all in one dtype, with an additive
    ``bias`` (B, 1, 1, S) or None; returns the output (B, H, L, D) and the log-sum-exp of each query's
    scaled scores (B, H, L), both float32, so that attention over two parts can be merged exactly.

    On a CPU it is torch's fused flash-attention kernel, the one ``scaled_dot_product_attention`` runs,
    which also returns the log-sum-exp: per layer and decoding step about 2.5x faster than the explicit
    products on J-BOND's draw (a throwaway timing), 1.15x on the whole sampling call
    (``reports/bench/trainer-sampling-fused.md``). Elsewhere (and for that benchmark's comparison) it is
    ``_attend_explicit``."""
    if q.device.type != "cpu":
        return _attend_explicit(q, k, v, bias, scaling)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scaling)
    return out.float(), lse


def _attend_explicit(q, k, v, bias, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """``_attend`` as explicit products, a log-sum-exp and a softmax over the whole score matrix.

    On a CPU its bf16 products need oneDNN: without it they took 60% of a J-BOND step's sampling on an
    AMX machine. In float32 oneDNN builds a kernel for every new shape, and decoding's shapes change at
    every step (the first pass through a run's lengths took 30x longer with it than without it)."""
    with onednn(q.dtype == torch.bfloat16):
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, -1)
        return torch.matmul(torch.softmax(scores, -1).to(v.dtype), v).float(), lse


AttentionInterface.register(ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def attention_of(model, name: str) -> Iterator[None]:
    """Run ``model``'s attention as ``name`` inside the block (its config's implementation, restored after)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


class SharedPrefixCache(Cache):
    """A decoding batch's keys and values: each group's prompt once, each row's own tokens apart.

    ``layers`` are ``BufferLayer``s holding the rows' own tokens (``(R, Hkv, S, D)``), each with
    ``prefix_keys``/``prefix_values`` ``(G, Hkv, P, D)``. ``group``/``slot``: (R,) each row's group and
    its place among the group's rows; ``prompt_lengths``: (R,) its prompt's length.
    """

    def __init__(self):
        super().__init__(layer_class_to_replicate=BufferLayer)
        self.prefix_mask = torch.zeros((0, 0), dtype=torch.bool)
        self.suffix_mask = torch.zeros((0, 0), dtype=torch.long)
        self.group = self.slot = self.prompt_lengths = torch.zeros(0, dtype=torch.long)
        self.groups = self.group_rows = 0

    @property
    def rows(self) -> int:
        return self.group.shape[0]

    def add_prompt(self, prefilled: Cache, row_slots: list[int]) -> None:
        """Add a prefilled prompt (its cache's batch: one row per adapter) as new groups, with a row
        per entry of ``row_slots`` (which of the prefilled rows it continues)."""
        device = prefilled.layers[0].keys.device
        length = prefilled.layers[0].keys.shape[-2]
        used = sorted(set(row_slots))
        new_group = {s: self.groups + i for i, s in enumerate(used)}
        width = max(self.prefix_mask.shape[1], length)
        if not self.layers:
            self.layers = [BufferLayer() for _ in prefilled.layers]
        for mine, theirs in zip(self.layers, prefilled.layers):
            keys, values = theirs.keys[used], theirs.values[used]
            if getattr(mine, "prefix_keys", None) is None:
                mine.prefix_keys, mine.prefix_values = keys, values
                suffix = keys.new_zeros((0, *keys.shape[1:2], 0, keys.shape[-1]))
                mine.set(suffix, suffix, HEADROOM)
            else:
                mine.prefix_keys = torch.cat([left_pad(mine.prefix_keys, width, 2), left_pad(keys, width, 2)])
                mine.prefix_values = torch.cat([left_pad(mine.prefix_values, width, 2), left_pad(values, width, 2)])
            own = mine.keys.new_zeros((len(row_slots), mine.keys.shape[1], mine.keys.shape[2], mine.keys.shape[3]))
            mine.set(torch.cat([mine.keys, own]), torch.cat([mine.values, own]), mine.keys.shape[2] + HEADROOM)
        ones = torch.ones((len(used), length), dtype=torch.bool, device=device)
        self.prefix_mask = torch.cat([left_pad(self.prefix_mask.to(device), width), left_pad(ones, width)])
        self.suffix_mask = torch.cat([self.suffix_mask.to(device),
                                      self.suffix_mask.new_zeros((len(row_slots), self.suffix_mask.shape[1]))])
        groups = torch.tensor([new_group[s] for s in row_slots], device=device)
        self._regroup(torch.cat([self.group.to(device), groups]))
        self.prompt_lengths = torch.cat([self.prompt_lengths.to(device),
                                         torch.full((len(row_slots),), length, device=device)])

    def select(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` (in that order); groups left without rows go, and padding every row has."""
        kept, group = torch.unique(self.group[rows], return_inverse=True)
        prefix_lead = lead_padding(self.prefix_mask[kept])
        self.suffix_mask = self.suffix_mask[rows]
        suffix_lead = lead_padding(self.suffix_mask)
        self.suffix_mask = self.suffix_mask[:, suffix_lead:]
        self.prefix_mask = self.prefix_mask[kept, prefix_lead:]
        for layer in self.layers:
            layer.prefix_keys = layer.prefix_keys[kept, :, prefix_lead:]
            layer.prefix_values = layer.prefix_values[kept, :, prefix_lead:]
            keys, values = layer.keys[rows, :, suffix_lead:], layer.values[rows, :, suffix_lead:]
            layer.set(keys, values, keys.shape[-2] + HEADROOM)
        self.prompt_lengths = self.prompt_lengths[rows]
        self._regroup(group.reshape(-1))

    def next_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Open a column for one more token per row; returns the step's (attention_mask, position_ids)."""
        generated = self.suffix_mask.sum(-1, keepdim=True)
        self.suffix_mask = torch.cat([self.suffix_mask, self.suffix_mask.new_ones((self.rows, 1))], dim=-1)
        return self.suffix_mask, self.prompt_lengths[:, None] + generated

    def _regroup(self, group: torch.Tensor) -> None:
        self.group = group
        self.groups = int(group.max()) + 1 if group.numel() else 0
        counts = [0] * self.groups
        slots = []
        for g in group.tolist():  # rows are few: a loop is clearer than a scatter
            slots.append(counts[g])
            counts[g] += 1
        self.slot = torch.tensor(slots, dtype=torch.long, device=group.device)
        self.group_rows = max(counts, default=0)
