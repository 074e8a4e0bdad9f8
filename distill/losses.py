"""Losses of BOND, J-BOND and their baselines, as pure functions on per-sequence tensors.

Every function takes per-sequence log-probabilities (sums over the tokens of a generation) and
rewards, and returns a :class:`LossOutput`. Tensors that "carry grad" are log-probabilities under the
policy being trained; everything else is treated as data (detached inside the function where it
matters). Shapes use ``P`` for prompts in the batch and a second axis for the generations of one
prompt. No function here touches a model, a file or a device.

All losses are surrogate losses of the score-function kind: the value itself means little, its
gradient in expectation over the sampled generations is the gradient of the objective named in each
docstring (sections refer to ``docs/math.md``).

Ties. Wherever a loss selects a "best" or "worst" generation by reward it uses one strict order,
``bonbench.bon.strict_order`` (here ``strict_ranks`` and ``best_and_worst``): higher reward ranks
higher, and among equal rewards the LOWER index (position along the generation axis) ranks higher.
For i.i.d. samples this breaks ties at random between distinct generations with equal rewards; to
match a Best-of-N distribution that breaks ties by a fixed order over generations (as
``bonbench.bon.bon_probabilities`` does), pass a strictly monotone key of that order as the rewards:
every BOND-type loss depends on rewards only through their order. Recipes ask ``best_and_worst``
and ``best_of_n_weights`` which samples a loss reads, and score only those.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Mapping, NamedTuple

import torch

from bonbench.bon import best_of_subset_weights, bonbon_gap, strict_order

Tensor = torch.Tensor

# docs/math.md §4: with two anchor samples E[r_J] = -log 16 * (1 - p≤)^2, equal to log p≤ at p≤ = 1/2.
JBOND_PENALTY = math.log(16.0)


class LossOutput(NamedTuple):
    """A scalar loss to call ``backward()`` on, detached statistics of the batch, and the loss's
    weighted parts (``terms``, summing to ``loss``, graph attached) where it has several: the
    training loop's ``--diagnostics`` reads each part's gradient."""

    loss: Tensor
    metrics: dict[str, float]
    terms: Mapping[str, Tensor] = MappingProxyType({})


def _weighted_terms(**weighted: tuple[float, Tensor | None]) -> dict[str, Tensor]:
    """``{name: weight * term}`` for the terms that enter the loss (present, non-zero weight)."""
    return {name: w * t for name, (w, t) in weighted.items() if t is not None and w != 0.0}


# ----------------------------------------------------------------------------- helpers


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def _require(name: str, tensor: Tensor | None, why: str) -> Tensor:
    if tensor is None:
        raise ValueError(f"{name} is required {why}")
    return tensor


def leave_one_out_mean(values: Tensor, dim: int = -1) -> Tensor:
    """Mean of the OTHER entries along ``dim``: ``(sum(values) - values_i) / (m - 1)``.

    Args:
        values: any shape with ``m >= 2`` entries along ``dim``.

    Returns:
        Tensor of the same shape as ``values``.
    """
    m = values.shape[dim]
    if m < 2:
        raise ValueError(f"a leave-one-out mean needs at least 2 entries along dim {dim}, got {m}")
    return (values.sum(dim=dim, keepdim=True) - values) / (m - 1)


def strict_ranks(rewards: Tensor) -> Tensor:
    """Position of each generation in the strict order, 0 = worst, ``m - 1`` = best.

    ``bonbench.bon.strict_order`` on a tensor: reward first; among equal rewards the lower index
    ranks higher.

    Args:
        rewards: ``(P, m)``.

    Returns:
        ``(P, m)`` int64 on the device of ``rewards``, a permutation of ``0..m-1`` in every row.
    """
    ranks = strict_order(rewards.detach().to("cpu", torch.float64).numpy())
    return torch.from_numpy(ranks).to(rewards.device)


class Extremes(NamedTuple):
    """Indices along the generation axis, each ``(P,)`` int64."""

    best: Tensor
    worst: Tensor


def best_and_worst(rewards: Tensor) -> Extremes:
    """The best and the worst generation of each prompt in the strict order (ties: lower index wins).

    The one rule for "which sample is the best / the worst": the losses select with it, and the
    recipes call it to know which samples they must score (``jbond_loss`` reads the log-probability
    of ``best_and_worst(anchor_rewards).best`` only; ``bonbon_loss`` those of both).

    Args:
        rewards: ``(P, m)``.
    """
    ranks = strict_ranks(rewards)
    return Extremes(ranks.argmax(dim=1), ranks.argmin(dim=1))


def best_of_n_weights(rewards: Tensor, n: int) -> Tensor:
    """Probability that each of k samples is the best of a uniformly random n-subset of them.

    The sample of strict rank j (1 = worst, k = best) gets ``C(j-1, n-1) / C(k, n)``
    (``bonbench.bon.best_of_subset_weights``, docs/math.md §1). Weighting k i.i.d. reference samples
    this way gives an unbiased, lower-variance replacement for "draw n of them and keep the best".
    A sample of weight 0 cannot win any n-subset: the forward term does not read its log-probability.

    Args:
        rewards: ``(P, k)`` rewards of k i.i.d. samples per prompt, ``k >= n``.
        n: Best-of-n.

    Returns:
        ``(P, k)`` float weights (dtype of ``rewards`` if floating, else float64); rows sum to 1.
    """
    k = rewards.shape[-1]
    if not 1 <= n <= k:
        raise ValueError(f"Best-of-{n} from {k} samples per prompt needs 1 <= n <= k")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float64
    by_rank = torch.from_numpy(best_of_subset_weights(k, n)).to(rewards.device, dtype)
    return by_rank[strict_ranks(rewards)]


def _policy_gradient(policy_logprobs: Tensor, advantages: Tensor) -> Tensor:
    # -sg(A) * log π(y), averaged over every generation in the batch.
    return -(advantages.detach() * policy_logprobs).mean()


# ----------------------------------------------------------------------------- J-BOND


def jbond_reward(rewards: Tensor, anchor_rewards: Tensor) -> Tensor:
    """The J-BOND reward r_J (docs/math.md §4 step 3; BOND paper Eq. 17), from k >= 2 anchor samples.

    With two anchor samples r_J is ``-log 16`` when r(y) < min(r(y'_1), r(y'_2)), else 0. With k,
    it is that indicator averaged over all k(k-1)/2 pairs of anchor samples: ``-log 16 · m(m-1) /
    (k(k-1))``, m the number of anchor samples whose reward exceeds r(y). Both have the same mean,
    ``-log 16 · (1 - p≤(y))²`` (p≤ the anchor's quantile, ties as ≤); more pairs, less variance.

    Args:
        rewards: ``(P,)`` r(y) of the policy samples.
        anchor_rewards: ``(P, k)`` rewards of the k anchor samples of each prompt.

    Returns:
        ``(P,)`` float64.
    """
    k = anchor_rewards.shape[-1]
    if k < 2:
        raise ValueError(f"r_J compares with pairs of anchor samples: needs k >= 2, got {k}")
    above = (anchor_rewards > rewards.unsqueeze(-1)).sum(dim=-1).to(torch.float64)
    return -JBOND_PENALTY * above * (above - 1) / (k * (k - 1))


def _check_jbond_inputs(policy_logprobs, anchor_logprobs, rewards, anchor_rewards, anchor_sample_logprobs,
                        beta: float, gamma: float) -> int:
    """``jbond_loss``'s shapes ((P,) per prompt, (P, k >= 2) per anchor sample) and weights; returns P."""
    (num_prompts,) = policy_logprobs.shape
    _check_shape("anchor_logprobs", anchor_logprobs, (num_prompts,))
    _check_shape("rewards", rewards, (num_prompts,))
    k = anchor_rewards.shape[-1] if anchor_rewards.dim() == 2 else 0
    if k < 2:
        raise ValueError(f"anchor_rewards has shape {tuple(anchor_rewards.shape)}, expected ({num_prompts}, k >= 2)")
    _check_shape("anchor_rewards", anchor_rewards, (num_prompts, k))
    _check_shape("anchor_sample_logprobs", anchor_sample_logprobs, (num_prompts, k))
    if not 0.0 <= beta <= 1.0 or gamma < 0.0:
        raise ValueError(f"J-BOND needs 0 <= beta <= 1 and gamma >= 0, got {beta=}, {gamma=}")
    return num_prompts


def jbond_loss(
    policy_logprobs: Tensor,
    anchor_logprobs: Tensor,
    rewards: Tensor,
    anchor_rewards: Tensor,
    anchor_sample_logprobs: Tensor,
    *,
    beta: float = 0.5,
    gamma: float = 0.0,
    use_baseline: bool = True,
) -> LossOutput:
    """J-BOND loss of one step (docs/math.md §4, steps 2 to 5; BOND paper Algorithm 2).

    Per prompt: one policy sample ``y ~ π`` and k >= 2 anchor samples ``y'_1..y'_k ~ π_anchor``
    (the paper: k = 2). With k > 2 every pair of anchor samples stands in for the paper's one pair:
    the same expected gradient, less variance (docs/math.md §4, "More anchor samples").

    Args:
        policy_logprobs: ``(P,)`` log π(y) of the policy sample, carries grad.
        anchor_logprobs: ``(P,)`` log π_anchor(y) of the policy sample (no grad).
        rewards: ``(P,)`` r(y).
        anchor_rewards: ``(P, k)`` r(y'_1) .. r(y'_k).
        anchor_sample_logprobs: ``(P, k)`` log π(y'_i) under the POLICY, carries grad; only the
            entries of non-zero ``best_of_n_weights(anchor_rewards, 2)`` are read (k = 2: the better
            sample, ``best_and_worst(anchor_rewards).best``; any k: all but the worst).
        beta: weight of the backward term, 1 - beta on the forward term (paper: 0.5).
        gamma: weight of the extra KL(π || π_anchor) regulariser (paper: 0 to 2).
        use_baseline: subtract from each return the mean return of the other prompts' samples
            (needs ``P >= 2``).

    Equations (sg = stop-gradient, means over the P prompts) for k = 2; for k > 2 the forward term
    and r_J average their k = 2 forms over the pairs of anchor samples (``best_of_n_weights``, n = 2):
        forward   = -log π(y_best),   y_best = the better of y'_1, y'_2 (ties: y'_1)
        r_J(y)    = -log 16 if r(y) < min(r(y'_1), r(y'_2)) else 0
        R         = r_J(y) - (log π(y) - log π_anchor(y))
        backward  = -sg(R - B) · log π(y)
        reg       = sg(log π(y) - log π_anchor(y)) · log π(y)
        loss      = (1 - beta) · forward + beta · backward + gamma · reg

    In expectation the gradient is that of (1 - beta) · KL(BoN_2(π_anchor) || π) + beta · [KL(π ||
    π_anchor) + log 16 · E_π (1 - p≤(y))²] + gamma · KL(π || π_anchor) (docs/math.md §4, with the
    law of the kept anchor sample and what the backward bracket is up to a constant).
    """
    num_prompts = _check_jbond_inputs(policy_logprobs, anchor_logprobs, rewards, anchor_rewards,
                                       anchor_sample_logprobs, beta, gamma)

    # Step 2, forward KL: SFT on the better of two anchor samples (a tie keeps y'_1), averaged over
    # all pairs of the k; a zero weight multiplies an entry the recipe did not score.
    weights = best_of_n_weights(anchor_rewards, 2).to(anchor_sample_logprobs.dtype)
    forward = -(weights * anchor_sample_logprobs).sum(dim=1).mean()

    # Step 3, backward KL: policy gradient on r_J with the anchor as KL reference.
    r_j = jbond_reward(rewards, anchor_rewards).to(policy_logprobs.dtype)
    log_ratio = policy_logprobs.detach() - anchor_logprobs.detach()
    returns = r_j - log_ratio
    if use_baseline:
        if num_prompts < 2:
            raise ValueError("the J-BOND baseline averages the other prompts' returns: needs P >= 2")
        baseline = leave_one_out_mean(returns, dim=0)
    else:
        baseline = torch.zeros_like(returns)
    backward = _policy_gradient(policy_logprobs, returns - baseline)

    # Step 4: the gradient of gamma · KL(π || π_anchor); sign pulls π towards the anchor.
    regulariser = (log_ratio * policy_logprobs).mean()

    loss = (1.0 - beta) * forward + beta * backward + gamma * regulariser
    metrics = {
        "loss": loss.item(),
        "forward": forward.item(),
        "backward": backward.item(),
        "regulariser": regulariser.item(),
        "return_mean": returns.mean().item(),
        "penalised_fraction": (r_j < 0).double().mean().item(),
        "kl_anchor_estimate": log_ratio.mean().item(),
        "advantage_std": (returns - baseline).std().item() if num_prompts > 1 else 0.0,
        "reward_mean": rewards.double().mean().item(),
    }
    terms = _weighted_terms(forward=(1.0 - beta, forward), backward=(beta, backward), regulariser=(gamma, regulariser))
    return LossOutput(loss, metrics, terms)


# ----------------------------------------------------------------------------- BOND


def _bond_backward(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, log_quantiles: torch.Tensor,
                   n: int, use_baseline: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """BOND's backward term, all (P, S): ``-sg(R - B) · log π(y)`` with
    ``R = (n - 1) · log p̂≤(y) - (log π(y) - log π_ref(y))`` (docs/math.md §3)."""
    if policy_logprobs.dim() != 2:
        raise ValueError(f"policy_logprobs must be (P, S), got {tuple(policy_logprobs.shape)}")
    _check_shape("ref_logprobs", ref_logprobs, tuple(policy_logprobs.shape))
    _check_shape("log_quantiles", log_quantiles, tuple(policy_logprobs.shape))
    if not torch.isfinite(log_quantiles).all():
        raise ValueError("log_quantiles must be finite: smooth the MC quantile (docs/math.md §2)")
    log_ratio = policy_logprobs.detach() - ref_logprobs.detach()
    returns = (n - 1) * log_quantiles.detach().to(log_ratio.dtype) - log_ratio
    if use_baseline and policy_logprobs.shape[1] >= 2:
        baseline = leave_one_out_mean(returns, dim=1)
    else:
        baseline = torch.zeros_like(returns)
    backward = _policy_gradient(policy_logprobs, returns - baseline)
    return backward, {"backward": backward.item(), "return_mean": returns.mean().item(),
                      "log_quantile_mean": log_quantiles.double().mean().item(),
                      "kl_ref_estimate": log_ratio.mean().item()}


def bond_loss(
    *,
    policy_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    log_quantiles: Tensor | None = None,
    ref_sample_logprobs: Tensor | None = None,
    ref_rewards: Tensor | None = None,
    n: int,
    beta: float = 0.5,
    use_baseline: bool = True,
) -> LossOutput:
    """BOND with the Jeffreys divergence J_beta(π, BoN_n(π_ref)) (docs/math.md §3).

    Iterative BOND (docs/math.md §3, last paragraph) is this loss with the anchor in place of π_ref:
    pass the anchor's log-probabilities as ``ref_logprobs``, anchor samples as the reference samples
    and anchor-based quantiles, with a small ``n``.

    Args (S policy samples and k reference samples per prompt):
        policy_logprobs: ``(P, S)`` log π(y) of the policy samples, carries grad. Backward term.
        ref_logprobs: ``(P, S)`` log π_ref(y) (or log π_anchor(y)) of the policy samples.
        log_quantiles: ``(P, S)`` log p̂≤(y) of the policy samples, finite (e.g. the smoothed MC
            estimate of ``bonbench.bon.log_quantile``; with the exact
            ``r_BOND`` of docs/math.md §2 the backward gradient is exactly that of KL(π || π_BoN)).
        ref_sample_logprobs: ``(P, k)`` log π of the k reference samples, carries grad. Forward term;
            entries where ``best_of_n_weights(ref_rewards, n)`` is 0 enter with weight 0, so a
            recipe need not score those samples.
        ref_rewards: ``(P, k)`` rewards of the reference samples, ``k >= n``.
        n: N of Best-of-N.
        beta: 0 = forward KL only (BoN-SFT), 1 = backward KL only (vBoN), 0.5 = Jeffreys.
        use_baseline: subtract the mean return of the other policy samples of the same prompt;
            with S = 1 there is none and B = 0.

    Backward-term inputs may be None when beta = 0, forward-term inputs when beta = 1.

    Equations (sg = stop-gradient):
        forward  = -Σ_j w_j · log π(y_j),   w_j = P[y_j is the best of a random n-subset of the k]
                   (``best_of_n_weights``: SFT on Best-of-n samples, all n-subsets averaged)
        R        = (n - 1) · log p̂≤(y) - (log π(y) - log π_ref(y))
        backward = -sg(R - B) · log π(y)
        loss     = (1 - beta) · mean forward + beta · mean backward

    In expectation the gradient is that of (1 - beta) · KL(π_BoN || π) + beta · KL(π || q) with
    q ∝ π_ref · exp((n - 1) · E[log p̂≤]), which is π_BoN when log p̂≤ is r_BOND (docs/math.md §2-3).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"BOND needs 0 <= beta <= 1, got {beta=}")
    if n < 1:
        raise ValueError(f"Best-of-n needs n >= 1, got {n=}")
    forward = backward = None
    metrics: dict[str, float] = {}

    if beta < 1.0:
        why = "for the forward term (beta < 1)"
        ref_sample_logprobs = _require("ref_sample_logprobs", ref_sample_logprobs, why)
        ref_rewards = _require("ref_rewards", ref_rewards, why)
        _check_shape("ref_rewards", ref_rewards, tuple(ref_sample_logprobs.shape))
        weights = best_of_n_weights(ref_rewards, n).to(ref_sample_logprobs.dtype)
        forward = -(weights * ref_sample_logprobs).sum(dim=1).mean()
        metrics["forward"] = forward.item()

    if beta > 0.0:
        why = "for the backward term (beta > 0)"
        backward, backward_metrics = _bond_backward(
            _require("policy_logprobs", policy_logprobs, why), _require("ref_logprobs", ref_logprobs, why),
            _require("log_quantiles", log_quantiles, why), n, use_baseline)
        metrics.update(backward_metrics)

    if forward is None:
        loss = backward
    elif backward is None:
        loss = forward
    else:
        loss = (1.0 - beta) * forward + beta * backward
    metrics["loss"] = loss.item()
    return LossOutput(loss, metrics, _weighted_terms(forward=(1.0 - beta, forward), backward=(beta, backward)))


def vbon_loss(
    policy_logprobs: Tensor,
    ref_logprobs: Tensor,
    log_quantiles: Tensor,
    *,
    n: int,
    use_baseline: bool = True,
) -> LossOutput:
    """vBoN (Amini et al. 2024): BOND's backward term alone, ``bond_loss`` with beta = 1 (docs/math.md §5).

    Args: as ``bond_loss``: ``(P, S)`` policy samples' log π (grad), log π_ref, log p̂≤.
    Gradient in expectation: that of KL(π || π_ref · exp((n - 1) · E[log p̂≤]) / Z).
    """
    return bond_loss(
        policy_logprobs=policy_logprobs,
        ref_logprobs=ref_logprobs,
        log_quantiles=log_quantiles,
        n=n,
        beta=1.0,
        use_baseline=use_baseline,
    )


def bon_sft_loss(ref_sample_logprobs: Tensor, ref_rewards: Tensor, *, n: int) -> LossOutput:
    """Best-of-n supervised fine-tuning: BOND's forward term alone, ``bond_loss`` with beta = 0.

    Args: ``(P, k)`` log π of k reference samples (grad) and their rewards, ``k >= n``.
    Gradient in expectation: that of KL(BoN_n(π_ref) || π) (docs/math.md §3, §5).
    """
    return bond_loss(ref_sample_logprobs=ref_sample_logprobs, ref_rewards=ref_rewards, n=n, beta=0.0)


# ----------------------------------------------------------------------------- baselines


def rloo_loss(
    policy_logprobs: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    *,
    beta_rl: float,
) -> LossOutput:
    """REINFORCE with a leave-one-out baseline (RLOO) on a KL-regularised reward (docs/math.md §5).

    Args:
        policy_logprobs: ``(P, S)`` log π(y) of S >= 2 policy samples per prompt, carries grad.
        ref_logprobs: ``(P, S)`` log π_ref(y).
        rewards: ``(P, S)`` r(y).
        beta_rl: KL coefficient (paper grid: 0.001, 0.01, 0.1, 1).

    Equations:
        R = r(y) - beta_rl · (log π(y) - log π_ref(y)),   B = mean R of the other S - 1 samples
        loss = mean of -sg(R - B) · log π(y)

    In expectation the gradient is that of -(E_π[r] - beta_rl · KL(π || π_ref)).
    """
    if policy_logprobs.dim() != 2 or policy_logprobs.shape[1] < 2:
        raise ValueError(f"RLOO needs (P, S >= 2) samples, got {tuple(policy_logprobs.shape)}")
    _check_shape("ref_logprobs", ref_logprobs, tuple(policy_logprobs.shape))
    _check_shape("rewards", rewards, tuple(policy_logprobs.shape))
    if beta_rl < 0.0:
        raise ValueError(f"beta_rl must be >= 0, got {beta_rl}")
    log_ratio = policy_logprobs.detach() - ref_logprobs.detach()
    returns = rewards.detach().to(log_ratio.dtype) - beta_rl * log_ratio
    loss = _policy_gradient(policy_logprobs, returns - leave_one_out_mean(returns, dim=1))
    metrics = {
        "loss": loss.item(),
        "return_mean": returns.mean().item(),
        "reward_mean": rewards.double().mean().item(),
        "kl_ref_estimate": log_ratio.mean().item(),
    }
    return LossOutput(loss, metrics)


def bonbon_loss(
    policy_logprobs: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    *,
    alpha: float,
) -> LossOutput:
    """BoNBoN (Gui et al. 2024; docs/math.md §5) on n reference samples per prompt.

    Args:
        policy_logprobs: ``(P, n)`` log π of the n reference samples, carries grad; only the best
            and the worst entry of each row (``best_and_worst(rewards)``) are read.
        ref_logprobs: ``(P, n)`` their log π_ref (the same two entries are read).
        rewards: ``(P, n)`` their rewards, n >= 2.
        alpha: weight of the SFT term, 1 - alpha on the gap term.

    Equations (y_(n) best and y_(1) worst of the n in the strict order):
        h    = [log π(y_(n)) - log π_ref(y_(n))] - [log π(y_(1)) - log π_ref(y_(1))]
        loss = mean of alpha · (-log π(y_(n))) + (1 - alpha) · (h - (n-1)·Σ_{k<n} 1/k)²

    This is a plain (not surrogate) loss on reference samples, so its expected gradient is the
    gradient of its expectation: alpha · KL(BoN_n(π_ref) || π) + (1 - alpha) · E[(h - c)²] + const.
    """
    if policy_logprobs.dim() != 2 or policy_logprobs.shape[1] < 2:
        raise ValueError(f"BoNBoN needs (P, n >= 2) samples, got {tuple(policy_logprobs.shape)}")
    _check_shape("ref_logprobs", ref_logprobs, tuple(policy_logprobs.shape))
    _check_shape("rewards", rewards, tuple(policy_logprobs.shape))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"BoNBoN needs 0 <= alpha <= 1, got {alpha=}")
    n = policy_logprobs.shape[1]
    best, worst = (index.unsqueeze(1) for index in best_and_worst(rewards))
    log_ratio = policy_logprobs - ref_logprobs.detach()
    gap = (log_ratio.gather(1, best) - log_ratio.gather(1, worst)).squeeze(1)
    sft = -policy_logprobs.gather(1, best).squeeze(1)
    target = float(bonbon_gap(n))  # 1/(2β*) = (n - 1) · Σ_{k<n} 1/k
    terms = _weighted_terms(sft=(alpha, sft.mean()), gap=(1.0 - alpha, ((gap - target) ** 2).mean()))
    loss = (alpha * sft + (1.0 - alpha) * (gap - target) ** 2).mean()
    metrics = {
        "loss": loss.item(),
        "sft": sft.mean().item(),
        "gap_mean": gap.mean().item(),
        "gap_target": target,
    }
    return LossOutput(loss, metrics, terms)
