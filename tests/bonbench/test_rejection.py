"""bonbench.rejection: the early-rejection rule, its replay on whole candidates, the tokens-saved estimate."""

import math

import numpy as np
import pytest

from bonbench.rejection import (EarlyRejection, estimated_tokens_saved, parse_early_rejection, rejected,
                                simulate)


def test_parse_and_label_round_trip():
    plan = parse_early_rejection("16,32:0.5")
    assert plan == EarlyRejection((16, 32), 0.5)
    assert parse_early_rejection(plan.label) == plan


@pytest.mark.parametrize("spec", ["16,32", "16,x:0.5", "32,16:0.5", "0:0.5", "16:0", "16:1.5", ":0.5"])
def test_bad_specs_say_what_is_wrong(spec):
    with pytest.raises(ValueError, match="checkpoint|keep|CHECKPOINTS"):
        parse_early_rejection(spec)


@pytest.mark.parametrize("keep,running,at_least,expected", [
    (0.5, 8, 1, 4), (0.5, 7, 1, 4), (0.25, 3, 1, 1), (0.1, 4, 2, 2), (1.0, 5, 1, 5), (0.5, 1, 3, 1),
    (0.3, 10, 1, 3),  # 0.3 * 10 is 3.0000000000000004 in floats: still 3
])
def test_kept_is_the_ceiling_of_the_fraction_within_bounds(keep, running, at_least, expected):
    assert EarlyRejection((8,), keep).kept(running, at_least) == expected


def test_rejected_drops_the_lowest_with_ties_to_the_earlier_draw():
    plan = EarlyRejection((4,), 0.5)
    assert list(rejected([0.3, 0.1, 0.5, 0.2], plan)) == [1, 3]
    # equal scores: the later draw ranks lower and goes first
    assert list(rejected([0.2, 0.2, 0.2, 0.2], plan)) == [2, 3]
    assert list(rejected([0.9], plan)) == []
    with pytest.raises(ValueError, match="NaN"):
        rejected([0.1, float("nan")], plan)


def _brute_force(plan, partial, lengths, rewards, n):
    """The rule written out candidate by candidate, with Python sorts (no NumPy ordering helpers)."""
    alive = [True] * len(lengths)
    stopped = [0] * len(lengths)
    for j, c in enumerate(plan.checkpoints):
        running = [i for i in range(len(lengths)) if alive[i] and lengths[i] > c]
        keep = min(len(running), max(n, math.ceil(plan.keep * len(running) - 1e-9)))
        ranked = sorted(running, key=lambda i: (-partial[i][j], i))  # best first, earlier draw wins ties
        for i in ranked[keep:]:
            alive[i], stopped[i] = False, c
    survivors = sorted((i for i in range(len(lengths)) if alive[i]), key=lambda i: (-rewards[i], i))
    tokens = sum(stopped[i] if stopped[i] else lengths[i] for i in range(len(lengths)))
    return survivors[:n], tokens, stopped


@pytest.mark.parametrize("seed", range(40))
def test_simulate_matches_the_rule_written_out(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 12))
    checkpoints = tuple(sorted(rng.choice(np.arange(1, 20), size=int(rng.integers(1, 4)), replace=False).tolist()))
    plan = EarlyRejection(checkpoints, float(rng.choice([0.2, 0.25, 0.5, 0.75, 1.0])))
    lengths = rng.integers(1, 24, size=count)
    partial = rng.integers(0, 4, size=(count, len(checkpoints))).astype(float)  # small range: many ties
    rewards = rng.integers(0, 5, size=count).astype(float)
    n = int(rng.integers(1, count + 1))
    out = simulate(plan, partial, lengths, rewards, n)
    chosen, tokens, stopped = _brute_force(plan, partial.tolist(), lengths.tolist(), rewards.tolist(), n)
    assert out.chosen.tolist() == chosen
    assert out.tokens == tokens
    assert out.rejected_at.tolist() == stopped


def test_keep_one_is_best_of_n_and_finished_candidates_are_never_rejected():
    lengths = np.array([5, 30, 30, 30])
    partial = np.array([[np.nan], [0.1], [0.9], [0.5]])  # candidate 0 finished before the checkpoint
    rewards = np.array([0.0, 0.8, 0.2, 0.3])
    full = simulate(EarlyRejection((10,), 1.0), partial, lengths, rewards)
    assert full.chosen.tolist() == [1] and full.tokens == lengths.sum() and not full.rejected_at.any()
    cut = simulate(EarlyRejection((10,), 0.34), partial, lengths, rewards)
    # of the 3 running, ceil(0.34 * 3) = 2 go on (2 and 3); 1, the best in the end, was cut at 10 tokens
    assert cut.rejected_at.tolist() == [0, 10, 0, 0]
    assert cut.chosen.tolist() == [3]
    assert cut.tokens == 5 + 10 + 30 + 30


def test_simulate_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="partial scores of shape"):
        simulate(EarlyRejection((4,), 0.5), np.zeros((3, 2)), [5, 5, 5], [0, 0, 0])
    with pytest.raises(ValueError, match="cannot keep"):
        simulate(EarlyRejection((4,), 0.5), np.zeros((3, 1)), [5, 5, 5], [0, 0, 0], n=4)


def test_tokens_saved_estimate_by_hand():
    # two ran to their end (20 and 30 tokens: mean 25); rejected at 8 and at 24
    assert estimated_tokens_saved([20, 8, 30, 24], [0, 8, 0, 24]) == pytest.approx((25 - 8) + (25 - 24))
    assert estimated_tokens_saved([20, 30], [0, 0]) == 0.0


def test_tokens_saved_estimate_tracks_the_true_saving_when_length_does_not_predict_the_score():
    """Simulation: lengths independent of the partial scores, so the survivors' mean length is a fair
    stand-in for the rejected ones'; summed over many requests the estimate is within 2 % of the truth."""
    rng = np.random.default_rng(0)
    plan = EarlyRejection((8,), 0.25)
    estimate = truth = 0.0
    for _ in range(3000):
        lengths = rng.integers(10, 48, size=16)
        out = simulate(plan, rng.normal(size=(16, 1)), lengths, rng.normal(size=16))
        drawn = np.where(out.rejected_at > 0, out.rejected_at, lengths)
        estimate += estimated_tokens_saved(drawn, out.rejected_at)
        truth += float((lengths - drawn).sum())
    assert estimate == pytest.approx(truth, rel=0.02)
