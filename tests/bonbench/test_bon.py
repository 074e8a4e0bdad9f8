"""Tests for bonbench.bon, each against brute force, exact arithmetic or simulation."""

import itertools
from decimal import Decimal, localcontext
from fractions import Fraction
from math import comb, log

import numpy as np
import pytest

from bonbench.bon import (
    Quantiles,
    WinRate,
    best_of_subset_weights,
    bon_kl,
    bon_kl_exact,
    bon_probabilities,
    bon_select,
    bon_win_rate,
    bonbon_gap,
    expected_best_of,
    log_quantile,
    mc_quantiles,
    quantiles_exact,
    strict_order,
    win_rate,
)


# ---------------------------------------------------------------------------------------
# Helpers


def _random_case(rng, k, tied=False):
    probs = rng.dirichlet(np.ones(k))
    if tied:
        rewards = rng.integers(0, max(1, k // 2), size=k).astype(float)
    else:
        rewards = rng.normal(size=k)
    return probs, rewards


def _best_by_strict_order(outcomes, rewards):
    """Brute-force ≺-best of a tuple of outcome indices: highest reward, then lowest index."""
    return max(outcomes, key=lambda i: (rewards[i], -i))


def _brute_force_bon(probs, rewards, n):
    k = len(probs)
    out = np.zeros(k)
    for draw in itertools.product(range(k), repeat=n):
        out[_best_by_strict_order(draw, rewards)] += np.prod(probs[list(draw)])
    return out


def _simulate_bon_outcomes(rng, probs, rewards, n, samples):
    """Outcome indices of `samples` Best-of-n draws, selected with the ≺ order."""
    draws = rng.choice(len(probs), size=(samples, n), p=probs)
    ranks = strict_order(rewards)[draws]
    return np.take_along_axis(draws, ranks.argmax(axis=1)[:, None], axis=1)[:, 0]


def _assert_within_standard_errors(counts, probs, samples, sigmas=4.0):
    freq = counts / samples
    se = np.sqrt(probs * (1 - probs) / samples)
    np.testing.assert_array_less(np.abs(freq - probs), sigmas * se + 1e-12)


# ---------------------------------------------------------------------------------------
# Strict order and exact quantiles


def test_strict_order_ranks_equal_rewards_by_lower_index_as_better():
    ranks = strict_order([1.0, 0.0, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(ranks, [3, 0, 2, 4, 1])


def test_quantiles_exact_match_hand_computed_values_with_ties():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    rewards = np.array([1.0, 0.0, 1.0, 2.0])  # order: 1 ≺ 2 ≺ 0 ≺ 3
    q = quantiles_exact(probs, rewards)
    assert isinstance(q, Quantiles)
    np.testing.assert_allclose(q.p_less, [0.5, 0.0, 0.2, 0.6])
    np.testing.assert_allclose(q.p_leq, [0.6, 0.2, 0.5, 1.0])


# ---------------------------------------------------------------------------------------
# bon_probabilities


@pytest.mark.parametrize("tied", [False, True])
def test_bon_probabilities_match_brute_force_enumeration(tied):
    rng = np.random.default_rng(0 if tied else 1)
    for k in range(1, 6):
        for n in range(1, 5):
            probs, rewards = _random_case(rng, k, tied=tied)
            expected = _brute_force_bon(probs, rewards, n)
            got = bon_probabilities(probs, rewards, n)
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)
            assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_bon_probabilities_of_all_tied_rewards_put_all_mass_on_lowest_index_drawn():
    probs = np.array([0.2, 0.3, 0.5])
    got = bon_probabilities(probs, np.zeros(3), 3)
    np.testing.assert_allclose(got, _brute_force_bon(probs, np.zeros(3), 3), rtol=1e-12)
    assert got[0] > probs[0]


def test_bon_probabilities_on_single_outcome_support():
    probs = np.array([0.0, 1.0, 0.0, 0.0])
    rewards = np.array([3.0, -1.0, 2.0, 0.0])
    for n in (1, 2, 7, 10_000):
        np.testing.assert_array_equal(bon_probabilities(probs, rewards, n), [0, 1, 0, 0])


def test_bon_probabilities_give_zero_to_zero_probability_outcomes():
    probs = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    rewards = np.array([5.0, 1.0, 0.0, 2.0, 1.0])
    got = bon_probabilities(probs, rewards, 3)
    np.testing.assert_array_equal(got[[0, 2, 4]], 0.0)
    np.testing.assert_allclose(got, _brute_force_bon(probs, rewards, 3), rtol=1e-12, atol=0)


def test_bon_probabilities_batched_rows_equal_row_by_row():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(6), size=(3, 4))
    rewards = rng.integers(0, 3, size=(3, 4, 6)).astype(float)
    got = bon_probabilities(probs, rewards, 5)
    assert got.shape == (3, 4, 6)
    for idx in np.ndindex(3, 4):
        np.testing.assert_allclose(got[idx], bon_probabilities(probs[idx], rewards[idx], 5), rtol=1e-14)


def test_bon_probabilities_match_simulated_best_of_n_draws_with_ties():
    rng = np.random.default_rng(3)
    probs = np.array([0.15, 0.25, 0.1, 0.3, 0.2])
    rewards = np.array([1.0, 2.0, 2.0, 0.0, 1.0])
    n, samples = 3, 200_000
    chosen = _simulate_bon_outcomes(rng, probs, rewards, n, samples)
    _assert_within_standard_errors(np.bincount(chosen, minlength=5), bon_probabilities(probs, rewards, n), samples)


def test_bon_probabilities_are_stable_for_large_n_and_tiny_probabilities():
    probs = np.array([1e-300, 1e-200, 1e-10, 0.5, 0.5 - 1e-10 - 1e-200, 0.0])
    rewards = np.array([5.0, 1.0, 3.0, 0.0, 2.0, 9.0])
    n = 10_000
    got = bon_probabilities(probs, rewards, n)
    assert np.isfinite(got).all() and (got >= 0).all()
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    # 400-digit decimal arithmetic on the same (renormalised) float probabilities.
    ranks = strict_order(rewards)
    with localcontext() as ctx:
        ctx.prec = 400
        dec = [Decimal(float(p)) for p in probs / probs.sum()]
        for i in range(len(probs)):
            below = sum((dec[j] for j in range(len(dec)) if ranks[j] < ranks[i]), Decimal(0))
            exact = float((below + dec[i]) ** n - below**n)
            assert got[i] == pytest.approx(exact, rel=1e-9, abs=0)
    assert got[0] == pytest.approx(n * 1e-300, rel=1e-9)  # best outcome: 1 − (1 − π)^n ≈ nπ


def test_bon_probabilities_on_large_uniform_support_match_closed_form_at_large_n():
    # Uniform over K distinct rewards: π_BoN of the outcome of rank i is ((i+1)/K)^n − (i/K)^n.
    k, n = 20_000, 10_000
    rewards = np.random.default_rng(19).permutation(k).astype(float)
    rank = strict_order(rewards)
    with np.errstate(divide="ignore"):
        closed = np.exp(n * np.log1p(-(k - 1 - rank) / k)) - np.exp(n * np.log1p(-(k - rank) / k))
    got = bon_probabilities(np.full(k, 1.0 / k), rewards, n)
    visible = closed > 1e-300
    np.testing.assert_allclose(got[visible], closed[visible], rtol=1e-10, atol=0)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_bon_probabilities_renormalise_probabilities_within_tolerance():
    rng = np.random.default_rng(20)
    probs, rewards = _random_case(rng, 10, tied=True)
    got = bon_probabilities(probs * (1 + 5e-7), rewards, 3)
    np.testing.assert_allclose(got, bon_probabilities(probs, rewards, 3), rtol=1e-12, atol=0)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_bon_probabilities_reject_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        bon_probabilities([0.5, 0.5], [1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match="non-negative"):
        bon_probabilities([1.5, -0.5], [1.0, 2.0], 2)
    with pytest.raises(ValueError, match="sum to 1"):
        bon_probabilities([0.5, 0.49], [1.0, 2.0], 2)
    with pytest.raises(ValueError, match="at least 1"):
        bon_probabilities([0.5, 0.5], [1.0, 2.0], 0)
    with pytest.raises(ValueError, match="integer"):
        bon_probabilities([0.5, 0.5], [1.0, 2.0], 2.5)
    with pytest.raises(ValueError, match="NaN"):
        bon_probabilities([0.5, 0.5], [1.0, np.nan], 2)


def test_best_of_n_of_best_of_m_is_best_of_n_times_m():
    rng = np.random.default_rng(4)
    for tied in (False, True):
        probs, rewards = _random_case(rng, 12, tied=tied)
        for n, m in [(2, 3), (4, 4), (3, 7)]:
            inner = bon_probabilities(probs, rewards, m)
            np.testing.assert_allclose(
                bon_probabilities(inner, rewards, n), bon_probabilities(probs, rewards, n * m), rtol=1e-10, atol=1e-15
            )


# ---------------------------------------------------------------------------------------
# KL


def test_bon_kl_is_log_n_minus_n_minus_one_over_n():
    assert bon_kl(1) == 0.0
    assert bon_kl(4) == pytest.approx(log(4) - 3 / 4)
    np.testing.assert_allclose(bon_kl(np.array([2, 8])), [log(2) - 1 / 2, log(8) - 7 / 8])


def test_bon_kl_exact_approaches_analytic_kl_as_distinct_support_grows():
    rng = np.random.default_rng(5)
    for n in (2, 4, 16):
        gaps = []
        for k in (10, 100, 20_000):
            rewards = rng.permutation(k).astype(float)
            gaps.append(bon_kl(n) - bon_kl_exact(np.full(k, 1.0 / k), rewards, n))
        assert 0 < gaps[2] < gaps[1] < gaps[0]
        assert gaps[2] < 1e-3


def test_bon_kl_exact_matches_direct_sum_and_never_exceeds_analytic_kl():
    rng = np.random.default_rng(6)
    for trial in range(60):
        probs, rewards = _random_case(rng, int(rng.integers(1, 30)), tied=trial % 2 == 0)
        n = int(rng.integers(1, 50))
        bon = bon_probabilities(probs, rewards, n)
        mask = bon > 0
        direct = np.sum(bon[mask] * np.log(bon[mask] / probs[mask]))
        exact = bon_kl_exact(probs, rewards, n)
        assert exact == pytest.approx(direct, rel=1e-9, abs=1e-12)
        assert exact <= bon_kl(n) + 1e-12


def test_bon_kl_exact_is_zero_for_a_single_outcome():
    assert bon_kl_exact([1.0], [0.0], 50) == 0.0


# ---------------------------------------------------------------------------------------
# Win rate


def test_win_rate_counts_ties_as_half():
    result = win_rate([1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0, 3.0])
    assert isinstance(result, WinRate)
    assert (result.wins, result.ties, result.losses, result.count) == (1, 2, 1, 4)
    assert result.rate == 0.5


def test_wilson_interval_endpoints_solve_the_score_equation():
    # Wilson endpoints p solve (rate − p)² = z² p (1 − p) / m, with rate = (wins + ties/2)/m.
    z = 1.959963984540054
    result = win_rate([1, 1, 1, 0, 0, 2, 2], [0, 0, 1, 1, 0, 1, 1])
    m = result.count
    assert result.rate == pytest.approx((4 + 0.5 * 2) / 7)
    for p in (result.low, result.high):
        assert (result.rate - p) ** 2 == pytest.approx(z * z * p * (1 - p) / m, rel=1e-9)
    assert result.low < result.rate < result.high


def test_win_rate_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        win_rate([], [])
    with pytest.raises(ValueError, match="confidence"):
        win_rate([1.0], [0.0], confidence=1.0)


def test_simulated_best_of_n_beats_reference_n_over_n_plus_one_for_continuous_rewards():
    rng = np.random.default_rng(7)
    for n in (1, 4, 16):
        bon = rng.normal(size=(20_000, n)).max(axis=1)
        ref = rng.normal(size=20_000)
        result = win_rate(bon, ref)
        assert result.ties == 0
        assert result.low <= bon_win_rate(n) <= result.high


def test_best_of_n_win_rate_is_lower_on_a_small_discrete_space():
    # Four equally likely outcomes with distinct rewards, n = 4: the exact win rate with
    # ties counted half is Σ π_BoN(y) (p<(y) + p≤(y)) / 2 = 0.7793 < 4/5.
    rng = np.random.default_rng(8)
    probs, rewards, n = np.full(4, 0.25), np.arange(4.0), 4
    q = quantiles_exact(probs, rewards)
    exact = float(np.sum(bon_probabilities(probs, rewards, n) * (q.p_less + q.p_leq) / 2))
    assert exact == pytest.approx(0.779296875)
    assert exact < bon_win_rate(n)
    chosen = _simulate_bon_outcomes(rng, probs, rewards, n, 20_000)
    ref = rng.choice(4, size=20_000, p=probs)
    result = win_rate(rewards[chosen], rewards[ref])
    assert result.low <= exact <= result.high
    assert result.high < bon_win_rate(n)


def test_wilson_interval_covers_true_win_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(9)
    n, count, repetitions = 4, 100, 400
    bon = rng.normal(size=(repetitions, count, n)).max(axis=2)
    ref = rng.normal(size=(repetitions, count))
    truth = bon_win_rate(n)
    covered = 0
    for rep in range(repetitions):
        result = win_rate(bon[rep], ref[rep])
        covered += result.low <= truth <= result.high
    assert 0.92 <= covered / repetitions <= 0.98


# ---------------------------------------------------------------------------------------
# Monte-Carlo quantiles


def test_mc_quantiles_and_log_quantile_match_hand_counts_per_prompt():
    candidates = np.array([[1.0, 2.5, 0.0], [1.0, 2.5, -1.0]])
    references = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 5.0, 5.0]])
    q = mc_quantiles(candidates, references)
    np.testing.assert_allclose(q.p_less, [[1 / 4, 3 / 4, 0.0], [0.0, 2 / 4, 0.0]])
    np.testing.assert_allclose(q.p_leq, [[2 / 4, 3 / 4, 1 / 4], [2 / 4, 2 / 4, 0.0]])
    # c = [[2, 3, 1], [2, 2, 0]], smoothed (c + 1)/(k + 1) with k = 4.
    np.testing.assert_allclose(
        log_quantile(candidates, references), np.log([[3 / 5, 4 / 5, 2 / 5], [3 / 5, 3 / 5, 1 / 5]])
    )
    raw = log_quantile(candidates, references, smoothing=False)
    np.testing.assert_allclose(raw[0], np.log([2 / 4, 3 / 4, 1 / 4]))
    assert raw[1, 2] == -np.inf


def test_mc_quantiles_of_one_prompt_accept_1d_inputs():
    q = mc_quantiles([0.5, 2.0], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(q.p_less, [1 / 3, 2 / 3])
    np.testing.assert_allclose(q.p_leq, [1 / 3, 1.0])


def test_mc_quantiles_equal_brute_force_comparison_on_random_batches():
    rng = np.random.default_rng(10)
    candidates = rng.integers(0, 6, size=(7, 5)).astype(float)
    references = rng.integers(0, 6, size=(7, 9)).astype(float)
    q = mc_quantiles(candidates, references)
    np.testing.assert_allclose(q.p_less, (references[:, None, :] < candidates[:, :, None]).mean(-1))
    np.testing.assert_allclose(q.p_leq, (references[:, None, :] <= candidates[:, :, None]).mean(-1))


def test_mc_quantiles_reject_mismatched_prompt_counts():
    with pytest.raises(ValueError, match="number of prompts"):
        mc_quantiles(np.zeros((2, 3)), np.zeros((3, 4)))


def test_mc_quantiles_converge_to_exact_quantiles_with_many_references():
    rng = np.random.default_rng(11)
    probs, rewards = _random_case(rng, 8)
    samples = 200_000
    references = rewards[rng.choice(8, size=samples, p=probs)]
    q_mc = mc_quantiles(rewards[None, :], references[None, :])
    q = quantiles_exact(probs, rewards)
    for mc, exact in ((q_mc.p_less[0], q.p_less), (q_mc.p_leq[0], q.p_leq)):
        _assert_within_standard_errors(mc * samples, exact, samples)


def test_mc_quantiles_compare_reward_values_not_the_index_tie_break():
    # Outcomes 0 and 1 share a reward: the MC estimate counts both as "≤", the strict
    # order ranks outcome 1 below outcome 0.
    probs, rewards = np.array([0.3, 0.3, 0.4]), np.array([1.0, 1.0, 0.0])
    references = rewards[np.random.default_rng(12).choice(3, size=100_000, p=probs)]
    q_mc = mc_quantiles(rewards, references)
    np.testing.assert_allclose(q_mc.p_leq, [1.0, 1.0, 0.4], atol=0.01)
    np.testing.assert_allclose(quantiles_exact(probs, rewards).p_leq, [1.0, 0.7, 0.4])


# ---------------------------------------------------------------------------------------
# expected_best_of


def test_best_of_subset_weights_are_how_often_each_rank_wins_a_random_subset():
    k = 7
    weights = best_of_subset_weights(k, list(range(1, k + 1)))
    for n in range(1, k + 1):
        subsets = list(itertools.combinations(range(k), n))  # ranks 0 (worst) .. k - 1 (best)
        wins = np.bincount([max(s) for s in subsets], minlength=k) / len(subsets)
        np.testing.assert_allclose(weights[n - 1], wins, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(best_of_subset_weights(k, 3), weights[2])
    with pytest.raises(ValueError, match="1 <= n <= K"):
        best_of_subset_weights(3, 4)


def test_expected_best_of_is_mean_at_one_and_max_at_k():
    rewards = np.random.default_rng(13).normal(size=(4, 9))
    got = expected_best_of(rewards, [1, 9])
    np.testing.assert_allclose(got[:, 0], rewards.mean(axis=1))
    np.testing.assert_allclose(got[:, 1], rewards.max(axis=1))


def test_expected_best_of_equals_average_max_over_all_subsets():
    rewards = np.array([0.3, -1.2, 2.0, 0.3, 5.5, 0.0, -0.7])
    k = len(rewards)
    got = expected_best_of(rewards, list(range(1, k + 1)))
    for n in range(1, k + 1):
        brute = np.mean([max(s) for s in itertools.combinations(rewards, n)])
        assert got[n - 1] == pytest.approx(brute, rel=1e-12)


def test_expected_best_of_is_unbiased_for_the_best_of_n_reward():
    # Truth from the exact Best-of-n distribution on a finite space (with ties).
    rng = np.random.default_rng(14)
    probs, rewards = _random_case(rng, 6, tied=True)
    k, repetitions = 8, 40_000
    samples = rewards[rng.choice(6, size=(repetitions, k), p=probs)]
    estimates = expected_best_of(samples, list(range(1, k + 1)))
    for n in range(1, k + 1):
        truth = float(bon_probabilities(probs, rewards, n) @ rewards)
        se = estimates[:, n - 1].std() / np.sqrt(repetitions)
        assert abs(estimates[:, n - 1].mean() - truth) <= 4 * se + 1e-12


def test_expected_best_of_is_stable_for_large_k():
    rewards = np.linspace(0.0, 1.0, 5_000)
    got = expected_best_of(rewards, [1, 2, 100, 5_000])
    # Grid r_(j) = (j − 1)/(K − 1): the defining sum in exact rational arithmetic.
    k = len(rewards)
    for value, n in zip(got, [1, 2, 100, 5_000]):
        exact = sum(Fraction(j - 1, k - 1) * comb(j - 1, n - 1) for j in range(n, k + 1)) / comb(k, n)
        assert value == pytest.approx(float(exact), rel=1e-10)


def test_expected_best_of_rejects_n_outside_one_to_k():
    with pytest.raises(ValueError, match="1 <= n <= K"):
        expected_best_of([1.0, 2.0, 3.0], [1, 4])
    with pytest.raises(ValueError, match="1 <= n <= K"):
        expected_best_of([1.0, 2.0, 3.0], [0])


def test_expected_best_of_scalar_n_drops_the_last_axis():
    assert expected_best_of([3.0, 1.0, 2.0], 2) == pytest.approx((3 + 3 + 2) / 3)
    assert expected_best_of([[3.0, 1.0, 2.0]], 2).shape == (1,)


# ---------------------------------------------------------------------------------------
# bon_select


def test_bon_select_returns_best_first_and_lower_index_wins_ties():
    np.testing.assert_array_equal(bon_select([1.0, 3.0, 3.0, 0.0]), [1])
    np.testing.assert_array_equal(bon_select([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 5.0]], 3), [[1, 2, 0], [3, 0, 1]])


def test_bon_select_full_ranking_agrees_with_strict_order():
    rewards = np.random.default_rng(15).integers(0, 4, size=(5, 10)).astype(float)
    ranking = bon_select(rewards, 10)
    np.testing.assert_array_equal(ranking, np.argsort(-strict_order(rewards), axis=1))


def test_bon_select_rejects_n_above_candidate_count():
    with pytest.raises(ValueError, match="cannot select"):
        bon_select([1.0, 2.0], 3)


def test_bon_select_on_draws_listed_by_outcome_index_samples_bon_probabilities():
    # The choice under ≺ depends only on the multiset drawn; listing the draws in outcome
    # order makes bon_select's position tie-break the outcome-index tie-break.
    rng = np.random.default_rng(16)
    probs = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    rewards = np.array([2.0, 1.0, 2.0, 1.0, 0.0])
    n, samples = 3, 200_000
    draws = np.sort(rng.choice(5, size=(samples, n), p=probs), axis=1)
    chosen = np.take_along_axis(draws, bon_select(rewards[draws], 1), axis=1)[:, 0]
    _assert_within_standard_errors(np.bincount(chosen, minlength=5), bon_probabilities(probs, rewards, n), samples)


def test_bon_select_in_draw_order_matches_bon_probabilities_per_reward_level():
    rng = np.random.default_rng(17)
    probs = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    rewards = np.array([2.0, 1.0, 2.0, 1.0, 0.0])
    n, samples = 3, 200_000
    draws = rng.choice(5, size=(samples, n), p=probs)
    chosen = np.take_along_axis(draws, bon_select(rewards[draws], 1), axis=1)[:, 0]
    levels = np.unique(rewards)
    bon = bon_probabilities(probs, rewards, n)
    per_level = np.array([bon[rewards == level].sum() for level in levels])
    counts = np.array([np.count_nonzero(rewards[chosen] == level) for level in levels])
    _assert_within_standard_errors(counts, per_level, samples)


# ---------------------------------------------------------------------------------------
# BoNBoN gap (docs/math.md §5)


def test_bonbon_gap_values():
    np.testing.assert_allclose(bonbon_gap(np.array([1, 2, 3, 4, 8])), [0.0, 1.0, 3.0, 5.5, 7 * sum(1 / k for k in range(1, 8))])


def test_bonbon_gap_is_n_minus_one_times_uniform_log_gap_in_simulation():
    rng = np.random.default_rng(18)
    samples = 200_000
    for n in (2, 4, 8):
        u = rng.random(size=(samples, n))
        log_gap = np.log(u.max(axis=1)) - np.log(u.min(axis=1))
        se = log_gap.std() / np.sqrt(samples)
        harmonic = sum(1 / k for k in range(1, n))
        # E[log U_max] − E[log U_min] for n uniforms is H_{n−1}, without the factor n − 1.
        assert abs(log_gap.mean() - harmonic) <= 4 * se
        # The log-ratio of π_BoN to π_ref is log n + (n − 1) log F, so its gap has the factor.
        assert abs((n - 1) * log_gap.mean() - bonbon_gap(n)) <= 4 * (n - 1) * se


def test_bonbon_gap_is_the_expected_log_ratio_gap_of_exact_best_of_n():
    # Uniform over K distinct rewards: best and worst of n reference draws have exact laws,
    # and the log-ratio comes from bon_probabilities.
    k = 100_000
    probs = np.full(k, 1.0 / k)
    rewards = np.arange(k, dtype=float)
    cdf = np.arange(k + 1) / k
    for n in (2, 4, 8):
        log_ratio = np.log(bon_probabilities(probs, rewards, n)) - np.log(probs)
        p_max = cdf[1:] ** n - cdf[:-1] ** n
        p_min = (1 - cdf[:-1]) ** n - (1 - cdf[1:]) ** n
        gap = p_max @ log_ratio - p_min @ log_ratio
        assert gap == pytest.approx(bonbon_gap(n), abs=1e-3)
