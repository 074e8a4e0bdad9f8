"""The exact test bed is exact, and the BOND paper's qualitative claims on it (docs/math.md §7).

Short, seeded versions of ``distill.testbed_figures``. Claims tested: Figure 2 (Jeffreys β = 0.5
gets low forward AND backward KL to π_BoN; β = 0 lags in log-quantile), Figure 4 (iterative BOND
keeps improving after fixed-N BOND saturates, tracking Best-of-2^j), Figure 7 (J-BOND's reward rises
with a smooth KL, and beats the REINFORCE runs beyond the KL that the most regularised one
settles at). Where the paper's claim does not hold on this test bed the test says so and checks
what does hold instead (``test_converged_reinforce_beats_jbond_at_its_kl``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch

from bonbench.bon import bon_kl_exact, bon_probabilities, quantiles_exact
from distill.testbed import (
    MLPPolicy,
    SequenceSpace,
    TabularPolicy,
    TestbedConfig,
    front_gap,
    kl,
    make_testbed,
    train,
)

torch.set_num_threads(1)


@lru_cache(maxsize=None)
def bed(policy: str = "mlp"):
    return make_testbed(policy, seed=0)


@lru_cache(maxsize=None)
def run(policy: str = "mlp", **overrides) -> dict[str, np.ndarray]:
    history = train(bed(policy), TestbedConfig(**overrides))
    return {key: np.asarray(values) for key, values in history.items()}


def final(history: dict[str, np.ndarray], key: str, last: int = 5) -> float:
    return float(history[key][-last:].mean())


def seed_mean(key: str, seeds=(0, 1), **overrides) -> float:
    return float(np.mean([final(run(seed=s, **overrides), key) for s in seeds]))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("policy", ["mlp", "tabular"])
def test_policies_give_a_normalised_autoregressive_distribution(policy):
    space = SequenceSpace(vocab=3, length=3)
    g = torch.Generator().manual_seed(0)
    model = MLPPolicy(space, 4, 2.0, g) if policy == "mlp" else TabularPolicy(space, 2.0, g)
    log_probs = model.log_probs().detach()
    assert log_probs.shape == (27,)
    assert float(log_probs.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    # chain rule by hand for one sequence: prefix logits of (), (y0,), (y0, y1)
    with torch.no_grad():
        if policy == "tabular":
            logits = model.logits.detach()
        else:
            hidden = torch.tanh(space.prefix_features @ model.w_in + model.b_in)
            logits = hidden @ model.w_out + model.b_out
    y = (2, 0, 1)
    rows = [0, 1 + y[0], 1 + 3 + 3 * y[0] + y[1]]
    by_hand = sum(torch.log_softmax(logits[r], 0)[t] for r, t in zip(rows, y))
    index = 9 * y[0] + 3 * y[1] + y[2]
    assert float(log_probs[index]) == pytest.approx(float(by_hand), abs=1e-12)


def test_exact_quantities_agree_with_bonbench_and_brute_force():
    b = bed("mlp")
    ref = b.ref_log_probs.exp().numpy()
    assert b.space.size == 256 and b.ref_log_probs.dtype == torch.float64
    assert len(np.unique(b.rewards.numpy())) < 20  # a reward with many ties
    bon = bon_probabilities(ref, b.rewards.numpy(), 8)
    np.testing.assert_allclose(b.bon_log_probs(8).exp().numpy(), bon, rtol=1e-10)
    # order keys follow the strict order: their p≤ equals bonbench's exact p≤
    _, p_leq = quantiles_exact(ref, b.rewards.numpy())
    keys = b.order_keys.numpy()
    by_keys = np.array([ref[keys <= key].sum() for key in keys])
    np.testing.assert_allclose(by_keys, p_leq, atol=1e-12)
    stats = b.evaluate(b.ref_log_probs, n=8)
    assert stats["kl_ref"] == pytest.approx(0.0, abs=1e-12)
    assert stats["forward_kl"] == pytest.approx(bon_kl_exact(ref, b.rewards.numpy(), 8), rel=1e-9)
    assert stats["log_quantile"] == pytest.approx(float(ref @ np.log(p_leq)), rel=1e-12)


def test_sampling_is_exact_and_training_is_seeded():
    b = bed("mlp")
    counts = torch.bincount(
        torch.multinomial(b.ref_log_probs.exp(), 200_000, replacement=True), minlength=256
    ).double()
    expected = 200_000 * b.ref_log_probs.exp()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 5 * math.sqrt(2 * 255)  # 5 sigma for 255 degrees of freedom
    first = train(b, TestbedConfig(method="jbond", steps=20, eval_every=5, seed=3))
    again = train(b, TestbedConfig(method="jbond", steps=20, eval_every=5, seed=3))
    assert first == again and first["kl_ref"][-1] > 0.0


def test_mc_quantile_target_is_a_little_off_best_of_n():
    b = bed("tabular")
    target = b.mc_backward_target(8, k=16)
    off = float(kl(target, b.bon_log_probs(8)))
    assert 0.005 < off < 0.05  # docs/math.md §2: about 0.02 at N = 8


@pytest.mark.parametrize("method", ["bond", "iterative_bond", "jbond", "rloo", "bonbon", "vbon", "bon_sft"])
def test_every_method_trains_and_moves_towards_better_samples(method):
    history = run("mlp", method=method, steps=150, n=4, anchor_period=50, seed=0)
    assert history["log_quantile"][-1] > history["log_quantile"][0] + 0.3
    assert np.all(np.isfinite(history["kl_ref"]))


# ----------------------------------------------------------------------------- Figure 2

FIG2 = dict(method="bond", n=8, steps=600, lr=0.02)


def test_tabular_policy_every_beta_reaches_best_of_n():
    # Fully expressive: all three β end near π_BoN (β = 1 only as near as its MC-quantile target,
    # docs/math.md §2), while the MLP's specialists miss by 0.2-0.3 on their weak side.
    for beta in (0.0, 0.5, 1.0):
        h = run("tabular", beta=beta, seed=0, **FIG2)
        assert final(h, "forward_kl") < 0.08 and final(h, "backward_kl") < 0.08


def test_jeffreys_lowers_both_kls_well_below_their_start():
    h = run("mlp", beta=0.5, seed=0, **FIG2)
    assert final(h, "forward_kl") < 0.25 * h["forward_kl"][0]
    assert final(h, "backward_kl") < 0.1 * h["backward_kl"][0]


def test_jeffreys_gets_the_forward_kl_of_sft_and_the_backward_kl_of_vbon():
    fwd = {beta: seed_mean("forward_kl", beta=beta, **FIG2) for beta in (0.0, 0.5, 1.0)}
    bwd = {beta: seed_mean("backward_kl", beta=beta, **FIG2) for beta in (0.0, 0.5, 1.0)}
    # The MLP cannot represent π_BoN: the specialists miss on the other divergence.
    assert fwd[1.0] > 1.25 * fwd[0.5]  # backward-only leaves forward KL high
    assert bwd[0.0] > 1.25 * bwd[0.5]  # forward-only leaves backward KL high
    # β = 0.5 is close to the better specialist on each (measured: 1.0-1.15x, not below it)
    assert fwd[0.5] < 1.25 * fwd[0.0]
    assert bwd[0.5] < 1.15 * bwd[1.0]


def test_forward_only_lags_in_log_quantile():
    quantile = {beta: seed_mean("log_quantile", beta=beta, **FIG2) for beta in (0.0, 0.5, 1.0)}
    assert quantile[1.0] > quantile[0.0] + 0.008
    assert quantile[0.5] > quantile[0.0] + 0.008


# ----------------------------------------------------------------------------- Figure 4


def test_iterative_bond_keeps_improving_after_fixed_n_bond_saturates():
    common = dict(beta=0.5, steps=700, eval_every=50, lr=0.02, seed=0)
    fixed = run("mlp", method="bond", n=4, **common)
    iterative = run("mlp", method="iterative_bond", n=2, anchor_period=100, **common)
    at = {step: i for i, step in enumerate(fixed["step"])}
    # BOND N = 4 has saturated by step 300: it moves < 0.04 from there on ...
    assert abs(fixed["log_quantile"][at[700]] - fixed["log_quantile"][at[300]]) < 0.04
    # ... while iterative BOND n = 2 keeps rising, well past it
    assert iterative["log_quantile"][at[700]] > iterative["log_quantile"][at[300]] + 0.1
    assert iterative["log_quantile"][at[700]] > fixed["log_quantile"][at[700]] + 0.15


def test_iterative_bond_tracks_best_of_2_to_the_number_of_anchor_updates():
    b = bed("mlp")
    h = run("mlp", method="iterative_bond", n=2, anchor_period=100, beta=0.5, steps=700,
            eval_every=50, lr=0.02, seed=0)
    targets = {j: b.evaluate(b.bon_log_probs(2**j))["log_quantile"] for j in range(1, 9)}
    for phase in range(4):  # end of phase j: j + 1 anchors distilled, target Best-of-2^(j+1)
        reached = h["log_quantile"][list(h["step"]).index(100 * (phase + 1))]
        nearest = min(targets, key=lambda j: abs(math.log(-reached) - math.log(-targets[j])))
        assert nearest == phase + 1, (phase, reached, targets)
        assert reached < targets[phase + 1]  # a little behind its target, never ahead


# ----------------------------------------------------------------------------- Figure 7

FIG7 = dict(steps=800, lr=0.005, eval_every=5, seed=0)
BETAS_RL = (0.001, 0.01, 0.1, 1.0)


def jbond_run():
    return run("mlp", method="jbond", beta=0.5, eta=0.02, gamma=0.0, **FIG7)


def reinforce_points(betas=BETAS_RL):
    runs = [run("mlp", method="rloo", beta_rl=b, **FIG7) for b in betas]
    return np.concatenate([h["kl_ref"] for h in runs]), np.concatenate([h["reward"] for h in runs])


def test_jbond_raises_reward_with_smoothly_growing_kl():
    h = jbond_run()
    assert h["reward"][-1] > h["reward"][0] + 2.5
    kl_ref = h["kl_ref"]
    steps = np.diff(kl_ref)
    assert steps.min() > -0.05  # monotone up to sampling noise
    assert steps.max() < 0.06 * kl_ref[-1]  # no jumps: < 6% of the final KL in 5 steps
    reinforce = run("mlp", method="rloo", beta_rl=0.001, **FIG7)["kl_ref"]
    assert np.diff(reinforce).max() > 3 * steps.max()  # unlike weakly regularised REINFORCE


def test_jbond_is_above_the_reinforce_runs_beyond_the_kl_of_the_most_regularised_one():
    h = jbond_run()
    front_kl, front_reward = reinforce_points()
    settled_kl = final(run("mlp", method="rloo", beta_rl=1.0, **FIG7), "kl_ref", last=40)
    beyond = (h["kl_ref"] > settled_kl + 0.3) & (h["kl_ref"] < h["kl_ref"].max() - 0.1)
    assert beyond.sum() >= 10
    gaps = front_gap(h["kl_ref"][beyond], h["reward"][beyond], front_kl, front_reward)
    assert gaps.min() > 0.0
    assert np.median(gaps) > 0.2


def test_converged_reinforce_beats_jbond_at_its_kl():
    """The paper's claim fails below the KL where REINFORCE with β_RL = 1 settles.

    REINFORCE with β_RL = 1 converges to π_ref · exp(r) / Z, the exact maximiser of
    E[r] - KL(π || π_ref): a point ON the reward/KL Pareto front. J-BOND distils quantile-based
    (Best-of-2) tilts, which lie below that front for a reward with few, unevenly likely levels.
    """
    b = bed("mlp")
    h_rl = run("mlp", method="rloo", beta_rl=1.0, **FIG7)
    optimum = b.evaluate(b.tilted_log_probs(1.0))
    objective = final(h_rl, "reward", 40) - final(h_rl, "kl_ref", 40)
    assert objective > optimum["reward"] - optimum["kl_ref"] - 0.01
    h = jbond_run()
    gaps = front_gap(h["kl_ref"], h["reward"], *reinforce_points())
    below = (h["kl_ref"] > 0.7) & (h["kl_ref"] < final(h_rl, "kl_ref", 40))
    assert below.sum() >= 5 and gaps[below].max() < -0.1  # measured: -0.17 to -0.24
