"""Early rejection: stop spending tokens on candidates that are already losing. Pure NumPy, no I/O.

Best-of-N draws N candidates to their end and keeps the best. Early rejection (after Speculative
Rejection, Sun et al. 2024) scores the unfinished candidates on their partial text at chosen token
counts, the *checkpoints*, and lets only the best fraction ``keep`` of them go on; the answer is the
best of the candidates that ran to their end (docs/math.md §9).

At checkpoint ``c`` the *running* candidates are those that have drawn ``c`` tokens and are neither
finished nor rejected (a candidate of ``L`` tokens is running at ``c`` exactly when ``L > c`` and
it was not rejected earlier). Of ``m`` running candidates the ``kept(m)`` highest partial scores go
on, ``kept(m) = max(at_least, ⌈keep · m⌉)`` capped at ``m``; ties go to the earlier draw (the strict
order of docs/math.md §1). Finished candidates are never rejected.

Each candidate of a seeded request draws from its own generator, so rejecting some of them does not
change the tokens of the others: early rejection on N candidates chooses exactly what ``simulate``
chooses from the same N candidates drawn to their end with their partial scores. That identity is
how ``bonbench measure`` draws the whole cost/quality curve from one pool, and what
``tests/bonbench/backends/test_engine_rejection.py`` checks against the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bonbench.bon import bon_select, strict_order

__all__ = ["EarlyRejection", "Outcome", "estimated_tokens_saved", "parse_early_rejection", "rejected", "simulate"]


@dataclass(frozen=True)
class EarlyRejection:
    """Where to score partial candidates (``checkpoints``: token counts, increasing) and which
    fraction of the running ones to keep at each (``keep`` in (0, 1])."""

    checkpoints: tuple[int, ...]
    keep: float

    def __post_init__(self) -> None:
        points = tuple(self.checkpoints)
        if not points:
            raise ValueError("early rejection needs at least one checkpoint")
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1 for c in points):
            raise ValueError(f"checkpoints are token counts >= 1, got {list(points)}")
        if any(b <= a for a, b in zip(points, points[1:])):
            raise ValueError(f"checkpoints must increase, got {list(points)}")
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"keep is the fraction of running candidates kept at a checkpoint, in (0, 1]; "
                             f"got {keep!r}")
        object.__setattr__(self, "checkpoints", tuple(int(c) for c in points))
        object.__setattr__(self, "keep", float(keep))

    def kept(self, running: int, at_least: int = 1) -> int:
        """How many of ``running`` candidates go on past a checkpoint."""
        return min(running, max(at_least, math.ceil(self.keep * running - 1e-9)))

    @property
    def label(self) -> str:
        """``c1,c2:keep``, the spec ``parse_early_rejection`` reads."""
        return f"{','.join(map(str, self.checkpoints))}:{self.keep:g}"


def parse_early_rejection(spec: str) -> EarlyRejection:
    """``"16,32:0.5"`` -> checkpoints (16, 32), keep 0.5; a ``ValueError`` says what is wrong."""
    points, sep, keep = spec.partition(":")
    if not sep:
        raise ValueError(f"early rejection is CHECKPOINTS:KEEP, e.g. '16,32:0.5'; got {spec!r}")
    try:
        checkpoints = tuple(int(p) for p in points.split(","))
        fraction = float(keep)
    except ValueError:
        raise ValueError(f"early rejection is CHECKPOINTS:KEEP with integer checkpoints and a fraction, "
                         f"e.g. '16,32:0.5'; got {spec!r}") from None
    return EarlyRejection(checkpoints, fraction)


def rejected(scores, plan: EarlyRejection, at_least: int = 1) -> np.ndarray:
    """Positions (into ``scores``, the running candidates' partial scores in draw order) of the
    candidates rejected at one checkpoint: all but the ``plan.kept(m, at_least)`` best, ascending."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("a partial score is NaN")
    drop = len(scores) - plan.kept(len(scores), at_least)
    if drop <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.argsort(strict_order(scores), kind="stable")[:drop])


class Outcome(NamedTuple):
    """What early rejection did with N candidates.

    ``chosen``: the indices kept, best first; ``tokens``: tokens drawn in all; ``rejected_at``:
    shape (N,), the checkpoint at which each candidate was rejected, 0 for those that ran to
    their end.
    """

    chosen: np.ndarray
    tokens: int
    rejected_at: np.ndarray


def simulate(plan: EarlyRejection, partial_scores, num_tokens, rewards, n: int = 1) -> Outcome:
    """Early rejection replayed on candidates drawn to their end.

    Args:
        plan: the checkpoints and the fraction kept.
        partial_scores: shape (N, C), candidate i's score on its first ``plan.checkpoints[j]``
            tokens; read only where the candidate is running at that checkpoint (others may be NaN).
        num_tokens: shape (N,), each candidate's length when drawn to its end.
        rewards: shape (N,), each candidate's reward on its whole text.
        n: how many to keep in the end (at least ``n`` go on past every checkpoint).

    Returns:
        the ``Outcome``: the ``n`` best survivors by reward, the tokens drawn, where each stopped.
    """
    partial = np.asarray(partial_scores, dtype=np.float64)
    lengths = np.asarray(num_tokens, dtype=np.int64)
    rewards = np.asarray(rewards, dtype=np.float64)
    count = len(lengths)
    if partial.shape != (count, len(plan.checkpoints)) or rewards.shape != (count,):
        raise ValueError(f"{count} candidates need partial scores of shape ({count}, {len(plan.checkpoints)}) "
                         f"and {count} rewards; got {partial.shape} and {rewards.shape}")
    if not 1 <= n <= count:
        raise ValueError(f"cannot keep {n} of {count} candidates")
    rejected_at = np.zeros(count, dtype=np.int64)
    for j, checkpoint in enumerate(plan.checkpoints):
        running = np.flatnonzero((rejected_at == 0) & (lengths > checkpoint))
        drop = running[rejected(partial[running, j], plan, at_least=n)] if len(running) else running
        rejected_at[drop] = checkpoint
    survivors = np.flatnonzero(rejected_at == 0)
    chosen = survivors[bon_select(rewards[survivors], n)]
    tokens = int(np.where(rejected_at > 0, rejected_at, lengths).sum())
    return Outcome(chosen, tokens, rejected_at)


def estimated_tokens_saved(num_tokens, rejected_at) -> float:
    """Tokens the rejected candidates would have gone on to draw, estimated from the others.

    A rejected candidate's length is unknown; it is taken to be the mean length ``L̄`` of the
    candidates that ran to their end, so the estimate is ``Σ_rejected max(0, L̄ − c_i)`` (0 when
    nothing was rejected or nothing ran to its end). ``num_tokens``: tokens drawn by each candidate
    (for a rejected one, its checkpoint); ``rejected_at``: as in ``Outcome`` (0: ran to its end).
    """
    lengths = np.asarray(num_tokens, dtype=np.float64)
    stopped = np.asarray(rejected_at, dtype=np.float64)
    finished = stopped == 0
    if finished.all() or not finished.any():
        return 0.0
    mean_length = lengths[finished].mean()
    return float(np.clip(mean_length - stopped[~finished], 0, None).sum())
