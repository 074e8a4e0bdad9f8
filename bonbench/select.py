"""Selection rules: which of a prompt's N candidates Best-of-N returns. Pure NumPy, no I/O.

A rule sees every candidate of one prompt in draw order (``Candidates``) and returns the indices of
the ``n`` it keeps, best first, with the number it ranked each candidate by (``Choice``). The rules:

* ``argmax``: the highest reward; ties go to the earlier draw (the strict order of docs/math.md §1,
  ``bon.bon_select``). Today's Best-of-N.
* ``soft``: one candidate drawn from ``softmax(reward / λ)``; ``λ → 0`` is ``argmax``, ``λ → ∞`` a
  uniform pick. With ``n > 1`` the draws are without replacement (Gumbel top-k).
* ``regularized``: the highest ``reward − β · penalty``, the penalty being the length in tokens or
  ``−log π_ref(y)``, the candidate's negative log-probability under the model it was sampled from
  (known exactly when it was sampled at temperature 1 and top_p 1).
* ``self-certainty`` (Kang et al. 2025; no reward model): the highest mean over the candidate's
  tokens of ``KL(U ‖ p_t) = −log V − (1/V) Σ_v log p_t(v)``, how far the model's next-token
  distributions were from uniform while it wrote the answer. The sampler reports it.
* ``majority`` (self-consistency, Wang et al. 2023; no reward model): the most frequent answer after
  normalisation (first non-empty line, lowercase, punctuation and repeated whitespace removed);
  ties go to the answer drawn first. For short answers.

``RULES`` maps each name to its implementation; ``make_rule`` builds one with parameters and
``parse_rule`` reads the ``NAME:key=value,...`` spec of ``bonbench serve --selection``.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from bonbench.bon import bon_select

__all__ = [
    "RULES",
    "Argmax",
    "Candidates",
    "Choice",
    "Majority",
    "Regularized",
    "SelectionError",
    "SelectionRule",
    "SelfCertainty",
    "Soft",
    "describe",
    "make_rule",
    "normalize_answer",
    "parse_rule",
]


class SelectionError(ValueError):
    """A rule that cannot be built (unknown name, bad parameter) or cannot choose among these
    candidates (what it reads is missing); the message says which and why."""


@dataclass(frozen=True)
class Candidates:
    """What a rule may read about one prompt's ``N`` candidates, each array shape ``(N,)`` in draw order.

    ``rewards``, ``logprobs`` (log-probability under the model that sampled them) and
    ``self_certainty`` are ``None`` where nobody computed them.
    """

    texts: Sequence[str]
    num_tokens: np.ndarray
    rewards: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    self_certainty: np.ndarray | None = None

    def __post_init__(self) -> None:
        size = len(self.texts)
        if size == 0:
            raise SelectionError("there are no candidates to choose from")
        for name in ("num_tokens", "rewards", "logprobs", "self_certainty"):
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (size,):
                raise SelectionError(f"{name} has shape {arr.shape}; there are {size} candidates")
            if np.isnan(arr).any():
                raise SelectionError(f"{name} contains NaN")
            object.__setattr__(self, name, arr)

    def need(self, name: str, rule: str, why: str) -> np.ndarray:
        """The array ``name``, or a ``SelectionError`` that says ``rule`` needs it and ``why``."""
        value = getattr(self, name)
        if value is None:
            raise SelectionError(f"selection '{rule}' needs {why}")
        return value


class Choice(NamedTuple):
    """A rule's answer: ``chosen`` (n,) candidate indices, best first; ``scores`` (N,) the number each
    candidate was ranked by (reward, probability, regularized reward, self-certainty or vote count)."""

    chosen: np.ndarray
    scores: np.ndarray


class SelectionRule(Protocol):
    """Chooses ``n`` of a prompt's candidates. Implementations are frozen dataclasses whose fields are
    the rule's parameters; ``needs_reward`` says whether the server must score the candidates."""

    name: ClassVar[str]
    needs_reward: ClassVar[bool]

    def choose(self, candidates: Candidates, n: int, rng: np.random.Generator) -> Choice:
        """Indices of the ``n`` kept candidates (``1 ≤ n ≤ N``), best first, and every candidate's score.
        ``rng`` is the only source of randomness (``soft``)."""
        ...


def _check_n(n: int, candidates: Candidates) -> None:
    if not 1 <= n <= len(candidates.texts):
        raise SelectionError(f"cannot choose {n} of {len(candidates.texts)} candidates")


def _highest(scores: np.ndarray, n: int) -> Choice:
    """The ``n`` highest scores, best first, ties to the earlier draw (docs/math.md §1)."""
    return Choice(bon_select(scores, n), scores)


def _positive(value: Any, name: str, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SelectionError(f"selection '{rule}' needs {name} > 0 (a number), got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------
# Rules that read a reward


@dataclass(frozen=True)
class Argmax:
    """The highest reward, ties to the earlier draw (docs/math.md §1)."""

    name: ClassVar[str] = "argmax"
    needs_reward: ClassVar[bool] = True

    def choose(self, candidates: Candidates, n: int, rng: np.random.Generator) -> Choice:
        _check_n(n, candidates)
        return _highest(candidates.need("rewards", self.name, "a reward model"), n)


@dataclass(frozen=True)
class Soft:
    """One candidate drawn with probability ``softmax(reward / temperature)``.

    With ``n > 1``, ``n`` draws without replacement, in the order drawn: the top ``n`` of
    ``reward / λ + G`` with ``G`` i.i.d. Gumbel (the Gumbel top-k trick), whose first index is a
    draw from the softmax. The scores are the softmax probabilities.
    """

    temperature: float = 1.0  # λ, in reward units

    name: ClassVar[str] = "soft"
    needs_reward: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", _positive(self.temperature, "temperature", self.name))

    def choose(self, candidates: Candidates, n: int, rng: np.random.Generator) -> Choice:
        _check_n(n, candidates)
        logits = candidates.need("rewards", self.name, "a reward model") / self.temperature
        if not np.isfinite(logits).all():
            raise SelectionError(f"selection '{self.name}' needs finite rewards")
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        keys = logits + rng.gumbel(size=logits.shape)
        return Choice(bon_select(keys, n), probs)


PENALTIES = ("length", "logprob")


@dataclass(frozen=True)
class Regularized:
    """The highest ``reward − β · penalty``; the penalty is ``length`` (tokens) or ``logprob``
    (``−log π(y)`` under the model that sampled the candidate). Ties to the earlier draw."""

    beta: float = 0.01
    penalty: str = "length"

    name: ClassVar[str] = "regularized"
    needs_reward: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _positive(self.beta, "beta", self.name))
        if self.penalty not in PENALTIES:
            raise SelectionError(f"selection '{self.name}' takes penalty {' or '.join(PENALTIES)}, "
                                 f"got {self.penalty!r}")

    def choose(self, candidates: Candidates, n: int, rng: np.random.Generator) -> Choice:
        _check_n(n, candidates)
        rewards = candidates.need("rewards", self.name, "a reward model")
        if self.penalty == "length":
            penalty = candidates.num_tokens
        else:
            penalty = -candidates.need("logprobs", self.name, "each candidate's log-probability "
                                       "(penalty 'logprob'), which this backend does not report")
        return _highest(rewards - self.beta * penalty, n)


# ---------------------------------------------------------------------------------------
# Rules without a reward model


@dataclass(frozen=True)
class SelfCertainty:
    """The highest mean per-token ``KL(U ‖ p)`` of the model's own distributions, ties to the earlier draw."""

    name: ClassVar[str] = "self-certainty"
    needs_reward: ClassVar[bool] = False

    def choose(self, candidates: Candidates, n: int, rng: np.random.Generator) -> Choice:
        _check_n(n, candidates)
        return _highest(candidates.need("self_certainty", self.name, "the model's next-token distributions, "
                                        "which only the transformers backend reports"), n)


def normalize_answer(text: str) -> str:
    """An answer's first non-empty line, lowercased, without punctuation, whitespace collapsed."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    kept = "".join(ch for ch in line.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


@dataclass(frozen=True)
class Majority:
    """The most frequent normalised answer; ties between answers go to the one drawn first.

    Each candidate scores its answer's vote count; an answer that normalises to nothing casts no
    vote and scores 0. With ``n > 1`` the first draw of each answer comes first, most votes
    first, then the remaining candidates by their answer's rank and draw order.
    """

    name: ClassVar[str] = "majority"
    needs_reward: ClassVar[bool] = False

    def choose(self, candidates: Candidates, n: int, rng: np.random.Generator) -> Choice:
        _check_n(n, candidates)
        answers = [normalize_answer(t) for t in candidates.texts]
        members: dict[str, list[int]] = {}
        for i, answer in enumerate(answers):
            if answer:
                members.setdefault(answer, []).append(i)
        votes = np.array([len(members[a]) if a else 0 for a in answers], dtype=np.float64)
        # dicts keep insertion order, so a stable sort by votes leaves tied answers in first-draw order
        groups = sorted(members.values(), key=len, reverse=True)
        firsts = [g[0] for g in groups]
        rest = [i for g in groups for i in g[1:]] + [i for i, a in enumerate(answers) if not a]
        return Choice(np.array((firsts + rest)[:n], dtype=np.int64), votes)


# ---------------------------------------------------------------------------------------
# Names


RULES: dict[str, type] = {rule.name: rule for rule in (Argmax, Soft, Regularized, SelfCertainty, Majority)}


def make_rule(name: str, params: Mapping[str, Any] | None = None) -> SelectionRule:
    """The rule ``name`` with ``params`` (its dataclass fields); a ``SelectionError`` names what is wrong."""
    if name not in RULES:
        raise SelectionError(f"unknown selection rule {name!r}; the rules are {', '.join(RULES)}")
    cls = RULES[name]
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes no parameters"
        raise SelectionError(f"selection '{name}' {takes}; got {', '.join(unknown)}")
    return cls(**(params or {}))


def parse_rule(spec: str) -> SelectionRule:
    """``NAME`` or ``NAME:key=value,...`` (numbers where they parse as numbers), e.g. ``soft:temperature=0.5``."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SelectionError(f"selection parameters are key=value pairs, got {item!r} in {spec!r}")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            params[key.strip()] = value.strip()
    return make_rule(name.strip(), params)


def describe(rule: SelectionRule) -> dict[str, Any]:
    """The rule's parameters, as a JSON-ready dict."""
    return dataclasses.asdict(rule)
