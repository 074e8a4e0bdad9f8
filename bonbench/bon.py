"""Best-of-N mathematics on arrays: exact distributions, quantiles, KL, win rates.

Pure NumPy, no I/O. Every function is checked against brute force or simulation in
``tests/bonbench/test_bon.py``; section numbers refer to ``docs/math.md``.

The strict order ``≺`` (docs/math.md §1)
-----------------------------------
Outcomes (or candidates) are ordered by reward first; among equal rewards the **lower
index ranks higher** (counts as better). The same rule is used by ``strict_order``,
``quantiles_exact``, ``bon_probabilities`` and ``bon_select``, so that selecting the top
candidate with ``bon_select`` from draws listed in outcome-index order samples exactly
``bon_probabilities``.

Two caveats worth knowing:

* ``bon_select`` breaks ties by *position in the candidate list*. When candidates are listed
  in draw order (as a server does) and distinct outcomes share a reward, the reward of the
  selected candidate is still distributed as under ``bon_probabilities``, but inside a group
  of tied outcomes the mass is split in proportion to ``π_ref`` rather than given to the
  lowest index. For language-model rewards equal rewards come almost only from identical
  texts, where the two agree.
* ``mc_quantiles`` and ``log_quantile`` compare reward *values* (``r' < r`` and ``r' ≤ r``),
  as in docs/math.md §2. They estimate the quantiles of the strict order only when equal rewards
  come from identical outcomes; with distinct outcomes sharing a reward they estimate the
  reward-level quantiles ``P[r(y') < r(y)]`` and ``P[r(y') ≤ r(y)]``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import digamma, gammaln, ndtri

__all__ = [
    "Quantiles",
    "WinRate",
    "best_of_subset_weights",
    "bon_kl",
    "bon_kl_exact",
    "bon_probabilities",
    "bon_select",
    "bon_win_rate",
    "bonbon_gap",
    "expected_best_of",
    "log_quantile",
    "mc_quantiles",
    "quantiles_exact",
    "strict_order",
    "win_rate",
]

_PROB_SUM_TOL = 1e-6


class Quantiles(NamedTuple):
    """Lower and upper quantiles of outcomes under the reference policy (docs/math.md §1).

    ``p_less[i] = P[y' ≺ y_i]`` and ``p_leq[i] = P[y' ≺ y_i or y' = y_i]``, each the same
    shape as the rewards they were computed for.
    """

    p_less: np.ndarray
    p_leq: np.ndarray


class WinRate(NamedTuple):
    """Empirical win rate of ``a`` over ``b`` with a Wilson score interval.

    ``rate = (wins + ties / 2) / count``; ``[low, high]`` is the Wilson interval at the
    requested confidence for that tie-adjusted rate.
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    count: int


# ---------------------------------------------------------------------------------------
# Input checks


def _as_rewards(rewards, name: str = "rewards", min_ndim: int = 1) -> np.ndarray:
    arr = np.asarray(rewards, dtype=np.float64)
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one entry along the last axis, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _as_probs_and_rewards(ref_probs, rewards) -> tuple[np.ndarray, np.ndarray]:
    """Validate a reference distribution and its rewards; return probs renormalised to sum 1."""
    probs = np.asarray(ref_probs, dtype=np.float64)
    rew = _as_rewards(rewards)
    if probs.shape != rew.shape:
        raise ValueError(
            f"ref_probs and rewards must have the same shape, got {probs.shape} and {rew.shape}"
        )
    if not np.isfinite(probs).all():
        raise ValueError("ref_probs contains NaN or infinite values")
    if (probs < 0).any():
        raise ValueError(f"ref_probs must be non-negative, found minimum {probs.min()!r}")
    total = probs.sum(axis=-1, keepdims=True)
    worst = np.max(np.abs(total - 1.0))
    if worst > _PROB_SUM_TOL:
        raise ValueError(
            f"ref_probs must sum to 1 along the last axis (within {_PROB_SUM_TOL}), "
            f"largest deviation is {worst:.3g}"
        )
    return probs / total, rew


def _check_n(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return int(n)


def _as_n_array(n, name: str = "n") -> np.ndarray:
    arr = np.asarray(n, dtype=np.float64)
    if np.isnan(arr).any() or (arr < 1).any():
        raise ValueError(f"{name} must be at least 1 everywhere, got {n!r}")
    return arr


def _scalar_if_0d(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


# ---------------------------------------------------------------------------------------
# The strict order and exact quantiles (docs/math.md §1)


def _ascending_order(rewards: np.ndarray) -> np.ndarray:
    """Indices sorting the last axis from worst to best under ``≺`` (lower index wins ties)."""
    k = rewards.shape[-1]
    # A stable sort of the reversed array puts, among equal rewards, the higher original
    # index first, i.e. lower in the ascending order.
    return (k - 1) - np.argsort(rewards[..., ::-1], axis=-1, kind="stable")


def strict_order(rewards) -> np.ndarray:
    """Rank of every outcome under the strict order ``≺`` (docs/math.md §1).

    Args:
        rewards: shape ``(..., K)``; the order is taken along the last axis.

    Returns:
        Integer ranks, shape ``(..., K)``: ``0`` for the worst outcome, ``K - 1`` for the
        best. Outcomes are ordered by reward; among equal rewards the lower index ranks
        higher.
    """
    rew = _as_rewards(rewards)
    order = _ascending_order(rew)
    ranks = np.empty(order.shape, dtype=np.int64)
    positions = np.broadcast_to(np.arange(rew.shape[-1]), order.shape)
    np.put_along_axis(ranks, order, positions, axis=-1)
    return ranks


class _SortedQuantiles(NamedTuple):
    order: np.ndarray  # (..., K) ascending under ≺
    probs: np.ndarray  # (..., K) π_ref in that order, summing exactly to 1
    p_less: np.ndarray
    p_leq: np.ndarray
    log_p_leq: np.ndarray


def _sorted_quantiles(probs: np.ndarray, rewards: np.ndarray) -> _SortedQuantiles:
    """Quantiles in ascending ``≺`` order, accurate near 0 and near 1.

    A quantile below 1/2 is taken from the cumulative sum from below, one above 1/2 as
    ``1 - (mass above)``, so that ``log p≤`` of the best outcomes keeps its precision even
    when the outcomes above have probability 1e-300.
    """
    order = _ascending_order(rewards)
    p = np.take_along_axis(probs, order, axis=-1)
    zeros = np.zeros(p.shape[:-1] + (1,))
    cum_leq = np.cumsum(p, axis=-1)
    cum_less = np.concatenate([zeros, cum_leq[..., :-1]], axis=-1)
    tail_geq = np.cumsum(p[..., ::-1], axis=-1)[..., ::-1]
    tail_gt = np.concatenate([tail_geq[..., 1:], zeros], axis=-1)

    low_leq = cum_leq <= 0.5
    p_leq = np.where(low_leq, cum_leq, 1.0 - tail_gt)
    p_less = np.where(cum_less <= 0.5, cum_less, 1.0 - tail_geq)
    with np.errstate(divide="ignore"):
        log_p_leq = np.where(low_leq, np.log(np.where(low_leq, cum_leq, 1.0)), np.log1p(-tail_gt))
    return _SortedQuantiles(order, p, p_less, p_leq, log_p_leq)


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=-1)
    return out


def quantiles_exact(ref_probs, rewards) -> Quantiles:
    """Exact quantiles of each outcome under ``π_ref`` and the strict order (docs/math.md §1).

        p<(y) = Σ_{y' ≺ y} π_ref(y')        p≤(y) = p<(y) + π_ref(y)

    Args:
        ref_probs: ``π_ref``, shape ``(..., K)``, non-negative, summing to 1 (within 1e-6;
            renormalised) along the last axis.
        rewards: shape ``(..., K)``, the reward of each outcome.

    Returns:
        ``Quantiles(p_less, p_leq)``, each shape ``(..., K)`` in the input's outcome order.
    """
    probs, rew = _as_probs_and_rewards(ref_probs, rewards)
    sq = _sorted_quantiles(probs, rew)
    return Quantiles(_unsort(sq.p_less, sq.order), _unsort(sq.p_leq, sq.order))


# ---------------------------------------------------------------------------------------
# The Best-of-n distribution (docs/math.md §1, BOND Theorem 1)


def _log_bon_sorted(sq: _SortedQuantiles, n: int) -> np.ndarray:
    """``log π_BoN`` in ascending order; ``-inf`` where ``π_ref`` is 0.

    log(p≤^n − p<^n) = n·log p≤ + log(1 − (p</p≤)^n),
    with log(p</p≤) = −log1p(π_ref/p<), exact even when π_ref ≪ p<.
    """
    positive = sq.probs > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = -np.log1p(sq.probs / sq.p_less)  # -inf where p< == 0
        log_tail = np.log(-np.expm1(n * log_ratio))
        log_bon = n * sq.log_p_leq + log_tail
    return np.where(positive, log_bon, -np.inf)


def bon_probabilities(ref_probs, rewards, n) -> np.ndarray:
    """Exact Best-of-n distribution over a finite outcome set (docs/math.md §1, BOND Thm. 1).

        π_BoN(y) = p≤(y)^n − p<(y)^n

    with quantiles under the strict order ``≺`` (reward, then lower index is better):
    the law of the ``≺``-best of ``n`` independent draws from ``π_ref``. Computed in log
    space, so it stays accurate for ``n = 10_000`` and probabilities near 1e-300.

    Args:
        ref_probs: ``π_ref``, shape ``(..., K)``, non-negative, summing to 1 (within 1e-6;
            renormalised) along the last axis.
        rewards: shape ``(..., K)``.
        n: number of draws, a positive integer.

    Returns:
        ``π_BoN``, shape ``(..., K)``; 0 where ``π_ref`` is 0; sums to 1 along the last axis.
    """
    n = _check_n(n)
    probs, rew = _as_probs_and_rewards(ref_probs, rewards)
    sq = _sorted_quantiles(probs, rew)
    return _unsort(np.exp(_log_bon_sorted(sq, n)), sq.order)


def bon_kl(n):
    """Analytic KL of Best-of-n to the reference (docs/math.md §1).

        KL(π_BoN || π_ref) = log n − (n − 1)/n

    Exact when no outcome repeats (continuous rewards), an upper bound otherwise.

    Args:
        n: scalar or array, each ``≥ 1`` (the formula is evaluated for real ``n`` too).

    Returns:
        float for a scalar ``n``, else an array of ``n``'s shape.
    """
    arr = _as_n_array(n)
    return _scalar_if_0d(np.log(arr) - (arr - 1.0) / arr)


def bon_kl_exact(ref_probs, rewards, n):
    """Exact ``KL(π_BoN || π_ref)`` on a finite outcome set (docs/math.md §1).

        KL = Σ_y π_BoN(y) · (log π_BoN(y) − log π_ref(y)),   π_BoN from ``bon_probabilities``

    Args:
        ref_probs: shape ``(..., K)``, as in ``bon_probabilities``.
        rewards: shape ``(..., K)``.
        n: positive integer.

    Returns:
        float for 1-D inputs, else an array of shape ``(...)``.
    """
    n = _check_n(n)
    probs, rew = _as_probs_and_rewards(ref_probs, rewards)
    sq = _sorted_quantiles(probs, rew)
    log_bon = _log_bon_sorted(sq, n)
    positive = np.isfinite(log_bon)
    with np.errstate(divide="ignore"):
        log_ref = np.log(sq.probs)
    terms = np.where(positive, np.exp(log_bon) * (np.where(positive, log_bon - log_ref, 0.0)), 0.0)
    return _scalar_if_0d(terms.sum(axis=-1))


def bon_win_rate(n):
    """Win rate of a Best-of-n sample against one reference sample (docs/math.md §1).

        P[r(y_BoN) > r(y')] = n / (n + 1)

    when no outcome has positive probability (continuous rewards); lower on a discrete space.

    Args:
        n: scalar or array, each ``≥ 1``.
    """
    arr = _as_n_array(n)
    return _scalar_if_0d(arr / (arr + 1.0))


# ---------------------------------------------------------------------------------------
# Empirical statistics


def win_rate(a_rewards, b_rewards, confidence: float = 0.95) -> WinRate:
    """Empirical win rate of ``a`` over ``b`` on paired comparisons, ties counted half.

        rate = (wins + ties/2) / count

    The Wilson score interval is computed for that tie-adjusted rate, i.e. as if
    ``wins + ties/2`` successes had been seen in ``count`` trials:

        center = (p̂ + z²/(2m)) / (1 + z²/m)
        half   = z / (1 + z²/m) · sqrt(p̂(1 − p̂)/m + z²/(4m²)),   m = count, z = Φ⁻¹((1+c)/2)

    With ties this is slightly conservative (a tie has half the variance of a coin flip).

    Args:
        a_rewards: any shape; ``a_rewards[i]`` is compared with ``b_rewards[i]``.
        b_rewards: same shape as ``a_rewards``.
        confidence: in ``(0, 1)``.

    Returns:
        ``WinRate(rate, low, high, wins, ties, losses, count)``.
    """
    a = np.asarray(a_rewards, dtype=np.float64)
    b = np.asarray(b_rewards, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a_rewards and b_rewards must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("win_rate needs at least one comparison, got empty arrays")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("a_rewards or b_rewards contains NaN")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")

    wins = int(np.count_nonzero(a > b))
    ties = int(np.count_nonzero(a == b))
    count = int(a.size)
    losses = count - wins - ties
    rate = (wins + 0.5 * ties) / count

    z = float(ndtri(0.5 + 0.5 * confidence))
    z2m = z * z / count
    center = (rate + 0.5 * z2m) / (1.0 + z2m)
    half = z / (1.0 + z2m) * np.sqrt(rate * (1.0 - rate) / count + z2m / (4.0 * count))
    low = max(0.0, center - half)
    high = min(1.0, center + half)
    return WinRate(rate, float(low), float(high), wins, ties, losses, count)


def _as_paired_rewards(candidate_rewards, reference_rewards) -> tuple[np.ndarray, np.ndarray]:
    cand = _as_rewards(candidate_rewards, "candidate_rewards")
    ref = _as_rewards(reference_rewards, "reference_rewards")
    if cand.ndim > 2 or ref.ndim > 2:
        raise ValueError(
            "candidate_rewards and reference_rewards must be (M,)/(K,) or (P, M)/(P, K), "
            f"got shapes {cand.shape} and {ref.shape}"
        )
    if cand.ndim != ref.ndim or cand.shape[:-1] != ref.shape[:-1]:
        raise ValueError(
            "candidate_rewards (P, M) and reference_rewards (P, K) must have the same number "
            f"of prompts P, got shapes {cand.shape} and {ref.shape}"
        )
    return cand, ref


def _mc_counts(cand: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, how many references lie strictly below / at or below each candidate."""
    squeeze = cand.ndim == 1
    cand2, ref2 = np.atleast_2d(cand), np.atleast_2d(ref)
    n_prompts, k = ref2.shape
    # Rank every value among all values (equal values share a rank), then offset the
    # ranks by prompt so one searchsorted over the flattened, sorted keys counts per prompt.
    _, inverse = np.unique(np.concatenate([cand2.ravel(), ref2.ravel()]), return_inverse=True)
    inverse = inverse.ravel()
    span = int(inverse.max()) + 1
    offsets = np.arange(n_prompts, dtype=np.int64)[:, None] * span
    cand_keys = inverse[: cand2.size].reshape(cand2.shape) + offsets
    ref_keys = np.sort(inverse[cand2.size :].reshape(ref2.shape) + offsets, axis=-1).ravel()
    starts = np.arange(n_prompts, dtype=np.int64)[:, None] * k
    less = np.searchsorted(ref_keys, cand_keys, side="left") - starts
    leq = np.searchsorted(ref_keys, cand_keys, side="right") - starts
    if squeeze:
        less, leq = less[0], leq[0]
    return less, leq


def mc_quantiles(candidate_rewards, reference_rewards) -> Quantiles:
    """Monte-Carlo quantiles of candidates against reference samples (docs/math.md §2).

        p̂<(y) = (1/K) Σ_j 1{r(y_j) < r(y)}        p̂≤(y) = (1/K) Σ_j 1{r(y_j) ≤ r(y)}

    Reward values are compared directly (see the module docstring on ties).

    Args:
        candidate_rewards: shape ``(P, M)`` (or ``(M,)`` for one prompt).
        reference_rewards: shape ``(P, K)`` (or ``(K,)``), rewards of ``K`` reference
            samples for the same prompts.

    Returns:
        ``Quantiles(p_less, p_leq)``, each shape ``(P, M)`` (or ``(M,)``).
    """
    cand, ref = _as_paired_rewards(candidate_rewards, reference_rewards)
    less, leq = _mc_counts(cand, ref)
    k = ref.shape[-1]
    return Quantiles(less / k, leq / k)


def log_quantile(candidate_rewards, reference_rewards, smoothing: bool = True) -> np.ndarray:
    """Log Monte-Carlo quantile ``log p̂≤``, the BOND training and evaluation reward (docs/math.md §2).

        smoothing=True:   log((c + 1) / (K + 1)),   c = Σ_j 1{r(y_j) ≤ r(y)}
        smoothing=False:  log(c / K), which is −inf when c = 0

    The smoothed form counts the candidate itself in the pool, so it is always finite.

    Args:
        candidate_rewards: shape ``(P, M)`` (or ``(M,)``).
        reference_rewards: shape ``(P, K)`` (or ``(K,)``).
        smoothing: whether to apply the ``(c + 1)/(K + 1)`` smoothing.

    Returns:
        shape ``(P, M)`` (or ``(M,)``).
    """
    cand, ref = _as_paired_rewards(candidate_rewards, reference_rewards)
    _, leq = _mc_counts(cand, ref)
    k = ref.shape[-1]
    if smoothing:
        return np.log((leq + 1.0) / (k + 1.0))
    with np.errstate(divide="ignore"):
        return np.log(leq / k)


def best_of_subset_weights(k: int, ns) -> np.ndarray:
    """Probability that the ``j``-th lowest of ``K`` samples is the best of a random ``n``-subset.

    Draw ``n`` of the ``K`` samples uniformly without replacement and keep the best under the
    strict order ``≺``; the sample of ascending rank ``j`` (1 = worst, ``K`` = best) is kept with
    probability (docs/math.md §1)

        w_j = C(j − 1, n − 1) / C(K, n)      (0 for j < n)

    Weighting ``K`` i.i.d. samples by ``w`` is the average of "keep the best of ``n``" over all
    ``C(K, n)`` subsets: ``expected_best_of`` and BOND's forward term
    (``distill.losses.best_of_n_weights``) both use it. Binomials are taken in log space
    (``gammaln``), so large ``K`` is fine.

    Args:
        k: number of samples ``K ≥ 1``.
        ns: a positive integer or a non-empty 1-D sequence of them, each ``≤ K``.

    Returns:
        shape ``(len(ns), K)``, or ``(K,)`` for a scalar ``ns``; index ``j − 1`` holds ``w_j``.
        Each row sums to 1.
    """
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    k = int(k)
    ns_arr = np.asarray(ns)
    scalar = ns_arr.ndim == 0
    ns_arr = np.atleast_1d(ns_arr)
    if ns_arr.ndim != 1 or ns_arr.size == 0:
        raise ValueError(f"ns must be a positive integer or a non-empty 1-D sequence, got {ns!r}")
    if not np.issubdtype(ns_arr.dtype, np.integer):
        raise ValueError(f"ns must hold integers, got {ns!r}")
    if (ns_arr < 1).any() or (ns_arr > k).any():
        raise ValueError(f"every n in ns must satisfy 1 <= n <= K = {k}, got {ns_arr.tolist()}")

    def log_comb(a, b):
        return gammaln(a + 1.0) - gammaln(b + 1.0) - gammaln(a - b + 1.0)

    j = np.arange(1, k + 1, dtype=np.float64)[None, :]
    n_col = ns_arr.astype(np.float64)[:, None]
    valid = j >= n_col
    log_w = log_comb(j - 1.0, np.minimum(n_col, j) - 1.0) - log_comb(float(k), n_col)
    weights = np.where(valid, np.exp(np.where(valid, log_w, 0.0)), 0.0)
    return weights[0] if scalar else weights


def expected_best_of(rewards, ns) -> np.ndarray:
    """Unbiased estimate of ``E[max of n rewards]`` from ``K`` samples (docs/math.md §1).

    With the samples sorted ``r_(1) ≤ … ≤ r_(K)``:

        Ê_n = Σ_{j=n..K} r_(j) · C(j − 1, n − 1) / C(K, n)

    the average of the maximum over all ``C(K, n)`` subsets of size ``n``; the weights are
    ``best_of_subset_weights``.

    Args:
        rewards: shape ``(K,)`` or ``(P, K)``, finite.
        ns: a positive integer or a sequence of them, each ``≤ K``.

    Returns:
        shape ``(len(ns),)`` or ``(P, len(ns))``; for a scalar ``ns`` the last axis is
        dropped (a float for 1-D rewards).
    """
    rew = _as_rewards(rewards)
    if rew.ndim > 2:
        raise ValueError(f"rewards must have shape (K,) or (P, K), got {rew.shape}")
    if not np.isfinite(rew).all():
        raise ValueError("rewards must be finite")
    weights = best_of_subset_weights(rew.shape[-1], ns)  # (K,) or (len(ns), K)
    return _scalar_if_0d(np.sort(rew, axis=-1) @ weights.T)


def bon_select(rewards, n: int = 1) -> np.ndarray:
    """Indices of the top-``n`` candidates, best first, under the strict order (docs/math.md §1).

    Candidates are ranked by reward; among equal rewards the **lower index wins**, the same
    rule as ``strict_order`` and ``bon_probabilities``.

    Args:
        rewards: shape ``(N,)`` or ``(P, N)``.
        n: how many to keep, ``1 ≤ n ≤ N``.

    Returns:
        Integer indices, shape ``(n,)`` or ``(P, n)``, best first.
    """
    n = _check_n(n)
    rew = _as_rewards(rewards)
    if rew.ndim > 2:
        raise ValueError(f"rewards must have shape (N,) or (P, N), got {rew.shape}")
    if n > rew.shape[-1]:
        raise ValueError(f"cannot select n = {n} from {rew.shape[-1]} candidates")
    return _ascending_order(rew)[..., ::-1][..., :n]


def bonbon_gap(n):
    """Expected log-ratio gap between the best and worst of ``n`` reference samples under
    the Best-of-n policy, the BoNBoN target ``1/(2β*)`` (docs/math.md §5):

        E[ log π_BoN/π_ref (y_(n)) − log π_BoN/π_ref (y_(1)) ] = (n − 1) · Σ_{k=1..n−1} 1/k

    In the continuous case ``log π_BoN/π_ref (y) = log n + (n − 1) · log F(r(y))``, so this
    is ``(n − 1) · (E[log U_max] − E[log U_min])`` for ``n`` uniforms; the uniform gap
    itself is ``Σ_{k=1..n−1} 1/k``, without the factor ``n − 1``.

    Args:
        n: scalar or array, each ``≥ 1``.
    """
    arr = _as_n_array(n)
    harmonic = digamma(arr) + np.euler_gamma  # H_{n-1} = ψ(n) + γ
    return _scalar_if_0d((arr - 1.0) * harmonic)
