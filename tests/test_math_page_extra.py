"""Formulas of docs/math.md that no other test checks, each against brute force, exact
arithmetic or simulation. The page names each test next to its formula."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binom

from bonbench.bon import (
    bon_kl,
    bon_kl_exact,
    bon_probabilities,
    bon_win_rate,
    log_quantile,
    quantiles_exact,
    strict_order,
    win_rate,
)
from bonbench.estimators import duplicate_rate
from distill.testbed import make_testbed


def _simulate_bon(rng, probs, rewards, n, samples):
    """Outcome indices of ``samples`` Best-of-n draws, each the ≺-best of n draws from ``probs``."""
    draws = rng.choice(len(probs), size=(samples, n), p=probs)
    ranks = strict_order(rewards)[draws]
    return np.take_along_axis(draws, ranks.argmax(axis=1)[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- docs/math.md §1


def test_bon_probabilities_equal_the_theorem_1_product_form_with_its_collision_term():
    # π_BoN = π_ref · p≤^(N-1) · Σ_{i=1..N} (p</p≤)^(i-1), and the collision term lies in [1, N].
    rng = np.random.default_rng(0)
    for trial in range(40):
        k = int(rng.integers(2, 12))
        probs = rng.dirichlet(np.ones(k))
        rewards = rng.integers(0, 3, size=k).astype(float) if trial % 2 else rng.normal(size=k)
        q = quantiles_exact(probs, rewards)
        for n in (1, 2, 5, 9):
            collision = sum((q.p_less / q.p_leq) ** (i - 1) for i in range(1, n + 1))
            assert np.all(collision >= 1 - 1e-12) and np.all(collision <= n + 1e-12)
            product = probs * q.p_leq ** (n - 1) * collision
            np.testing.assert_allclose(product, bon_probabilities(probs, rewards, n), rtol=1e-10, atol=1e-15)
        worst = np.argmin(strict_order(rewards))
        assert q.p_less[worst] == 0.0  # the worst outcome has collision term 1: π_BoN = π_ref^N


def test_bon_probabilities_approach_the_continuous_form_as_outcomes_become_distinct():
    # Uniform over K distinct rewards: total variation between π_BoN and N·π_ref·p≤^(N-1)
    # (renormalised) shrinks like 1/K.
    n, distances = 8, []
    for k in (10, 100, 1_000, 10_000):
        probs, rewards = np.full(k, 1.0 / k), np.arange(k, dtype=float)
        continuous = n * probs * quantiles_exact(probs, rewards).p_leq ** (n - 1)
        distances.append(0.5 * np.abs(bon_probabilities(probs, rewards, n) - continuous / continuous.sum()).sum())
    assert all(later < 0.2 * earlier for earlier, later in zip(distances, distances[1:]))
    assert distances[-1] < 1e-4


def test_best_of_8_win_rate_on_256_equally_likely_sequences():
    # Distinct rewards, uniform π_ref: outcome of rank i (0 = worst) is the BoN pick with
    # probability ((i+1)^N - i^N)/K^N and beats a reference draw with probability i/K.
    k, n = 256, 8
    pick = [Fraction((i + 1) ** n - i**n, k**n) for i in range(k)]
    ties_lose = sum(p * Fraction(i, k) for i, p in enumerate(pick))
    ties_half = sum(p * (Fraction(i, k) + Fraction(1, 2 * k)) for i, p in enumerate(pick))
    assert float(ties_lose) == pytest.approx(0.886926, abs=1e-6)
    assert float(ties_half) == pytest.approx(0.888879, abs=1e-6)
    assert float(ties_half) < bon_win_rate(n)  # below N/(N+1) = 0.888889, by 1e-5

    probs, rewards = np.full(k, 1.0 / k), np.arange(k, dtype=float)
    q = quantiles_exact(probs, rewards)
    bon = bon_probabilities(probs, rewards, n)
    assert float(bon @ q.p_less) == pytest.approx(float(ties_lose), rel=1e-12)
    assert float(bon @ (q.p_less + q.p_leq) / 2) == pytest.approx(float(ties_half), rel=1e-12)

    rng = np.random.default_rng(1)
    chosen = _simulate_bon(rng, probs, rewards, n, 40_000)
    result = win_rate(rewards[chosen], rewards[rng.choice(k, size=40_000, p=probs)], confidence=0.9999)
    assert result.low <= float(ties_half) <= result.high


def test_best_of_8_win_rate_on_the_peaked_test_bed_reference():
    # The exact test bed's π_ref (an MLP at random init, 256 sequences, 9 tied reward levels).
    bed = make_testbed("mlp", seed=0)
    probs, keys = bed.ref_log_probs.exp().numpy(), bed.order_keys.numpy()
    probs = probs / probs.sum()
    rewards = bed.rewards.numpy()
    n = 8
    bon = bon_probabilities(probs, rewards, n)
    q = quantiles_exact(probs, rewards)
    # Under the strict order (ties between distinct sequences broken by index):
    strict_lose, strict_half = float(bon @ q.p_less), float(bon @ (q.p_less + q.p_leq) / 2)
    assert strict_lose == pytest.approx(0.8742, abs=1e-4)
    assert strict_half == pytest.approx(0.8876, abs=1e-4)
    assert strict_lose < 0.886926 and strict_half < 0.888879  # lower than on the uniform reference
    # Comparing reward values (what a user sees; tied levels are ties):
    below = (rewards[None, :] < rewards[:, None]).astype(float) @ probs
    equal = (rewards[None, :] == rewards[:, None]).astype(float) @ probs
    assert float(bon @ below) == pytest.approx(0.7530, abs=1e-4)
    assert float(bon @ (below + equal / 2)) == pytest.approx(0.8401, abs=1e-4)

    rng = np.random.default_rng(2)
    samples = 40_000
    chosen = _simulate_bon(rng, probs, rewards, n, samples)
    refs = rng.choice(len(probs), size=samples, p=probs)
    # Keys are distinct per sequence: a tie is the same sequence drawn twice.
    strict = win_rate(keys[chosen], keys[refs], confidence=0.9999)
    assert strict.low <= strict_half <= strict.high
    by_value = win_rate(rewards[chosen], rewards[refs], confidence=0.9999)
    assert by_value.low <= float(bon @ (below + equal / 2)) <= by_value.high


def test_analytic_kl_is_loose_on_the_peaked_test_bed_reference():
    bed = make_testbed("mlp", seed=0)
    probs = bed.ref_log_probs.exp().numpy()
    exact = bon_kl_exact(probs / probs.sum(), bed.rewards.numpy(), 8)
    assert exact == pytest.approx(1.1987, abs=1e-4)
    assert bon_kl(8) - exact == pytest.approx(0.0058, abs=1e-4)


# ----------------------------------------------------------------------------- docs/math.md §2


def test_r_bond_correction_lies_in_zero_to_log_n_over_n_minus_one_and_tilts_pi_ref_to_bon():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(10))
    rewards = rng.integers(0, 4, size=10).astype(float)
    q = quantiles_exact(probs, rewards)
    for n in (2, 4, 16):
        correction = np.log(sum((q.p_less / q.p_leq) ** i for i in range(n))) / (n - 1)
        assert np.all(correction >= -1e-12) and np.all(correction <= math.log(n) / (n - 1) + 1e-12)
        r_bond = np.log(q.p_leq) + correction
        tilted = probs * np.exp((n - 1) * r_bond)  # π_ref · exp(r_BOND / β_BOND), β_BOND = 1/(N-1)
        np.testing.assert_allclose(tilted, bon_probabilities(probs, rewards, n), rtol=1e-10)
        assert tilted.sum() == pytest.approx(1.0)  # no normaliser needed


def test_quantiles_and_best_of_n_are_invariant_to_monotone_reward_transforms():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(12))
    rewards = rng.integers(-3, 4, size=12).astype(float)
    for transform in (np.exp, lambda r: 5 * r**3 - 2, np.arctan):
        for a, b in zip(quantiles_exact(probs, rewards), quantiles_exact(probs, transform(rewards))):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(
            bon_probabilities(probs, rewards, 6), bon_probabilities(probs, transform(rewards), 6)
        )


@pytest.mark.parametrize("p_leq", [0.01, 0.1, 0.5, 0.9])
def test_smoothed_log_quantile_is_biased_upwards_by_its_binomial_expectation(p_leq):
    # A candidate at quantile p≤ of a continuous reward; k uniform reference rewards.
    # c ~ Binomial(k, p≤), E[log((c+1)/(k+1))] = Σ_c pmf(c) log((c+1)/(k+1)) > log p≤.
    k, repeats = 16, 100_000
    rng = np.random.default_rng(5)
    estimates = log_quantile(np.full((repeats, 1), p_leq), rng.random((repeats, k)))[:, 0]
    c = np.arange(k + 1)
    expected = float(binom.pmf(c, k, p_leq) @ np.log((c + 1.0) / (k + 1.0)))
    assert abs(estimates.mean() - expected) < 4 * estimates.std() / math.sqrt(repeats)
    assert expected > math.log(p_leq)
    raw = log_quantile(np.full((repeats, 1), p_leq), rng.random((repeats, k)), smoothing=False)[:, 0]
    share_infinite = np.mean(np.isneginf(raw))
    truth = (1 - p_leq) ** k  # P[c = 0]: the raw estimate is log 0
    assert abs(share_infinite - truth) < 4 * math.sqrt(truth * (1 - truth) / repeats) + 1e-12


# ----------------------------------------------------------------------------- docs/math.md §6


def test_duplicate_rate_is_unbiased_for_the_collision_probability():
    # Σ_y π(y)² is the chance that two independent draws are the same answer.
    rng = np.random.default_rng(6)
    probs = np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    texts = np.array([f"answer {i}" for i in range(len(probs))])
    pools = rng.choice(len(probs), size=(20_000, 6), p=probs)
    rates = np.array([duplicate_rate(list(texts[pool])) for pool in pools])
    assert abs(rates.mean() - float(probs @ probs)) < 4 * rates.std() / math.sqrt(len(rates))
