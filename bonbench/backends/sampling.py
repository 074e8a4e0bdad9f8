"""Batched ancestral sampling from a Hugging Face causal LM, with per-row settings.

One call takes several prompts, each with its own ``SamplingParams``. Each prompt is prefilled
once and its KV cache is copied for its ``n`` candidates (the candidates share the prompt's
prefill). Rows that finish are dropped from the batch, so short answers stop costing compute.
Each candidate draws from its own ``torch.Generator``: with a seed, its tokens do not depend on
which other requests happened to share the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from bonbench.backends.base import Candidate, SamplingParams


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    params: SamplingParams
    is_cancelled: Callable[[], bool] = lambda: False


@dataclass
class _Row:
    request: int
    generator: torch.Generator
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None


def _row_generator(seed: int | None, index: int) -> torch.Generator:
    g = torch.Generator()
    # Modulo 2**64: torch takes seeds in [-2**63, 2**64) and raises beyond, which would fail every
    # request sharing the batch with a large client seed. Seeds that worked before draw the same numbers.
    g.manual_seed((seed * 1_000_003 + index) % 2**64 if seed is not None else random.getrandbits(62))
    return g


def _left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _process_logits(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Temperature and top-p per row; returns log-probabilities of the distribution sampled from.

    logits: (A, V) float32. Greedy rows (temperature 0) keep temperature 1 here: their reported
    log-probability is the model's own.
    """
    temps = torch.tensor([r.params.temperature or 1.0 for r in rows], dtype=logits.dtype)
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype)
    if (top_p < 1).any():
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()  # mass strictly above each token
        drop_sorted = before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


def _draw(logprobs: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Gumbel-max sampling with each row's own generator; greedy rows take the argmax."""
    choices = []
    for i, row in enumerate(rows):
        if row.params.temperature == 0:
            choices.append(int(logprobs[i].argmax()))
            continue
        u = torch.rand(logprobs.shape[-1], generator=row.generator, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        choices.append(int((logprobs[i].double() + gumbel).argmax()))
    return torch.tensor(choices, dtype=torch.long)


@torch.inference_mode()
def sample(
    model,
    tokenizer,
    requests: Sequence[SampleRequest],
    eos_token_ids: Sequence[int],
    *,
    keep_tokens: bool = True,
) -> list[list[Candidate]]:
    """Sample ``params.n`` candidates for every request; returns them per request, in draw order.

    A request whose ``is_cancelled()`` turns true stops generating; its rows end with
    ``finish_reason == "cancelled"``.
    """
    if not requests:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]
    eos = set(eos_token_ids)

    # Prefill each distinct prompt once; only the last position's logits are needed.
    ids, mask = _left_pad([r.prompt_ids for r in requests], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values

    # One row per candidate: copy each prompt's cache n times.
    owner = [i for i, r in enumerate(requests) for _ in range(r.params.n)]
    index = torch.tensor(owner, device=device)
    cache.batch_select_indices(index)
    mask = mask[index]
    next_logits = out.logits[:, -1, :].float()[index]
    rows = [
        _Row(request=i, generator=_row_generator(requests[i].params.seed, j), params=requests[i].params)
        for i, r in enumerate(requests)
        for j in range(r.params.n)
    ]
    active = list(range(len(rows)))  # indices into rows, aligned with the cache's batch

    while active:
        live = [rows[k] for k in active]
        logprobs = _process_logits(next_logits.cpu(), live)
        tokens = _draw(logprobs, live)
        chosen_lp = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        keep = []
        for pos, k in enumerate(active):
            row = rows[k]
            tok = int(tokens[pos])
            row.token_ids.append(tok)
            row.token_logprobs.append(float(chosen_lp[pos]))
            if requests[row.request].is_cancelled():
                row.finish_reason = "cancelled"
            elif tok in eos:
                row.finish_reason = "stop"
            elif row.params.stop and _cut_at_stop(tokenizer, row):
                row.finish_reason = "stop"
            elif len(row.token_ids) >= row.params.max_tokens:
                row.finish_reason = "length"
            else:
                keep.append(pos)
        if len(keep) < len(active):
            if not keep:
                break
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask = mask[sel]
            tokens = tokens[keep]
            active = [active[p] for p in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        step_positions = (mask.sum(-1, keepdim=True) - 1).to(device)
        out = model(
            input_ids=tokens[:, None].to(device),
            attention_mask=mask,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_logits = out.logits[:, -1, :].float()

    results: list[list[Candidate]] = [[] for _ in requests]
    for row in rows:
        results[row.request].append(_to_candidate(tokenizer, row, eos, keep_tokens))
    return results


def _cut_at_stop(tokenizer, row: _Row) -> bool:
    """True (and the row's text cut before the stop string) once a stop string appears."""
    text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
    hits = [text.find(s) for s in row.params.stop if s and s in text]
    if not hits:
        return False
    row.text = text[: min(hits)]
    return True


def _to_candidate(tokenizer, row: _Row, eos: set[int], keep_tokens: bool) -> Candidate:
    ids = row.token_ids
    visible = ids[:-1] if ids and ids[-1] in eos else ids
    text = row.text if row.text is not None else tokenizer.decode(visible, skip_special_tokens=True)
    return Candidate(
        text=text,
        num_tokens=len(ids),
        finish_reason=row.finish_reason or "length",
        logprob=float(sum(row.token_logprobs)),
        token_ids=list(ids),
        tokens=[tokenizer.decode([t]) for t in ids] if (keep_tokens and row.params.logprobs) else [],
        token_logprobs=list(row.token_logprobs) if row.params.logprobs else [],
    )
