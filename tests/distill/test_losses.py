"""Every loss in ``distill.losses`` has, in expectation, the gradient of the objective it claims.

The expectation is taken exactly: the policy is a softmax over a handful of outcomes, every
combination of samples a loss can see is enumerated as one "prompt" of a single batch, and the
per-combination gradients are reweighted by their probabilities. Concretely, the sampled
log-probabilities enter the loss as leaf tensors X; the loss is a mean over combinations, so
``C · ∂loss/∂X_c`` is combination c's own derivative, and by the chain rule
``Σ_c w_c · C · ∂loss/∂X_c · ∇_θ X_c(θ)`` is the exact expected gradient. It is compared with the
autograd gradient of the closed-form objective, written out independently below.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from bonbench.bon import bon_probabilities, expected_best_of, log_quantile, quantiles_exact, strict_order
from distill.losses import (
    LossOutput,
    best_and_worst,
    best_of_n_weights,
    bon_sft_loss,
    bond_loss,
    bonbon_loss,
    jbond_loss,
    jbond_reward,
    leave_one_out_mean,
    rloo_loss,
    strict_ranks,
    vbon_loss,
)

torch.set_num_threads(1)
DTYPE = torch.float64
TIED_REWARDS = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.5, 2.0, 1.0, 3.0, 0.0], dtype=DTYPE)
M = len(TIED_REWARDS)
# Distinct keys of bonbench's strict order (reward, then the lower index ranks higher).
KEYS = torch.from_numpy(strict_order(TIED_REWARDS.numpy()).astype(np.float64))


# ----------------------------------------------------------------------------- helpers


class Problem:
    """π = softmax(θ) over M outcomes, with fixed π_ref and π_anchor, all distinct."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(M, generator=g, dtype=DTYPE).requires_grad_(True)
        self.ref = torch.log_softmax(torch.randn(M, generator=g, dtype=DTYPE), 0)
        self.anchor = torch.log_softmax(torch.randn(M, generator=g, dtype=DTYPE), 0)

    def log_pi(self) -> torch.Tensor:
        return torch.log_softmax(self.theta, 0)


class Leaves:
    """Hands out leaf copies of log π at given indices and rebuilds the exact expected gradient."""

    def __init__(self, problem: Problem, weights: torch.Tensor) -> None:
        self.problem, self.weights = problem, weights
        self.log_pi = problem.log_pi().detach()
        self.taken: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        leaf = self.log_pi[index].clone().requires_grad_(True)
        self.taken.append((index, leaf))
        return leaf

    def expected_gradient(self, output: LossOutput) -> torch.Tensor:
        output.loss.backward()
        log_pi = self.problem.log_pi()
        count = len(self.weights)
        surrogate = 0.0
        for index, leaf in self.taken:
            if leaf.grad is None:  # an input the loss did not use (e.g. beta = 0 or 1)
                continue
            w = self.weights.view(-1, *([1] * (leaf.dim() - 1)))
            surrogate = surrogate + (w * count * leaf.grad * log_pi[index]).sum()
        (grad,) = torch.autograd.grad(surrogate, self.problem.theta)
        return grad


def tuples(*sizes: int) -> torch.Tensor:
    """All index tuples, ``(prod(sizes), len(sizes))``."""
    return torch.tensor(list(itertools.product(*[range(s) for s in sizes])), dtype=torch.long)


def tuple_weights(index: torch.Tensor, log_probs: list[torch.Tensor]) -> torch.Tensor:
    """Probability of each tuple when column j is drawn from ``log_probs[j]`` independently."""
    return torch.stack([lp.detach()[index[:, j]] for j, lp in enumerate(log_probs)], 1).sum(1).exp()


def objective_gradient(problem: Problem, objective) -> torch.Tensor:
    (grad,) = torch.autograd.grad(objective(problem.log_pi()), problem.theta)
    return grad


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum()


def cross_entropy(q_log: torch.Tensor, p_log: torch.Tensor) -> torch.Tensor:
    """E_q[-log p]: KL(q || p) up to a constant in p."""
    return -(q_log.exp() * p_log).sum()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reward_cdf(log_probs: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-level quantiles P[r(y') < r(y)], P[r(y') ≤ r(y)] with y' from ``log_probs``."""
    probs = log_probs.detach().exp()
    less = (rewards[None, :] < rewards[:, None]).to(DTYPE) @ probs
    leq = (rewards[None, :] <= rewards[:, None]).to(DTYPE) @ probs
    return less, leq


def bon_log(log_probs: torch.Tensor, n: int) -> torch.Tensor:
    probs = log_probs.detach().exp().numpy()
    return torch.from_numpy(np.log(bon_probabilities(probs / probs.sum(), TIED_REWARDS.numpy(), n)))


def r_bond(log_probs: torch.Tensor, n: int) -> torch.Tensor:
    """Exact r_BOND of docs/math.md §2 under the strict order, with the correction term."""
    probs = log_probs.detach().exp().numpy()
    p_less, p_leq = quantiles_exact(probs / probs.sum(), TIED_REWARDS.numpy())
    ratio = p_less / p_leq
    correction = np.log(sum(ratio**i for i in range(n)))
    return torch.from_numpy(np.log(p_leq) + correction / (n - 1))


# ----------------------------------------------------------------------------- small pieces


def test_leave_one_out_mean_averages_the_others():
    values = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    expected = torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]])
    torch.testing.assert_close(leave_one_out_mean(values, dim=1), expected)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_mean(values[:, :1], dim=1)


def test_strict_ranks_are_bonbench_strict_order_and_best_and_worst_keep_the_lower_index_on_ties():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 3, (50, 6), generator=g).to(DTYPE)
    np.testing.assert_array_equal(strict_ranks(rewards).numpy(), strict_order(rewards.numpy()))
    tied = torch.tensor([[2.0, 2.0, 1.0, 1.0], [0.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    best, worst = best_and_worst(tied)
    assert best.tolist() == [0, 1, 0] and worst.tolist() == [3, 3, 3]


def test_best_of_n_weights_equal_best_of_a_random_subset_by_brute_force():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 2.0, 1.0], [3.0, 3.0, 3.0, 0.0, 1.0]], dtype=DTYPE)
    k, n = rewards.shape[1], 3
    brute = torch.zeros_like(rewards)
    for row in range(len(rewards)):
        subsets = list(itertools.combinations(range(k), n))
        for subset in subsets:
            # best of the subset: highest reward, ties to the lower index
            best = max(subset, key=lambda i: (rewards[row, i].item(), -i))
            brute[row, best] += 1.0 / len(subsets)
    torch.testing.assert_close(best_of_n_weights(rewards, n), brute)
    np.testing.assert_allclose(
        (best_of_n_weights(rewards, n) * rewards).sum(1).numpy(), expected_best_of(rewards.numpy(), n)
    )


def test_jbond_reward_mean_is_minus_log16_times_one_minus_p_leq_squared():
    problem = Problem(seed=3)
    pairs = tuples(M, M)
    weights = tuple_weights(pairs, [problem.anchor, problem.anchor])
    for rewards, (_, p_leq) in [
        (TIED_REWARDS, reward_cdf(problem.anchor, TIED_REWARDS)),  # raw rewards, ties as ≤
        (KEYS, reward_cdf(problem.anchor, KEYS)),
    ]:
        for y in range(M):
            r_j = jbond_reward(rewards[[y]].expand(len(pairs)), rewards[pairs])
            mean = float((weights * r_j).sum())
            assert mean == pytest.approx(-math.log(16.0) * (1 - float(p_leq[y])) ** 2, abs=1e-12)
    # with distinct keys p≤ is bonbench's exact strict-order quantile
    _, p_leq_strict = quantiles_exact(problem.anchor.exp().numpy(), TIED_REWARDS.numpy())
    np.testing.assert_allclose(reward_cdf(problem.anchor, KEYS)[1].numpy(), p_leq_strict, atol=1e-12)
    # calibration: at the median the expected reward is log p≤ = log 1/2
    assert -math.log(16.0) * (1 - 0.5) ** 2 == pytest.approx(math.log(0.5))


@pytest.mark.parametrize("k", [3, 4])
def test_jbond_reward_from_k_anchor_samples_keeps_the_mean_and_lowers_the_variance(k):
    """Averaged over all pairs of k anchor samples, r_J keeps its mean -log 16 · (1 - p≤)² (exact,
    every k-tuple enumerated) and its variance over the anchor draws falls below the paper's k = 2."""
    problem = Problem(seed=3)
    _, p_leq = reward_cdf(problem.anchor, TIED_REWARDS)
    moments = {}
    for size in (2, k):
        draws = tuples(*[M] * size)
        weights = tuple_weights(draws, [problem.anchor] * size)
        for y in range(M):
            r_j = jbond_reward(TIED_REWARDS[[y]].expand(len(draws)), TIED_REWARDS[draws])
            mean = float((weights * r_j).sum())
            moments[size, y] = mean, float((weights * (r_j - mean) ** 2).sum())
            assert mean == pytest.approx(-math.log(16.0) * (1 - float(p_leq[y])) ** 2, abs=1e-12)
    for y in range(M):
        if moments[2, y][1] > 1e-12:  # y not at the top or bottom of the anchor's rewards
            assert moments[k, y][1] < moments[2, y][1]
    # k = 2 is the paper's indicator: worse than both anchor samples
    pair = torch.tensor([[1.0, 2.0], [1.0, 0.5], [0.5, 3.0]], dtype=DTYPE)
    torch.testing.assert_close(jbond_reward(torch.full((3,), 0.7, dtype=DTYPE), pair),
                               -math.log(16.0) * torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE))


# ----------------------------------------------------------------------------- J-BOND


def _jbond_call(problem, beta, gamma, rewards, k=2):
    combos = tuples(*[M] * (1 + k))  # (y, y'_1, .., y'_k)
    weights = tuple_weights(combos, [problem.log_pi()] + [problem.anchor] * k)
    leaves = Leaves(problem, weights)
    out = jbond_loss(
        leaves(combos[:, 0]),
        problem.anchor[combos[:, 0]],
        rewards[combos[:, 0]],
        rewards[combos[:, 1:]],
        leaves(combos[:, 1:]),
        beta=beta,
        gamma=gamma,
        use_baseline=False,
    )
    return leaves, out


@pytest.mark.parametrize("rewards", [TIED_REWARDS, KEYS], ids=["tied", "distinct"])
@pytest.mark.parametrize("beta,gamma,k", [(0.5, 0.0, 2), (0.0, 0.0, 2), (1.0, 0.0, 2), (0.3, 1.5, 2),
                                          (0.5, 0.0, 3), (0.0, 0.0, 3), (1.0, 0.0, 3)])
def test_jbond_expected_gradient_is_jeffreys_to_best_of_2_of_the_anchor(rewards, beta, gamma, k):
    """With the paper's two anchor samples and with k = 3 (all pairs averaged): the same objective."""
    problem = Problem(seed=0)
    leaves, out = _jbond_call(problem, beta, gamma, rewards, k)
    got = leaves.expected_gradient(out)

    p_less, p_leq = reward_cdf(problem.anchor, rewards)
    # Best of two anchor samples, a tie kept by y'_1: π_a(y) · (F≤(y) + F<(y)).
    best_of_2 = problem.anchor + torch.log(p_leq + p_less)
    expected_r_j = -math.log(16.0) * (1 - p_leq) ** 2

    def objective(log_pi):
        forward = cross_entropy(best_of_2, log_pi)
        backward = kl(log_pi, problem.anchor) - (log_pi.exp() * expected_r_j).sum()
        return (1 - beta) * forward + beta * backward + gamma * kl(log_pi, problem.anchor)

    assert relative_error(got, objective_gradient(problem, objective)) < 1e-9


def test_jbond_regulariser_has_the_gradient_of_gamma_kl_to_anchor():
    problem = Problem(seed=4)
    gamma = 2.0
    grads = []
    for g in (gamma, 0.0):
        problem.theta.grad = None
        leaves, out = _jbond_call(problem, 0.5, g, TIED_REWARDS)
        grads.append(leaves.expected_gradient(out))
    expected = objective_gradient(problem, lambda lp: gamma * kl(lp, problem.anchor))
    assert relative_error(grads[0] - grads[1], expected) < 1e-9


def test_jbond_batch_baseline_leaves_the_expected_gradient_unchanged():
    # Two prompts whose baseline is each other's return: enumerate both prompts' samples.
    size = 3
    rewards = TIED_REWARDS[:size]  # 0, 1, 1: one tie
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(size, generator=g, dtype=DTYPE).requires_grad_(True)
    anchor = torch.log_softmax(torch.randn(size, generator=g, dtype=DTYPE), 0)
    combos = tuples(size, size, size)
    log_pi = torch.log_softmax(theta, 0)
    combo_w = tuple_weights(combos, [log_pi, anchor, anchor])
    with_baseline = torch.zeros(size, dtype=DTYPE)
    without = torch.zeros(size, dtype=DTYPE)
    for i, j in itertools.product(range(len(combos)), repeat=2):
        batch = combos[[i, j]]
        for use_baseline, total in ((True, with_baseline), (False, without)):
            lp = torch.log_softmax(theta, 0)
            out = jbond_loss(
                lp[batch[:, 0]],
                anchor[batch[:, 0]],
                rewards[batch[:, 0]],
                rewards[batch[:, 1:]],
                lp[batch[:, 1:]],
                beta=0.5,
                use_baseline=use_baseline,
            )
            (grad,) = torch.autograd.grad(out.loss, theta)
            total += combo_w[i] * combo_w[j] * grad
    assert relative_error(with_baseline, without) < 1e-9


def test_jbond_monte_carlo_gradient_with_baseline_matches_exact_gradient():
    problem = Problem(seed=6)
    p_less, p_leq = reward_cdf(problem.anchor, TIED_REWARDS)
    best_of_2 = problem.anchor + torch.log(p_leq + p_less)
    expected_r_j = -math.log(16.0) * (1 - p_leq) ** 2

    def objective(log_pi):
        backward = kl(log_pi, problem.anchor) - (log_pi.exp() * expected_r_j).sum()
        return 0.5 * cross_entropy(best_of_2, log_pi) + 0.5 * backward

    exact = objective_gradient(problem, objective)
    g = torch.Generator().manual_seed(7)
    total, batches, prompts = torch.zeros(M, dtype=DTYPE), 400, 256
    for _ in range(batches):
        log_pi = problem.log_pi()
        ys = torch.multinomial(log_pi.detach().exp(), prompts, replacement=True, generator=g)
        anchors = torch.multinomial(problem.anchor.exp(), 2 * prompts, replacement=True, generator=g)
        anchors = anchors.view(prompts, 2)
        out = jbond_loss(
            log_pi[ys], problem.anchor[ys], TIED_REWARDS[ys], TIED_REWARDS[anchors], log_pi[anchors]
        )
        total += torch.autograd.grad(out.loss, problem.theta)[0]
    assert relative_error(total / batches, exact) < 0.015  # measured 0.2-0.4 %


def test_jbond_forward_term_trains_on_the_better_anchor_sample_and_keeps_the_first_on_ties():
    anchor_rewards = torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.5, 1.5]], dtype=DTYPE)
    anchor_sample_logprobs = torch.zeros(3, 2, dtype=DTYPE, requires_grad=True)
    zeros = torch.zeros(3, dtype=DTYPE)
    out = jbond_loss(zeros, zeros, zeros, anchor_rewards, anchor_sample_logprobs, beta=0.0)
    out.loss.backward()
    expected = -torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=DTYPE) / 3
    torch.testing.assert_close(anchor_sample_logprobs.grad, expected)


def test_jbond_rejects_bad_shapes_and_a_lonely_baseline():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="anchor_rewards"):
        jbond_loss(x, x, x, torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="anchor_sample_logprobs"):
        jbond_loss(x, x, x, torch.zeros(3, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="k >= 2"):
        jbond_reward(x, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="P >= 2"):
        one = torch.zeros(1)
        jbond_loss(one, one, one, torch.zeros(1, 2), torch.zeros(1, 2))


# ----------------------------------------------------------------------------- BOND


def _bond_batch(problem: Problem, n: int, k: int, log_quantiles_of):
    """Every (policy pair, k reference samples) combination as one prompt."""
    policy_pairs, ref_tuples = tuples(M, M), tuples(*[M] * k)
    pair_w = tuple_weights(policy_pairs, [problem.log_pi()] * 2)
    ref_w = tuple_weights(ref_tuples, [problem.ref] * k)
    a = torch.arange(len(policy_pairs)).repeat_interleave(len(ref_tuples))
    b = torch.arange(len(ref_tuples)).repeat(len(policy_pairs))
    ys, pool = policy_pairs[a], ref_tuples[b]
    return ys, pool, pair_w[a] * ref_w[b], log_quantiles_of(ys, pool)


def _bond_expected_gradient(problem: Problem, n: int, ys, pool, weights, log_q, beta: float):
    """E[∇ bond_loss] over a batch from ``_bond_batch``."""
    leaves = Leaves(problem, weights)
    out = bond_loss(policy_logprobs=leaves(ys), ref_logprobs=problem.ref[ys], log_quantiles=log_q,
                    ref_sample_logprobs=leaves(pool), ref_rewards=KEYS[pool], n=n, beta=beta)
    return leaves.expected_gradient(out)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.8])
def test_bond_expected_gradient_is_jeffreys_divergence_to_best_of_n(beta):
    problem, n, k = Problem(seed=1), 3, 3
    exact_r = r_bond(problem.ref, n)
    ys, pool, weights, log_q = _bond_batch(problem, n, k, lambda ys, pool: exact_r[ys])
    got = _bond_expected_gradient(problem, n, ys, pool, weights, log_q, beta)
    bon = bon_log(problem.ref, n)
    # π_ref · exp((n-1) · r_BOND) is π_BoN itself (docs/math.md §2).
    torch.testing.assert_close(torch.log_softmax(problem.ref + (n - 1) * exact_r, 0), bon)

    def objective(log_pi):
        return (1 - beta) * cross_entropy(bon, log_pi) + beta * kl(log_pi, bon)

    assert relative_error(got, objective_gradient(problem, objective)) < 1e-9


def test_bond_with_mc_quantiles_targets_the_smoothed_estimator_fixed_point():
    problem, n, k = Problem(seed=2), 3, 3
    keys = KEYS.numpy()

    def mc(ys, pool):
        return torch.from_numpy(log_quantile(keys[ys.numpy()], keys[pool.numpy()], smoothing=True))

    ys, pool, weights, log_q = _bond_batch(problem, n, k, mc)
    got = _bond_expected_gradient(problem, n, ys, pool, weights, log_q, 0.5)
    # E[log p̂≤(y)] with c ~ Binomial(k, p≤(y)) and p̂≤ = (c + 1)/(k + 1) (docs/math.md §2)
    _, p_leq = quantiles_exact(problem.ref.exp().numpy(), TIED_REWARDS.numpy())
    c = np.arange(k + 1)
    mean_log_q = binom.pmf(c[None], k, p_leq[:, None]) @ np.log((c + 1.0) / (k + 1.0))
    target = torch.log_softmax(problem.ref + (n - 1) * torch.from_numpy(mean_log_q), 0)
    bon = bon_log(problem.ref, n)
    expected = objective_gradient(
        problem, lambda lp: 0.5 * cross_entropy(bon, lp) + 0.5 * kl(lp, target)
    )
    assert relative_error(got, expected) < 1e-9
    assert float(kl(target, bon)) > 1e-3  # the estimator's target really is off π_BoN


def test_bond_single_policy_sample_runs_without_baseline_and_same_expectation():
    problem, n = Problem(seed=8), 2
    exact_r = r_bond(problem.ref, n)
    ys = torch.arange(M).unsqueeze(1)  # one sample per prompt, every outcome once
    leaves = Leaves(problem, problem.log_pi().detach().exp())
    out = bond_loss(
        policy_logprobs=leaves(ys), ref_logprobs=problem.ref[ys], log_quantiles=exact_r[ys], n=n, beta=1.0
    )
    got = leaves.expected_gradient(out)
    bon = bon_log(problem.ref, n)
    assert relative_error(got, objective_gradient(problem, lambda lp: kl(lp, bon))) < 1e-9


def test_vbon_and_bon_sft_are_bond_with_beta_one_and_zero():
    g = torch.Generator().manual_seed(9)
    policy = torch.randn(4, 2, generator=g, dtype=DTYPE)
    ref = torch.randn(4, 2, generator=g, dtype=DTYPE)
    log_q = -torch.rand(4, 2, generator=g, dtype=DTYPE)
    pool_lp = torch.randn(4, 5, generator=g, dtype=DTYPE)
    pool_r = torch.randint(0, 3, (4, 5), generator=g).to(DTYPE)
    v = vbon_loss(policy, ref, log_q, n=4)
    b = bond_loss(policy_logprobs=policy, ref_logprobs=ref, log_quantiles=log_q, n=4, beta=1.0)
    assert v.loss.item() == b.loss.item() and v.metrics == b.metrics
    s = bon_sft_loss(pool_lp, pool_r, n=4)
    b = bond_loss(ref_sample_logprobs=pool_lp, ref_rewards=pool_r, n=4, beta=0.0)
    assert s.loss.item() == b.loss.item()
    with pytest.raises(ValueError, match="forward term"):
        bond_loss(policy_logprobs=policy, ref_logprobs=ref, log_quantiles=log_q, n=4, beta=0.5)
    with pytest.raises(ValueError, match="finite"):
        vbon_loss(policy, ref, torch.full((4, 2), -math.inf, dtype=DTYPE), n=4)


def test_bon_sft_expected_gradient_is_forward_kl_with_tied_rewards_kept_by_sample_order():
    problem, n, k = Problem(seed=10), 2, 3
    pool = tuples(*[M] * k)
    leaves = Leaves(problem, tuple_weights(pool, [problem.ref] * k))
    got = leaves.expected_gradient(bon_sft_loss(leaves(pool), TIED_REWARDS[pool], n=n))
    # Raw tied rewards: the best of n i.i.d. draws with ties to the earlier draw has law
    # π_ref(y) · Σ_i F<^(i-1) · F≤^(n-i) over reward levels.
    p_less, p_leq = reward_cdf(problem.ref, TIED_REWARDS)
    target = problem.ref + torch.log(sum(p_less**i * p_leq ** (n - 1 - i) for i in range(n)))
    torch.testing.assert_close(target.exp().sum(), torch.tensor(1.0, dtype=DTYPE))
    expected = objective_gradient(problem, lambda lp: cross_entropy(target, lp))
    assert relative_error(got, expected) < 1e-9


# ----------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("beta_rl", [0.0, 0.1, 1.0])
def test_rloo_expected_gradient_is_kl_regularised_reward(beta_rl):
    problem = Problem(seed=11)
    combos = tuples(M, M, M)  # three samples per prompt
    leaves = Leaves(problem, tuple_weights(combos, [problem.log_pi()] * 3))
    out = rloo_loss(leaves(combos), problem.ref[combos], TIED_REWARDS[combos], beta_rl=beta_rl)
    got = leaves.expected_gradient(out)

    def objective(log_pi):
        return -((log_pi.exp() * TIED_REWARDS).sum() - beta_rl * kl(log_pi, problem.ref))

    assert relative_error(got, objective_gradient(problem, objective)) < 1e-9
    with pytest.raises(ValueError, match="S >= 2"):
        rloo_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), beta_rl=0.1)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_bonbon_expected_gradient_with_two_samples_in_closed_form(alpha):
    problem, n = Problem(seed=12), 2
    pairs = tuples(M, M)
    leaves = Leaves(problem, tuple_weights(pairs, [problem.ref] * 2))
    out = bonbon_loss(leaves(pairs), problem.ref[pairs], KEYS[pairs], alpha=alpha)
    got = leaves.expected_gradient(out)
    assert out.metrics["gap_target"] == pytest.approx(1.0)  # (n-1) · H_(n-1) at n = 2
    bon = bon_log(problem.ref, n)
    ref_p = problem.ref.exp()

    def objective(log_pi):
        ratio = log_pi - problem.ref
        # distinct keys: best a ≻ worst b from 2·π(a)π(b); the same outcome twice gives h = 0
        better = KEYS[:, None] > KEYS[None, :]
        pair_p = 2 * ref_p[:, None] * ref_p[None, :] * better
        gap = ratio[:, None] - ratio[None, :]
        squared = (pair_p * (gap - 1.0) ** 2).sum() + (ref_p**2).sum() * 1.0
        return alpha * cross_entropy(bon, log_pi) + (1 - alpha) * squared

    assert relative_error(got, objective_gradient(problem, objective)) < 1e-9


def test_bonbon_sft_term_is_forward_kl_to_best_of_n():
    problem, n = Problem(seed=13), 3
    combos = tuples(M, M, M)
    leaves = Leaves(problem, tuple_weights(combos, [problem.ref] * n))
    out = bonbon_loss(leaves(combos), problem.ref[combos], KEYS[combos], alpha=1.0)
    got = leaves.expected_gradient(out)
    bon = bon_log(problem.ref, n)
    assert relative_error(got, objective_gradient(problem, lambda lp: cross_entropy(bon, lp))) < 1e-9
    assert out.metrics["gap_target"] == pytest.approx(2 * (1 + 1 / 2))


# ----------------------------------------------------------------------------- what the recipes score


def _only(values: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """A leaf holding ``values`` where ``read`` is true and 0 elsewhere, as a recipe fills it."""
    return torch.where(read, values, torch.zeros_like(values)).detach().requires_grad_(True)


def _same_loss_and_gradient(full: tuple[torch.Tensor, ...], scored: tuple[torch.Tensor, ...],
                            read: torch.Tensor, loss_of) -> None:
    """``loss_of`` gives the same value and the same gradient on the read entries with ``scored``
    as with ``full``, and no gradient elsewhere."""
    a, b = loss_of(*full).loss, loss_of(*scored).loss
    assert a.item() == b.item()
    grads_full = torch.autograd.grad(a, full, allow_unused=True, materialize_grads=True)
    grads_scored = torch.autograd.grad(b, scored, allow_unused=True, materialize_grads=True)
    for g_full, g_scored in zip(grads_full, grads_scored):
        torch.testing.assert_close(g_scored, torch.where(read, g_full, torch.zeros_like(g_full)), rtol=0, atol=0)
        assert not g_full[~read].any()


# Tied rows on purpose: a recipe that broke ties differently from the loss would score the wrong sample.
RECIPE_REWARDS = torch.tensor([[1.0, 1.0, 0.0, 2.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 3.0, 1.0],
                               [0.0, 2.0, 2.0, 0.0], [1.0, 0.0, 0.0, 1.0]], dtype=DTYPE)


def test_jbond_loss_reads_only_the_anchor_sample_that_the_recipe_scores():
    g = torch.Generator().manual_seed(21)
    anchor_rewards = RECIPE_REWARDS[:, :2]  # ties in rows 0, 1 and 4
    p = len(anchor_rewards)
    full = torch.randn(p, 2, generator=g, dtype=DTYPE).requires_grad_(True)
    read = torch.zeros(p, 2, dtype=torch.bool)
    read[torch.arange(p), best_and_worst(anchor_rewards).best] = True  # what distill/jbond.py scores
    ys = torch.randn(3, p, generator=g, dtype=DTYPE)

    def loss_of(anchor_sample_logprobs):
        return jbond_loss(ys[0], ys[1], ys[2], anchor_rewards, anchor_sample_logprobs, beta=0.5)

    _same_loss_and_gradient((full,), (_only(full, read),), read, loss_of)


def test_jbond_loss_with_k_anchor_samples_reads_only_those_that_can_win_a_pair():
    g = torch.Generator().manual_seed(23)
    p, k = RECIPE_REWARDS.shape
    full = torch.randn(p, k, generator=g, dtype=DTYPE).requires_grad_(True)
    read = best_of_n_weights(RECIPE_REWARDS, 2) > 0  # what distill/jbond.py scores
    assert (read.sum(dim=1) == k - 1).all()
    ys = torch.randn(3, p, generator=g, dtype=DTYPE)

    def loss_of(anchor_sample_logprobs):
        return jbond_loss(ys[0], ys[1], ys[2], RECIPE_REWARDS, anchor_sample_logprobs, beta=0.5)

    _same_loss_and_gradient((full,), (_only(full, read),), read, loss_of)


def test_bonbon_loss_reads_only_the_best_and_worst_samples_that_the_recipe_scores():
    g = torch.Generator().manual_seed(22)
    p, n = RECIPE_REWARDS.shape
    policy = torch.randn(p, n, generator=g, dtype=DTYPE).requires_grad_(True)
    ref = torch.randn(p, n, generator=g, dtype=DTYPE).requires_grad_(True)
    best, worst = best_and_worst(RECIPE_REWARDS)  # what distill/bonbon.py scores
    read = torch.zeros(p, n, dtype=torch.bool)
    read[torch.arange(p), best] = read[torch.arange(p), worst] = True

    def loss_of(policy_logprobs, ref_logprobs):
        return bonbon_loss(policy_logprobs, ref_logprobs, RECIPE_REWARDS, alpha=0.3)

    _same_loss_and_gradient((policy, ref), (_only(policy, read), _only(ref, read)), read, loss_of)


def test_bond_forward_term_reads_only_the_samples_that_can_win_a_subset():
    g = torch.Generator().manual_seed(23)
    n = 3
    full = torch.randn(*RECIPE_REWARDS.shape, generator=g, dtype=DTYPE).requires_grad_(True)
    read = best_of_n_weights(RECIPE_REWARDS, n) > 0  # what distill/bond.py scores
    assert not read.all()

    def loss_of(ref_sample_logprobs):
        return bon_sft_loss(ref_sample_logprobs, RECIPE_REWARDS, n=n)

    _same_loss_and_gradient((full,), (_only(full, read),), read, loss_of)
