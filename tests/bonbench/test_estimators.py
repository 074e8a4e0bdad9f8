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
    Variants,
    bon_groups,
    bon_pairs,
    duplicate_rate,
    early_rejection_served,
    log_quantile_theory,
    mean_se,
    prompt_stats,
    rule_label,
    rule_served,
    sampled_prompt_row,
    served_prompt_row,
    summarize,
)
from bonbench.rejection import EarlyRejection
from bonbench.samplestore import partial_column
from bonbench.seeds import derive_seed
from bonbench.select import Argmax, Candidates, Majority, Regularized, SelectionError, SelfCertainty, Soft, parse_rule


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


# ---------------------------------------------------------------------------------------
# Best-of-N variants: selection rules and early rejection on the disjoint groups


def variant_pool(rng, k: int, m: int, checkpoints=(4, 8), prompt_index: int = 0) -> pd.DataFrame:
    """A prompt's pool whose candidates have varied lengths (some end before a checkpoint),
    self-certainties and partial rewards (NaN where a candidate is not longer than the checkpoint)."""
    frame = fake_samples({"reference": rng.random(k), "candidate": rng.random(m)}, prompt_index)
    cand = (frame["role"] == "candidate").to_numpy()
    frame.loc[cand, "num_tokens"] = rng.integers(1, 13, size=m)
    frame["self_certainty"] = rng.random(len(frame))
    frame["sample_seconds"] = 0.01 * frame["num_tokens"]
    frame["partial_seconds"] = np.where(cand, 0.003, np.nan)
    for c in checkpoints:
        frame[partial_column(c)] = np.where(cand & (frame["num_tokens"] > c), rng.random(len(frame)), np.nan)
    return frame


def _split(pool):
    ref = pool[pool["role"] == "reference"].sort_values("sample_index")
    cand = pool[pool["role"] == "candidate"].sort_values("sample_index").reset_index(drop=True)
    return ref["reward"].to_numpy(), cand


def test_argmax_rule_rows_are_best_of_n_on_the_disjoint_groups():
    rng = np.random.default_rng(4)
    pool = variant_pool(rng, 6, 9)
    ref, cand = _split(pool)
    rewards, lengths = cand["reward"].to_numpy(), cand["num_tokens"].to_numpy()
    rows, pairs = prompt_stats(pool, [1, 2, 3, 4], Variants(rules=[Argmax()]))
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["BoN-1", "BoN-2", "BoN-3", "BoN-4", "BoN-2:argmax", "BoN-3:argmax", "BoN-4:argmax"]
    for n in (2, 3, 4):
        row, plain = by_method[f"BoN-{n}:argmax"], by_method[f"BoN-{n}"]
        groups = [range(g * n, (g + 1) * n) for g in range(min(9 // n, 6))]
        best = [max(rewards[list(g)]) for g in groups]
        for mine, theirs in zip(pairs[f"BoN-{n}:argmax"], pairs[f"BoN-{n}"]):
            assert mine.tolist() == theirs.tolist()  # the same disjoint comparisons as BoN-N
        assert row["win_rate"] == plain["win_rate"] and row["win_pairs"] == plain["win_pairs"] == len(groups)
        assert row["reward"] == pytest.approx(np.mean(best))
        assert row["log_quantile"] == pytest.approx(np.mean([np.log((np.sum(ref <= b) + 1) / 7) for b in best]))
        assert row["win_rate_all"] == pytest.approx(np.mean([np.mean((ref < b) + 0.5 * (ref == b)) for b in best]))
        assert row["tokens_per_request"] == pytest.approx(np.mean([lengths[list(g)].sum() for g in groups]))
        assert row["seconds_per_request"] == pytest.approx(np.mean([0.01 * lengths[list(g)].sum() + 0.01 * n
                                                                    for g in groups]))
        assert math.isnan(row["kl_measured"]) and row["n"] == n


def test_early_rejection_that_keeps_everything_is_the_argmax_plus_the_partial_scorings():
    rng = np.random.default_rng(5)
    frames = [variant_pool(rng, 8, 8, prompt_index=i) for i in range(20)]
    variants = Variants(rules=[Argmax()], early_rejection=[EarlyRejection((4, 8), 1.0), EarlyRejection((4,), 0.5)])
    per_prompt, summary = summarize(pd.concat(frames, ignore_index=True), [1, 2, 4, 8], 8, variants=variants)
    rows = per_prompt.set_index(["prompt_index", "method"])
    for i, pool in enumerate(frames):
        _, cand = _split(pool)
        lengths = cand["num_tokens"].to_numpy()
        for n in (2, 4, 8):
            argmax, keep_all = rows.loc[(i, f"BoN-{n}:argmax")], rows.loc[(i, f"ER-{n}:4,8:1")]
            pd.testing.assert_series_equal(keep_all.drop(["seconds_per_request"]),
                                           argmax.drop(["seconds_per_request"]), check_names=False)
            # every candidate is scored at each checkpoint it runs past, and none is rejected
            scorings = sum(np.sum(lengths[: 8 // n * n] > c) for c in (4, 8)) / (8 // n)
            assert keep_all["seconds_per_request"] == pytest.approx(argmax["seconds_per_request"] + 0.003 * scorings)
            assert rows.loc[(i, f"ER-{n}:4:0.5"), "tokens_per_request"] <= argmax["tokens_per_request"]
    summary = summary.set_index("method")
    assert summary.loc["ER-8:4:0.5", "tokens_per_request"] < summary.loc["BoN-8:argmax", "tokens_per_request"]
    for method in ("BoN-2:argmax", "ER-2:4,8:1", "ER-8:4:0.5"):  # the theory is plain Best-of-N's alone
        row = summary.loc[method]
        assert all(math.isnan(row[c]) for c in ("log_quantile_theory", "win_rate_theory", "kl_analytic"))
        assert row["policy_path"] == "" and row["win_pairs"] == 20 * (8 // row["n"])


def test_early_rejection_on_a_hand_made_pool():
    """Four candidates in one group; the best final reward (candidate 0) is rejected on its partial
    score, so early rejection serves candidate 3 (one checkpoint) or 2 (two checkpoints)."""
    cand = pd.DataFrame({"role": "candidate", "sample_index": range(4), "text": list("abcd"),
                         "num_tokens": [10, 3, 10, 10], "reward": [1.0, 0.2, 0.3, 0.7],
                         "sample_seconds": [0.10, 0.03, 0.10, 0.10], "reward_seconds": 0.1, "partial_seconds": 0.5,
                         partial_column(2): [0.4, 0.8, 0.6, 0.2], partial_column(5): [0.1, np.nan, 0.9, 0.5]})
    groups = bon_groups(4, 1, 4)
    # at 5: candidates 0, 2, 3 run (1 has ended), ⌈0.5 · 3⌉ = 2 go on: 2 and 3; the best of 1, 2, 3 is 3
    served = early_rejection_served(EarlyRejection((5,), 0.5), cand, groups)
    assert served.chosen.tolist() == [3] and served.tokens.tolist() == [5 + 3 + 10 + 10]
    # time: tokens drawn at 0.01 s each, 3 partial scorings, the reward of the 3 that ran to their end
    assert served.seconds[0] == pytest.approx(0.28 + 3 * 0.5 + 3 * 0.1)
    # at 2: all four run, 1 and 2 go on; at 5 only 2 runs and stays; the best of 1 and 2 is 2
    served = early_rejection_served(EarlyRejection((2, 5), 0.5), cand, groups)
    assert served.chosen.tolist() == [2] and served.tokens.tolist() == [2 + 3 + 10 + 2]
    assert served.seconds[0] == pytest.approx(0.17 + 5 * 0.5 + 2 * 0.1)
    row, (mine, theirs) = served_prompt_row("ER-4:2,5:0.5", 4, served, cand["reward"], [0.5])
    assert mine.tolist() == [0.3] and theirs.tolist() == [0.5] and row["win_rate"] == 0.0
    assert row["log_quantile"] == pytest.approx(np.log(1 / 2)) and row["tokens_per_request"] == 17
    with pytest.raises(ValueError, match="reads partial_reward_3"):
        early_rejection_served(EarlyRejection((3,), 0.5), cand, groups)


def test_rules_read_their_own_columns_and_draw_from_the_groups_seeded_streams():
    rng = np.random.default_rng(6)
    pool = variant_pool(rng, 4, 8)
    pool.loc[pool["role"] == "candidate", "text"] = ["Yes.", "no", "maybe", "No!", "no", "maybe", "Maybe", "no."]
    _, cand = _split(pool)
    groups = bon_groups(8, 4, 4)
    rewards, lengths, certainty = (cand[c].to_numpy() for c in ("reward", "num_tokens", "self_certainty"))
    no_seeds = [0, 0]
    served = rule_served(SelfCertainty(), cand, groups, no_seeds)
    assert served.chosen.tolist() == [g[np.argmax(certainty[g])] for g in groups]
    assert served.seconds.tolist() == pytest.approx([0.01 * lengths[g].sum() for g in groups])  # no reward time
    # "no" twice in group 1; in group 2 "no" and "maybe" tie, and the answer drawn first wins
    assert rule_served(Majority(), cand, groups, no_seeds).chosen.tolist() == [1, 4]
    served = rule_served(Regularized(beta=0.05), cand, groups, no_seeds)
    assert served.chosen.tolist() == [g[np.argmax(rewards[g] - 0.05 * lengths[g])] for g in groups]
    assert served.seconds.tolist() == pytest.approx([0.01 * lengths[g].sum() + 0.01 * 4 for g in groups])
    # soft: each group's draw is the rule's own, from derive_seed(run seed, prompt, N, group)
    hot = Soft(temperature=10.0)
    rows, _ = prompt_stats(pool, [4], Variants(rules=[hot], seed=7))
    seeds = [derive_seed(7, 0, 4, g) for g in range(2)]
    expected = [g[hot.choose(Candidates([""] * 4, lengths[g], rewards=rewards[g]), 1,
                             np.random.default_rng(s)).chosen[0]] for g, s in zip(groups, seeds)]
    assert rule_served(hot, cand, groups, seeds).chosen.tolist() == expected
    assert rows[-1]["reward"] == pytest.approx(rewards[expected].mean())
    cold = rule_served(Soft(temperature=1e-6), cand, groups, seeds)
    assert cold.chosen.tolist() == [g[np.argmax(rewards[g])] for g in groups]
    # a pool stored without self-certainty (an older run) cannot feed the rule that reads it
    with pytest.raises(SelectionError, match="self-certainty"):
        rule_served(SelfCertainty(), cand.assign(self_certainty=np.nan), groups, no_seeds)
    assert rule_served(Argmax(), cand.assign(self_certainty=np.nan), groups, no_seeds).chosen.tolist() == [
        g[np.argmax(rewards[g])] for g in groups]


def test_rule_labels_name_the_rule_and_its_parameters():
    assert rule_label(Argmax()) == "argmax"
    assert rule_label(parse_rule("soft:temperature=0.1")) == "soft(temperature=0.1)"
    assert rule_label(parse_rule("regularized:beta=0.01,penalty=length")) == "regularized(beta=0.01,penalty=length)"
    assert EarlyRejection((8, 16), 0.25).label == "8,16:0.25"
