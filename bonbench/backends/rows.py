"""One sampled row at a time: what a request asks for, and how each row draws its next token.

A request asks for ``params.n`` candidates; each candidate is one row of the decoding batch with
its own ``torch.Generator``, so a seeded row draws the same tokens whatever else shares the batch.
A shadow row (``SampleRequest.score_with``) draws nothing: it is fed its leader's tokens under
another PEFT adapter and reports their log-probability there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from bonbench.backends.base import Candidate, PartialScorer, SamplingParams
from bonbench.seeds import derive_seed

if TYPE_CHECKING:
    from bonbench.backends.prefill import PromptState

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    params: SamplingParams
    is_cancelled: Callable[[], bool] = lambda: False
    adapter: str | None = None  # PEFT adapter to sample from (BASE: adapters off); None: the model as is
    score_with: tuple[str, ...] = ()  # adapters that also score each candidate (Candidate.logprob_under)
    # params.early_rejection's scorer: the partial texts of this request's running candidates -> a score each
    score_partial: PartialScorer | None = None
    # the prompt already run (bonbench.backends.prefill.prompt_states) under ``adapter`` and each of
    # ``score_with``: the engine continues those instead of prefilling
    prefix: Mapping[str | None, PromptState] | None = None


SCORE = SamplingParams()  # shadow rows read the model's own distribution: temperature 1, top_p 1


@dataclass(eq=False)
class Row:
    generator: torch.Generator | None
    params: SamplingParams
    adapter: str | None = None
    leader: Row | None = None  # shadow rows: the row whose tokens they score
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    uniform_kl_sum: float = 0.0  # self-certainty: the sum over its tokens of KL(uniform || p_t)
    finish_reason: str | None = None
    text: str | None = None
    partial_scores: list[float] = field(default_factory=list)  # early rejection: one per checkpoint scored at
    rejected_at: int | None = None


def request_rows(request: SampleRequest) -> list[Row]:
    """The rows of ``request``: each candidate, followed by its shadow rows."""
    rows: list[Row] = []
    for j in range(request.params.n):
        leader = Row(row_generator(request.params.seed, j), request.params, request.adapter)
        rows.append(leader)
        rows.extend(Row(None, SCORE, a, leader) for a in request.score_with)
    return rows


def row_generator(seed: int | None, index: int) -> torch.Generator:
    g = torch.Generator()
    # derive_seed maps any integer into torch's range: a large client seed must not fail its batch.
    g.manual_seed(derive_seed(seed, index) if seed is not None else random.getrandbits(62))
    return g


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(uniform || p) per row of the model's own next-token distribution (temperature 1, no top-p):
    ``-log V - mean_v log p_v``; the per-token term of self-certainty. logits: (A, V) -> (A,)."""
    return -math.log(logits.shape[-1]) - (logits.mean(-1) - logits.logsumexp(-1))


def process_logits(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
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
        drop_sorted[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 keeps it alone)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


def draw(logprobs: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Gumbel-max sampling with each row's own generator; greedy rows take the argmax; shadow rows
    take their leader's token (a leader comes before its shadows in ``rows``)."""
    choices: list[int] = []
    position: dict[int, int] = {}
    for i, row in enumerate(rows):
        position[id(row)] = i
        if row.leader is not None:
            choices.append(choices[position[id(row.leader)]])
        elif row.params.temperature == 0:
            choices.append(int(logprobs[i].argmax()))
        else:
            u = torch.rand(logprobs.shape[-1], generator=row.generator, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
            choices.append(int((logprobs[i].double() + gumbel).argmax()))
    return torch.tensor(choices, dtype=torch.long)


def cut_at_stop(tokenizer, row: Row) -> bool:
    """True (and the row's text cut before the stop string) once a stop string appears."""
    text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
    hits = [text.find(s) for s in row.params.stop if s and s in text]
    if not hits:
        return False
    row.text = text[: min(hits)]
    return True


def to_candidate(tokenizer, row: Row, eos: set[int], keep_tokens: bool) -> Candidate:
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
        partial_scores=list(row.partial_scores),
        rejected_at=row.rejected_at,
    )


def candidates(tokenizer, rows: list[Row], eos: set[int], keep_tokens: bool) -> list[Candidate]:
    """The candidates of one request's ``rows`` in draw order, shadow rows' sums in ``logprob_under``."""
    out: dict[int, Candidate] = {}
    for row in rows:
        if row.leader is None:
            out[id(row)] = to_candidate(tokenizer, row, eos, keep_tokens)
        else:
            out[id(row.leader)].logprob_under[row.adapter] = float(sum(row.token_logprobs))
    return list(out.values())
