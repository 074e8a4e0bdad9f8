"""Continuous batching for in-process sampling: rows join and leave the batch at every step.

An ``Engine`` holds one decoding batch. Each ``step()``

1. admits waiting requests while the batch stays within ``max_rows`` rows (a request brings
   ``n`` rows, plus one shadow row per candidate and ``score_with`` adapter);
2. prefills admitted prompts, at most ``max_step_tokens - rows`` prompt tokens per step: a long
   prompt is prefilled in chunks over several steps, so it delays everyone's next token by one
   chunk, not by its whole prompt. A prompt is prefilled once per distinct (prompt, adapter),
   unpadded, and its keys and values are copied to its rows when they join; the layers below the
   lowest LoRA adapter run once per prompt, whatever the adapters (``bonbench.backends.trunk``). A
   request that brings its prompt already run under each of its rows' adapters
   (``SampleRequest.prefix``: a trainer's prompt pass) joins at once, without prefill;
3. draws one token for every row; pauses to score the requests whose candidates just reached an
   early-rejection checkpoint, and stops the losers (below); lets finished, rejected and cancelled
   rows leave, hands back each request whose rows are all finished, and runs one decoding forward
   pass for the rest.

The batch keeps each prompt's keys and values once, however many candidates continue it, and each
row's own tokens apart (``bonbench.backends.shared_prefix``: the candidates attend to one copy of
their prompt); both are written in place (``bonbench.backends.kv``). Positions are counted per
row, so a row that joins late continues exactly as it would alone (up to float rounding). Each row
draws from its own generator: a seeded request's tokens do not depend on which requests share its
batch, or on when it joined.

Early rejection (``SamplingParams.early_rejection``, docs/math.md §9): a request's rows join the
batch together and draw one token per step, so its running rows (neither finished nor rejected)
always have equal length. When that length reaches a checkpoint ``c``, the engine decodes each
running row's tokens to text, calls the request's ``score_partial`` on them, records each score on
its row, and stops all but the best with ``bonbench.rejection.rejected`` (``finish_reason
"rejected"``, ``rejected_at = c``); a row that ended on its ``c``-th token is finished, not running.
Scoring is synchronous, on the thread that drives the engine: the whole batch waits while the reward
scores. A scorer that raises (or returns the wrong count, or a NaN) fails its own request, whose rows
leave the batch; the others go on. Rejection never changes a surviving row's tokens: each draws from
its own generator.

With ``adapters=True`` every request names a PEFT adapter (``rows.BASE`` for none) and each
forward pass runs the rows under their own adapters (PEFT's mixed-adapter batches).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from bonbench.backends import kv
from bonbench.backends.base import Candidate, check_context
from bonbench.backends.prefill import forward_with_adapters
from bonbench.backends.rows import (Row, SampleRequest, candidates, cut_at_stop, draw, process_logits, request_rows,
                                    uniform_kl)
from bonbench.backends.shared_prefix import ATTENTION, SharedPrefixCache, attention_of
from bonbench.backends.trunk import first_adapted_layer, shared_trunk, widen_cache
from bonbench.rejection import rejected


@dataclass(eq=False)
class _Pending:
    """A request inside the engine, from ``add`` to its callback."""

    request: SampleRequest
    on_done: Callable[[list[Candidate]], None]
    on_error: Callable[[BaseException], None] | None
    rows: list[Row]
    unfinished: int = 0


@dataclass(eq=False)
class _Prefill:
    """One prompt being prefilled for the requests that wait on it, one cache row per adapter."""

    prompt: tuple[int, ...]
    adapters: list[str | None]
    members: list[_Pending] = field(default_factory=list)
    cache: object = None
    done: int = 0  # prompt tokens prefilled so far
    logits: torch.Tensor | None = None  # (len(adapters), V) after the last prompt token


class Engine:
    """A continuously batched sampler over one model; not thread-safe (one thread drives it)."""

    def __init__(self, model, tokenizer, eos_token_ids: Sequence[int], *, adapters: bool = False,
                 max_rows: int | None = None, max_step_tokens: int | None = None, keep_tokens: bool = True):
        if max_rows is not None and max_step_tokens is not None and max_step_tokens <= max_rows:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must exceed max_rows ({max_rows}): each step "
                             f"decodes one token per row and prefills prompts with what is left")
        self.context = kv.engine_context(model)  # refuses a model whose attention the engine cannot compute
        self.model = model
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.adapters = adapters
        self.max_rows = max_rows if max_rows is not None else math.inf
        self.max_step_tokens = max_step_tokens if max_step_tokens is not None else math.inf
        self.keep_tokens = keep_tokens
        self.device = next(model.parameters()).device
        self._trunk = first_adapted_layer(model) if adapters else 0  # layers every adapter computes alike
        self._waiting: deque[_Pending] = deque()
        self._prefills: list[_Prefill] = []
        self._rows: list[Row] = []
        self._owner: dict[int, _Pending] = {}  # id(row) -> its request
        self._cache: SharedPrefixCache | None = None
        self._logits: torch.Tensor | None = None  # (rows, V): next-token logits of every row

    # -- the public surface ------------------------------------------------------------------

    def add(self, request: SampleRequest, on_done: Callable[[list[Candidate]], None],
            on_error: Callable[[BaseException], None] | None = None) -> None:
        """Queue ``request``; ``on_done(candidates)`` is called from ``step()`` when it is finished.
        Raises ``PromptTooLong`` for a request longer than the engine serves for this model."""
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        check_context(len(request.prompt_ids), request.params.max_tokens, self.context.tokens, self.context.hint)
        if self.adapters and request.adapter is None:
            raise ValueError("in a batch that names adapters, every request must name one (BASE for none)")
        if not self.adapters and (request.adapter is not None or request.score_with):
            raise ValueError("this engine runs the model as is: build it with adapters=True to name adapters")
        if request.prefix is not None:
            missing = [a for a in (request.adapter, *request.score_with) if a not in request.prefix]
            if missing:
                raise ValueError(f"the prefix has no state under adapter {missing[0]!r}, which this request's rows run under")
            for state in request.prefix.values():
                if state.keys[0].shape[-2] != len(request.prompt_ids):
                    raise ValueError(f"the prefix holds {state.keys[0].shape[-2]} tokens, the prompt "
                                     f"{len(request.prompt_ids)}: it is another prompt's")
        if request.params.early_rejection is not None:
            if request.score_with:
                raise ValueError("early rejection stops candidates mid-way; it cannot run with score_with "
                                 "(shadow rows score whole candidates)")
            if request.score_partial is None:
                raise ValueError("early rejection needs the request's score_partial, to score partial candidates")
        rows = request_rows(request)
        self._waiting.append(_Pending(request, on_done, on_error, rows, len(rows)))

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefills or self._rows)

    @property
    def running_rows(self) -> int:
        """Rows decoding now (prefilling requests not counted)."""
        return len(self._rows)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, prefill within the step's token budget, then draw one token for every row."""
        self._admit()
        self._prefill(max(self.max_step_tokens - len(self._rows), 1))
        if self._rows:
            self._decode()

    def fail(self, error: BaseException) -> None:
        """Hand ``error`` to every request still inside and empty the engine."""
        everyone = list(self._waiting) + [m for p in self._prefills for m in p.members]
        everyone += list(dict.fromkeys(self._owner.values()))
        self._waiting.clear()
        self._prefills.clear()
        self._drop_batch()
        for pending in everyone:
            if pending.on_error is None:
                raise error
            pending.on_error(error)

    # -- admission and prefill ---------------------------------------------------------------

    def _admit(self) -> None:
        planned = len(self._rows) + sum(len(m.rows) for p in self._prefills for m in p.members)
        while self._waiting:
            pending = self._waiting[0]
            if pending.request.is_cancelled():
                self._waiting.popleft()
                for row in pending.rows:
                    row.finish_reason = "cancelled"
                self._deliver(pending)
                continue
            if planned and planned + len(pending.rows) > self.max_rows:
                return  # the batch is full; a request wider than max_rows runs alone
            self._waiting.popleft()
            planned += len(pending.rows)
            if pending.request.prefix is not None:
                self._join(self._prefilled(pending))
            else:
                self._prefill_for(pending).members.append(pending)

    def _prefilled(self, pending: _Pending) -> _Prefill:
        """A request whose prompt was run before (``SampleRequest.prefix``) as a finished prefill, a
        cache row per adapter its rows run under."""
        adapters = list(dict.fromkeys(row.adapter for row in pending.rows))
        states = [pending.request.prefix[a] for a in adapters]
        cache = kv.new_cache()
        cache.layers = [kv.BufferLayer() for _ in states[0].keys]
        for i, layer in enumerate(cache.layers):
            keys = torch.cat([s.keys[i] for s in states]).to(self.device)
            values = torch.cat([s.values[i] for s in states]).to(self.device)
            layer.set(keys, values, keys.shape[-2])
        logits = torch.stack([s.logits for s in states]).to(self.device).float()
        return _Prefill(tuple(pending.request.prompt_ids), adapters, [pending], cache, len(pending.request.prompt_ids),
                        logits)

    def _prefill_for(self, pending: _Pending) -> _Prefill:
        """The not yet started prefill of this prompt (adapters added as needed), else a new one."""
        prompt = tuple(pending.request.prompt_ids)
        needed = list(dict.fromkeys(row.adapter for row in pending.rows))
        for p in self._prefills:
            if p.prompt == prompt and (p.done == 0 or set(needed) <= set(p.adapters)):
                p.adapters += [a for a in needed if a not in p.adapters]
                return p
        self._prefills.append(_Prefill(prompt, needed))
        return self._prefills[-1]

    def _prefill(self, budget: float) -> None:
        while budget > 0 and self._prefills:
            p = self._prefills[0]
            if all(m.request.is_cancelled() for m in p.members):
                self._prefills.pop(0)
                for m in p.members:
                    for row in m.rows:
                        row.finish_reason = "cancelled"
                    self._deliver(m)
                continue
            end = int(min(len(p.prompt), p.done + budget))
            if p.cache is None:
                p.cache = kv.new_cache()
            # One row through the frozen trunk, widened to a row per adapter where the adapters begin.
            trunk = self._trunk if len(p.adapters) > 1 else 0
            ids = torch.tensor([p.prompt[p.done : end]] * (1 if trunk else len(p.adapters)), device=self.device)
            positions = torch.arange(p.done, end, device=self.device).expand(len(ids), -1)
            with shared_trunk(self.model, trunk, len(p.adapters)):
                out = forward_with_adapters(self.model, p.adapters if self.adapters else None, input_ids=ids,
                                            position_ids=positions, cache=p.cache, use_cache=True,
                                            logits_to_keep=1)
            budget -= end - p.done
            p.done = end
            if p.done == len(p.prompt):
                p.logits = out.logits[:, -1, :].float()
                self._prefills.pop(0)
                self._join(p)

    def _join(self, p: _Prefill) -> None:
        """Add the prefilled prompt to the batch (once per adapter) and its members' rows after it."""
        slot = {a: i for i, a in enumerate(p.adapters)}
        widen_cache(p.cache, len(p.adapters))  # the trunk's layers hold one row for all adapters
        rows = [row for m in p.members for row in m.rows]
        row_slots = [slot[row.adapter] for row in rows]
        if self._cache is None:
            self._cache = SharedPrefixCache()
        self._cache.add_prompt(p.cache, row_slots)
        logits = p.logits[torch.tensor(row_slots, device=self.device)]
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self._rows += rows
        for m in p.members:
            for row in m.rows:
                self._owner[id(row)] = m

    # -- decoding ----------------------------------------------------------------------------

    def _decode(self) -> None:
        logits = self._logits.cpu()
        logprobs = process_logits(logits, self._rows)
        tokens = draw(logprobs, self._rows)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        certainty = uniform_kl(logits)
        for row, value in zip(self._rows, certainty.tolist()):
            row.uniform_kl_sum += value
        leaving = {i for i, row in enumerate(self._rows) if self._advance(row, int(tokens[i]), float(chosen[i]))}
        leaving |= self._checkpoints()
        if leaving:
            for i in sorted(leaving):
                pending = self._owner.pop(id(self._rows[i]), None)
                if pending is None:
                    continue  # its request failed at a checkpoint and has been told
                pending.unfinished -= 1
                if pending.unfinished == 0:
                    self._deliver(pending)
            keep = [i for i in range(len(self._rows)) if i not in leaving]
            if not keep:
                self._drop_batch()
                return
            self._cache.select(torch.tensor(keep, device=self.device))
            self._rows = [self._rows[i] for i in keep]
            tokens = tokens[keep]
        mask, positions = self._cache.next_step()
        with attention_of(self.model, ATTENTION):
            out = forward_with_adapters(
                self.model, [row.adapter for row in self._rows] if self.adapters else None,
                input_ids=tokens[:, None].to(self.device), attention_mask=mask, position_ids=positions,
                cache=self._cache, use_cache=True, shared_prefix=self._cache)
        self._logits = out.logits[:, -1, :].float()

    def _advance(self, row: Row, token: int, logprob: float) -> bool:
        """Append the drawn token to ``row``; True if the row is finished."""
        row.token_ids.append(token)
        row.token_logprobs.append(logprob)
        if row.leader is not None:  # a shadow ends with its leader, which comes before it
            row.finish_reason = row.leader.finish_reason
        elif self._owner[id(row)].request.is_cancelled():
            row.finish_reason = "cancelled"
        elif token in self.eos or (row.params.stop and cut_at_stop(self.tokenizer, row)):
            row.finish_reason = "stop"
        elif len(row.token_ids) >= row.params.max_tokens:
            row.finish_reason = "length"
        return row.finish_reason is not None

    # -- early rejection ---------------------------------------------------------------------

    def _checkpoints(self) -> set[int]:
        """Score and reject where a request's running rows just reached a checkpoint; the batch positions
        of the rows that leave: the rejected ones, and every row of a request whose scorer failed."""
        reached: dict[_Pending, list[int]] = {}  # request -> positions of its running rows
        for i, row in enumerate(self._rows):
            plan = row.params.early_rejection
            if plan is not None and row.finish_reason is None and len(row.token_ids) in plan.checkpoints:
                reached.setdefault(self._owner[id(row)], []).append(i)
        leaving: set[int] = set()
        for pending, positions in reached.items():
            try:
                stopped = self._reject(pending, [self._rows[i] for i in positions])
            except Exception as exc:  # the scorer is the caller's code: it fails its own request only
                leaving.update(i for i, row in enumerate(self._rows) if self._owner.get(id(row)) is pending)
                self._fail_request(pending, exc)
                continue
            leaving.update(positions[j] for j in stopped)
        return leaving

    def _reject(self, pending: _Pending, rows: list[Row]) -> np.ndarray:
        """Score one request's running ``rows`` (draw order, all at one checkpoint) on their partial
        text, record the scores and stop the losers; returns the losers' positions in ``rows``."""
        params = pending.request.params
        checkpoint = len(rows[0].token_ids)
        texts = [self.tokenizer.decode(row.token_ids, skip_special_tokens=True) for row in rows]
        scores = [float(s) for s in pending.request.score_partial(texts)]
        if len(scores) != len(rows):
            raise ValueError(f"score_partial returned {len(scores)} scores for {len(rows)} partial candidates")
        stopped = rejected(scores, params.early_rejection, params.keep_at_least)
        for row, score in zip(rows, scores):
            row.partial_scores.append(score)
        for j in stopped:
            rows[j].finish_reason, rows[j].rejected_at = "rejected", checkpoint
        return stopped

    def _fail_request(self, pending: _Pending, error: BaseException) -> None:
        """Take ``pending``'s rows out of the owner map (the caller drops them from the batch) and
        hand it ``error``."""
        for row in pending.rows:
            self._owner.pop(id(row), None)
        if pending.on_error is None:
            raise error
        pending.on_error(error)

    def _deliver(self, pending: _Pending) -> None:
        pending.on_done(candidates(self.tokenizer, pending.rows, self.eos, self.keep_tokens))

    def _drop_batch(self) -> None:
        self._rows, self._owner = [], {}
        self._cache = self._logits = None
