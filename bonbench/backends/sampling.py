"""Batched ancestral sampling from a Hugging Face causal LM, with per-row settings.

One call takes several prompts, each with its own ``SamplingParams``. Each prompt is prefilled
once and its KV cache is copied for its ``n`` candidates (the candidates share the prompt's
prefill). Rows that finish are dropped from the batch, so short answers stop costing compute.
Each candidate draws from its own ``torch.Generator``: with a seed, its tokens do not depend on
which other requests happened to share the batch.

With a PEFT model, each request may name the adapter it samples from (PEFT's mixed-adapter
batches): a trainer draws from its policy and its anchor in one batch, so each decoding step reads
the weights once for both. ``score_with`` adds, per candidate, a shadow row under another adapter
that is fed the candidate's tokens instead of drawing its own: it reports log π_other(candidate)
at the cost of one more row in the batch, where a separate scoring pass would run the prompt
again. Prompts are prefilled once per distinct (prompt, adapter).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from bonbench.backends.base import Candidate, SamplingParams
from bonbench.backends.prefill import forward_with_adapters, prefill
from bonbench.seeds import derive_seed


BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    params: SamplingParams
    is_cancelled: Callable[[], bool] = lambda: False
    adapter: str | None = None  # PEFT adapter to sample from (BASE: adapters off); None: the model as is
    score_with: tuple[str, ...] = ()  # adapters that also score each candidate (Candidate.logprob_under)


_SCORE = SamplingParams()  # shadow rows read the model's own distribution: temperature 1, top_p 1


@dataclass
class _Row:
    request: int
    generator: torch.Generator | None
    params: SamplingParams
    slot: int  # which prefilled (prompt, adapter) this row's cache starts from
    adapter: str | None = None
    leader: int | None = None  # shadow rows: the row whose tokens they score
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    uniform_kl_sum: float = 0.0  # self-certainty: sum over its tokens of KL(uniform || p_t)
    finish_reason: str | None = None
    text: str | None = None


def _row_generator(seed: int | None, index: int) -> torch.Generator:
    g = torch.Generator()
    # derive_seed maps any integer into torch's range: a large client seed must not fail its batch.
    g.manual_seed(derive_seed(seed, index) if seed is not None else random.getrandbits(62))
    return g


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
        if row.leader is not None:
            choices.append(-1)  # filled with the leader's token by the caller
            continue
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
    mixed = any(r.adapter is not None or r.score_with for r in requests)
    if mixed and any(r.adapter is None for r in requests):
        raise ValueError("in a batch that names adapters, every request must name one (BASE for none)")

    # One row per candidate, then its shadow rows; each starts from the cache of its (prompt, adapter).
    slots: dict[tuple[tuple[int, ...], str | None], int] = {}

    def slot(request: SampleRequest, adapter: str | None) -> int:
        return slots.setdefault((tuple(request.prompt_ids), adapter), len(slots))

    rows: list[_Row] = []
    for i, r in enumerate(requests):
        for j in range(r.params.n):
            rows.append(_Row(i, _row_generator(r.params.seed, j), r.params, slot(r, r.adapter), r.adapter))
            leader = len(rows) - 1
            rows.extend(_Row(i, None, _SCORE, slot(r, a), a, leader) for a in r.score_with)

    # Prefill each distinct (prompt, adapter) once, unpadded; copy its cache to the rows it starts.
    first = prefill(model, [p for p, _ in slots], pad_id, [a for _, a in slots] if mixed else None)
    cache = first.cache
    index = torch.tensor([row.slot for row in rows], device=device)
    cache.batch_select_indices(index)
    mask = first.mask[index]
    next_logits = first.logits.float()[index]
    active = list(range(len(rows)))  # indices into rows, aligned with the cache's batch

    while active:
        live = [rows[k] for k in active]
        logprobs = _process_logits(next_logits.cpu(), live)
        tokens = _draw(logprobs, live)
        drawn = {k: int(tokens[pos]) for pos, k in enumerate(active) if rows[k].leader is None}
        for pos, k in enumerate(active):
            if rows[k].leader is not None:
                tokens[pos] = drawn[rows[k].leader]
        chosen_lp = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        # self-certainty: KL(uniform || p) = -log V - mean_v log p_v, of the model's own distribution
        # (temperature 1, no top-p), whatever the row samples from
        raw = next_logits.cpu()
        uniform_kl = -math.log(raw.shape[-1]) - (raw.mean(-1) - raw.logsumexp(-1))
        keep = []
        for pos, k in enumerate(active):  # a shadow row comes after its leader and ends with it
            row = rows[k]
            tok = int(tokens[pos])
            row.token_ids.append(tok)
            row.token_logprobs.append(float(chosen_lp[pos]))
            row.uniform_kl_sum += float(uniform_kl[pos])
            if row.leader is not None:
                row.finish_reason = rows[row.leader].finish_reason
            elif requests[row.request].is_cancelled():
                row.finish_reason = "cancelled"
            elif tok in eos:
                row.finish_reason = "stop"
            elif row.params.stop and _cut_at_stop(tokenizer, row):
                row.finish_reason = "stop"
            elif len(row.token_ids) >= row.params.max_tokens:
                row.finish_reason = "length"
            if row.finish_reason is None:
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
        out = forward_with_adapters(
            model,
            [rows[k].adapter for k in active] if mixed else None,
            input_ids=tokens[:, None].to(device),
            attention_mask=mask,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_logits = out.logits[:, -1, :].float()

    results: list[list[Candidate]] = [[] for _ in requests]
    made: dict[int, Candidate] = {}
    for k, row in enumerate(rows):
        if row.leader is None:
            made[k] = _to_candidate(tokenizer, row, eos, keep_tokens)
            results[row.request].append(made[k])
        else:
            made[row.leader].logprob_under[row.adapter] = float(sum(row.token_logprobs))
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
        self_certainty=row.uniform_kl_sum / len(ids) if ids else None,
    )
