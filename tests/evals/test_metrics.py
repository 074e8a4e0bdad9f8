"""evals/metrics.py: preferences from both orders, bootstrap intervals, and the length-controlled
win rate against cases solved by hand and by brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit, logit

from evals import metrics


def test_pair_preference_averages_both_orders_and_cancels_a_constant_position_bias():
    # A judge that adds +0.2 to whichever answer comes first: the bias cancels in the average.
    truth = np.array([0.3, 0.5, 0.7])
    p_ab, p_ba = truth + 0.2, (1 - truth) + 0.2
    np.testing.assert_allclose(metrics.pair_preference(p_ab, p_ba), truth)
    assert metrics.position_bias(p_ab, p_ba) == pytest.approx(0.7)
    assert metrics.position_bias([1.0, 1.0], [1.0, 1.0]) == 1.0  # always picks the first: all ties
    np.testing.assert_allclose(metrics.pair_preference([1.0, 1.0], [1.0, 1.0]), [0.5, 0.5])


def test_pair_preference_rejects_invalid_judgments():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.pair_preference([0.5, math.nan], [0.5, 0.5])
    with pytest.raises(ValueError, match="same shape"):
        metrics.pair_preference([0.5], [0.5, 0.5])


def test_bootstrap_interval_is_the_percentiles_of_the_resampled_statistic():
    values = np.array([0.0, 1.0, 1.0, 0.5, 1.0])
    low, high = metrics.bootstrap_interval(lambda idx: float(values[idx].mean()), 5, resamples=400, seed=3)
    rng = np.random.default_rng(3)  # the same draws, by hand
    draws = [values[rng.integers(0, 5, size=5)].mean() for _ in range(400)]
    assert (low, high) == pytest.approx(tuple(np.quantile(draws, [0.025, 0.975])))
    interval = metrics.mean_preference(values, resamples=400, seed=3)
    assert interval == pytest.approx((0.7, low, high))
    assert low < 0.7 < high


def test_bootstrap_interval_of_a_constant_is_a_point():
    assert metrics.mean_preference([1.0] * 8, resamples=50) == (1.0, 1.0, 1.0)


def test_length_feature_is_tanh_of_the_difference_over_its_sample_sd():
    len_a, len_b = np.array([10, 30, 20]), np.array([20, 10, 20])
    delta = np.array([-10.0, 20.0, 0.0])
    sd = math.sqrt(((delta - delta.mean()) ** 2).sum() / 2)
    np.testing.assert_allclose(metrics.length_feature(len_a, len_b), np.tanh(delta / sd))
    np.testing.assert_array_equal(metrics.length_feature([5, 7], [1, 3]), [0.0, 0.0])  # constant difference
    np.testing.assert_array_equal(metrics.length_feature([5], [1]), [0.0])


def test_lc_win_rate_of_two_symmetric_length_groups_matches_the_closed_form():
    # No instruction term (λ = ∞): η = θ + φ x with x = ±t only, so the fit is saturated,
    # σ(θ + φt) = ȳ₊ and σ(θ − φt) = ȳ₋, and LC = σ(θ) = σ((logit ȳ₊ + logit ȳ₋) / 2).
    y_long = np.array([0.9, 0.8, 1.0, 0.7])  # A longer: the judge likes A more
    y_short = np.array([0.4, 0.5, 0.2, 0.3])
    y = np.concatenate([y_long, y_short])
    len_a = np.array([300] * 4 + [100] * 4)
    len_b = np.full(8, 200)
    fit = metrics.fit_length_controlled(y, metrics.length_feature(len_a, len_b), instruction_l2=math.inf)
    theta = 0.5 * (logit(y_long.mean()) + logit(y_short.mean()))
    t = np.tanh(100 / np.std(np.r_[[100] * 4, [-100] * 4], ddof=1))
    assert fit.converged
    assert fit.intercept == pytest.approx(theta, abs=1e-6)
    assert fit.length_coef == pytest.approx((logit(y_long.mean()) - theta) / t, abs=1e-6)
    assert fit.win_rate == pytest.approx(expit(theta), abs=1e-7)
    assert fit.win_rate == pytest.approx(0.63594, abs=1e-5)  # ȳ₊ = 0.85, ȳ₋ = 0.35 by hand


def test_lc_win_rate_equals_the_raw_win_rate_when_lengths_do_not_differ():
    # Stationarity in θ: Σ σ(θ + u_i) = Σ y_i, whatever the ridge.
    y = np.array([0.1, 0.9, 0.6, 0.75, 1.0, 0.0, 0.5])
    for l2 in (0.3, 1.0, 10.0, math.inf):
        fit = metrics.fit_length_controlled(y, np.zeros_like(y), l2)
        assert fit.win_rate == pytest.approx(y.mean(), abs=1e-7)


def test_lc_fit_recovers_a_judge_that_only_likes_length():
    rng = np.random.default_rng(0)
    len_a, len_b = rng.integers(20, 400, 60), rng.integers(20, 400, 60)
    x = metrics.length_feature(len_a, len_b)
    y = expit(-0.4 + 2.0 * x)  # exactly the model with u = 0
    fit, interval = metrics.length_controlled_win_rate(y, len_a, len_b, resamples=50)
    assert (fit.intercept, fit.length_coef) == pytest.approx((-0.4, 2.0), abs=1e-5)
    np.testing.assert_allclose(fit.instruction_terms, 0.0, atol=1e-5)
    assert fit.win_rate == pytest.approx(expit(-0.4), abs=1e-6)
    assert interval.estimate == fit.win_rate and interval.low <= fit.win_rate <= interval.high


def test_lc_fit_with_instruction_terms_matches_a_brute_force_minimum():
    # Three instructions, ridge λ = 1. For fixed (θ, φ) each u_i solves σ(η_i) − y_i + λ u_i = 0 on its own
    # (brentq), which gives the profile objective; a grid over (θ, φ), refined twice, finds its minimum.
    y = np.array([0.85, 0.3, 0.6])
    x = np.array([0.8, -0.5, 0.1])
    l2 = 1.0

    def profile(theta, phi):
        loss = 0.0
        for xi, yi in zip(x, y):
            u = brentq(lambda u: expit(theta + phi * xi + u) - yi + l2 * u, -20, 20, xtol=1e-14)
            eta = theta + phi * xi + u
            loss += np.logaddexp(0, eta) - yi * eta + 0.5 * l2 * u * u
        return loss

    center, step = (0.0, 0.0), 0.5
    for _ in range(3):
        grid = [(center[0] + i * step, center[1] + j * step) for i, j in itertools.product(range(-20, 21), repeat=2)]
        center = min(grid, key=lambda p: profile(*p))
        step /= 20
    fit = metrics.fit_length_controlled(y, x, l2)
    assert (fit.intercept, fit.length_coef) == pytest.approx(center, abs=2 * step * 20)
    u = [brentq(lambda u: expit(center[0] + center[1] * xi + u) - yi + l2 * u, -20, 20) for xi, yi in zip(x, y)]
    assert fit.win_rate == pytest.approx(np.mean(expit(center[0] + np.array(u))), abs=1e-4)


def test_lc_win_rate_is_antisymmetric_in_the_two_methods():
    rng = np.random.default_rng(1)
    y = rng.uniform(0, 1, 30)
    len_a, len_b = rng.integers(10, 200, 30), rng.integers(10, 200, 30)
    ab, _ = metrics.length_controlled_win_rate(y, len_a, len_b, resamples=10)
    ba, _ = metrics.length_controlled_win_rate(1 - y, len_b, len_a, resamples=10)
    assert ab.win_rate + ba.win_rate == pytest.approx(1.0, abs=1e-7)


def test_lc_win_rate_of_unanimous_preferences_approaches_one():
    fit = metrics.fit_length_controlled(np.ones(5), np.array([0.5, -0.2, 0.1, 0.9, -0.7]))
    assert fit.win_rate > 1 - 1e-6


def test_lc_rejects_bad_arguments():
    with pytest.raises(ValueError, match="instruction_l2"):
        metrics.fit_length_controlled([0.5, 0.5], [0.0, 0.0], instruction_l2=0)
    with pytest.raises(ValueError, match="length_x"):
        metrics.fit_length_controlled([0.5, 0.5], [0.0])
    with pytest.raises(ValueError, match="shaped like"):
        metrics.length_controlled_win_rate([0.5, 0.5], [1, 2, 3], [1, 2])
