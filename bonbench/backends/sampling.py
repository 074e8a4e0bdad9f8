"""Batched ancestral sampling from a Hugging Face causal LM, with per-row settings.

One call takes several prompts, each with its own ``SamplingParams``. Each prompt is prefilled
once and its ``n`` candidates attend to that one copy of its keys and values. Rows that finish
are dropped from the batch, so short answers stop costing compute.
Each candidate draws from its own ``torch.Generator``: with a seed, its tokens do not depend on
which other requests happened to share the batch.

With a PEFT model, each request may name the adapter it samples from (PEFT's mixed-adapter
batches): a trainer draws from its policy and its anchor in one batch, so each decoding step reads
the weights once for both. ``score_with`` adds, per candidate, a shadow row under another adapter
that is fed the candidate's tokens instead of drawing its own: it reports log π_other(candidate)
at the cost of one more row in the batch, where a separate scoring pass would run the prompt
again. Prompts are prefilled once per distinct (prompt, adapter).

``sample`` runs every request to the end in one call; the serving backend drives the same
``bonbench.backends.engine.Engine`` step by step, so requests join and leave a running batch.
"""

from __future__ import annotations

from typing import Sequence

from bonbench.backends.base import Candidate
from bonbench.backends.engine import Engine
from bonbench.backends.rows import BASE, SampleRequest

__all__ = ["BASE", "SampleRequest", "sample"]


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
    ``finish_reason == "cancelled"``. Raises ``PromptTooLong`` for a request longer than the engine
    serves for this model (``kv.engine_context``).
    """
    if not requests:
        return []
    mixed = any(r.adapter is not None or r.score_with for r in requests)
    if mixed and any(r.adapter is None for r in requests):
        raise ValueError("in a batch that names adapters, every request must name one (BASE for none)")
    engine = Engine(model, tokenizer, eos_token_ids, adapters=mixed, keep_tokens=keep_tokens)
    results: list[list[Candidate] | None] = [None] * len(requests)
    for i, request in enumerate(requests):
        engine.add(request, lambda candidates, i=i: results.__setitem__(i, candidates))
    while not engine.idle:
        engine.step()
    return results
