"""``bonbench/estimators.py``: each estimator against brute force over all subsets, or against
the distribution-free theory of Best-of-N under continuous rewards."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from bonbench import bon
from bonbench.estimators import (
    bon_pairs,
    duplicate_rate,
    log_quantile_theory,
    mean_se,
    prompt_stats,
    sampled_prompt_row,
    summarize,
)


def fake_samples(rewards_by_role: dict[str, np.ndarray], prompt_index: int = 0, policy: str = "") -> pd.DataFrame:
    """A prompt's rows of a samples table with the given rewards, in draw order per role."""
    rows = []
    for role, rewards in rewards_by_role.items():
        for j, r in enumerate(rewards):
            rows.append({"prompt_index": prompt_index, "prompt_id": f"p{prompt_index}", "role": role,
                         "policy": policy if role == "policy" else "", "sample_index": j,
                         "text": f"{role}-{j}-{r}", "num_tokens": 10 + j, "finish_reason": "stop",
                         "logprob": -5.0 - j, "ref_logprob": -5.5 - j, "sample_seconds": 0.1,
                         "reward": float(r), "reward_seconds": 0.01})
    return pd.DataFrame(rows)


def test_log_quantile_theory_matches_simulation():
    rng = np.random.default_rng(0)
    k, draws = 16, 400_000
    for n in (1, 2, 8):
        quantile = rng.random((draws, n)).max(axis=1)  # the BoN sample's p≤ for continuous rewards
        counts = rng.binomial(k, quantile)
        values = np.log((counts + 1) / (k + 1))
        assert abs(values.mean() - log_quantile_theory(n, k)) < 4 * values.std() / math.sqrt(draws)
    # k -> infinity: E[log p≤] of the largest of n uniforms is -1/n
    assert log_quantile_theory(4, 20_000) == pytest.approx(-0.25, abs=1e-3)


def test_bon_pairs_take_disjoint_groups_in_draw_order():
    cand, ref = [1.0, 5.0, 2.0, 3.0, 9.0, 0.0, 4.0], [10.0, 11.0, 12.0]
    best, theirs = bon_pairs(cand, ref, 2)
    assert best.tolist() == [5.0, 3.0, 9.0] and theirs.tolist() == [10.0, 11.0, 12.0]
    best, theirs = bon_pairs(cand, ref[:1], 1)  # never more groups than references
    assert best.tolist() == [1.0] and theirs.tolist() == [10.0]


def test_duplicate_rate_counts_identical_pairs():
    assert duplicate_rate(["a", "a", "b"]) == pytest.approx(1 / 3)
    assert duplicate_rate(["a", "b", "c", "d"]) == 0
    assert math.isnan(duplicate_rate(["a"]))
    texts = ["x", "y", "x", "z", "x", "y"]
    pairs = list(itertools.combinations(texts, 2))
    assert duplicate_rate(texts) == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))


def test_mean_se_leaves_nans_out_and_matches_the_textbook_formula():
    values = np.array([1.0, np.nan, 2.0, 4.0])
    mean, se = mean_se(values)
    assert mean == pytest.approx(7 / 3)
    assert se == pytest.approx(np.sqrt(np.var([1.0, 2.0, 4.0], ddof=1) / 3))
    assert math.isnan(mean_se([3.0])[1]) and mean_se([3.0])[0] == 3.0
    assert all(math.isnan(v) for v in mean_se([np.nan]))


def test_prompt_stats_equal_brute_force_over_all_subsets():
    rng = np.random.default_rng(1)
    ref, cand, pol = rng.normal(size=6), rng.normal(size=5), rng.normal(size=3)
    cand[3] = ref[2]  # a tie between a candidate and a reference
    rows, pairs = prompt_stats(fake_samples({"reference": ref, "candidate": cand, "policy": pol}, policy="pi"),
                               [1, 2, 3])
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["BoN-1", "BoN-2", "BoN-3", "policy:pi"]
    pool = np.concatenate([ref, cand])
    for n in (1, 2, 3):
        row = by_method[f"BoN-{n}"]
        subsets = list(itertools.combinations(range(len(cand)), n))
        best = [max(cand[list(s)]) for s in subsets]
        log_q = [np.log((np.sum(ref <= b) + 1) / (len(ref) + 1)) for b in best]
        win_all = [np.mean((ref < b) + 0.5 * (ref == b)) for b in best]
        reward = np.mean([max(pool[list(s)]) for s in itertools.combinations(range(len(pool)), n)])
        assert row["log_quantile"] == pytest.approx(np.mean(log_q))
        assert row["win_rate_all"] == pytest.approx(np.mean(win_all))
        assert row["reward"] == pytest.approx(reward)
        assert row["win_pairs"] == len(cand) // n
        tokens = [10 + j for j in range(len(ref))] + [10 + j for j in range(len(cand))]
        assert row["tokens_per_request"] == pytest.approx(n * np.mean(tokens))
        assert row["prompt_index"] == 0 and row["prompt_id"] == "p0"
    policy = by_method["policy:pi"]
    assert policy["reward"] == pytest.approx(pol.mean())
    assert policy["kl_measured"] == pytest.approx(0.5)
    assert policy["log_quantile"] == pytest.approx(np.mean([np.log((np.sum(ref <= p) + 1) / 7) for p in pol]))
    assert pairs["policy:pi"][1].tolist() == ref[:3].tolist()  # policy sample i faces reference i


def test_sampled_row_reads_samples_in_draw_order_and_never_pairs_beyond_the_references():
    ref = np.array([0.1, 0.7, 0.9])
    shuffled = fake_samples({"policy": np.array([0.2, 0.6, 1.0, 0.0, 0.3])}).iloc[::-1]
    row, (mine, theirs) = sampled_prompt_row("m", shuffled, ref)
    assert mine.tolist() == [0.2, 0.6, 1.0] and theirs.tolist() == ref.tolist()
    assert row["win_pairs"] == 3 and row["win_rate"] == pytest.approx(2 / 3)
    assert row["method"] == "m" and row["n"] == 1


def test_bon_rank_metrics_agree_with_theory_on_continuous_rewards():
    """With continuous rewards every BoN rank metric is distribution-free: the pipeline must
    reproduce N/(N+1) and the log-quantile expectation within its own error bars."""
    rng = np.random.default_rng(2)
    k, pool, ns = 16, 8, [1, 2, 4, 8]
    frames = [fake_samples({"reference": rng.random(k), "candidate": rng.random(pool)}, prompt_index=i)
              for i in range(600)]
    per_prompt, summary = summarize(pd.concat(frames, ignore_index=True), ns, k)
    assert len(per_prompt) == 600 * len(ns)
    for row in summary.itertuples():
        assert row.win_low <= row.win_rate_theory <= row.win_high
        assert abs(row.log_quantile - row.log_quantile_theory) < 4 * row.log_quantile_se
        assert abs(row.win_rate_all - row.win_rate_theory) < 0.02
        assert row.kl_analytic == pytest.approx(bon.bon_kl(row.n)) and math.isnan(row.kl_measured)
    assert summary["reward"].is_monotonic_increasing


def test_summary_pools_win_pairs_across_prompts_and_names_policy_paths():
    rng = np.random.default_rng(3)
    frames = [fake_samples({"reference": rng.random(4), "candidate": rng.random(2), "policy": rng.random(3)},
                           prompt_index=i, policy="pi") for i in range(3)]
    per_prompt, summary = summarize(pd.concat(frames, ignore_index=True), [1, 2], 4, {"pi": "runs/pi"})
    rows = summary.set_index("method")
    assert rows["win_pairs"].to_dict() == {"BoN-1": 6, "BoN-2": 3, "policy:pi": 9}
    assert rows["policy_path"].to_dict() == {"BoN-1": "", "BoN-2": "", "policy:pi": "runs/pi"}
    policy = per_prompt[per_prompt["method"] == "policy:pi"]
    assert rows.loc["policy:pi", "reward"] == pytest.approx(policy["reward"].mean())
    assert rows.loc["policy:pi", "reward_se"] == pytest.approx(policy["reward"].std(ddof=1) / math.sqrt(3))
    assert math.isnan(rows.loc["policy:pi", "win_rate_theory"])
