"""Figures 2, 4 and 7 of the BOND paper, redone on the exact test bed (docs/math.md §7).

    python -m distill.testbed_figures                       # 3 seeds, ~3-6 minutes on one core
    python -m distill.testbed_figures --seeds 1 --out /tmp/testbed

Writes PNGs and a README.md with the final numbers to ``--out``. The problem: every sequence of
4 tokens over 4 (256 sequences), a reward with ties (count of token 1, +0.5 if the last token is
2), π_ref a 2-hidden-unit MLP policy at random init (``distill.testbed.make_testbed``). Every run
trains a copy of π_ref with sampled gradients only; the curves are exact (sums over all 256
sequences), averaged over training seeds on one fixed problem.

How it departs from the paper: one context instead of a prompt set; a "batch" is 32 replicas of
it; Adam at a fixed learning rate without warm-up; BOND's forward term averages all Best-of-N
subsets of the 16 reference samples instead of taking one (``distill.losses.best_of_n_weights``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from distill.testbed import TestBed, TestbedConfig, front_gap, make_testbed, train  # noqa: E402

BETAS = (0.0, 0.5, 1.0)
BETAS_RL = (0.001, 0.01, 0.1, 1.0)
FIG2 = dict(method="bond", steps=1000, lr=0.02, eval_every=20)
FIG4 = dict(beta=0.5, steps=1000, lr=0.02, eval_every=20, anchor_period=100)
FIG7 = dict(steps=800, lr=0.005, eval_every=10)


def runs(bed: TestBed, seeds: int, **config) -> dict[str, np.ndarray]:
    """Histories of ``seeds`` runs stacked: key -> ``(seeds, evaluations)``."""
    histories = [train(bed, TestbedConfig(seed=s, **config)) for s in range(seeds)]
    return {key: np.array([h[key] for h in histories]) for key in histories[0]}


def final(stacked: dict[str, np.ndarray], key: str, last: int = 5) -> tuple[float, float]:
    """Mean and standard deviation over seeds of the last ``last`` evaluations' average."""
    per_seed = stacked[key][:, -last:].mean(axis=1)
    return float(per_seed.mean()), float(per_seed.std())


def fmt(value: tuple[float, float]) -> str:
    return f"{value[0]:.3f} ± {value[1]:.3f}"


def curve(ax, stacked, key, label, x_key="step", **style):
    x, y = stacked[x_key].mean(0), stacked[key].mean(0)
    ax.plot(x, y, label=label, **style)
    if stacked[key].shape[0] > 1:
        ax.fill_between(x, stacked[key].min(0), stacked[key].max(0), alpha=0.15, color=ax.lines[-1].get_color())


# ----------------------------------------------------------------------------- Figure 2


def figure2(bed: TestBed, policy: str, seeds: int, out: Path, ns=(4, 8, 16)) -> tuple[list[str], list[str]]:
    finals: dict[tuple[int, float], dict[str, float]] = {}
    rows = ["| N | β | forward KL(π_BoN‖π) | backward KL(π‖π_BoN) | E log p≤ | KL(π‖π_ref) |", "|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(len(ns), 3, figsize=(13, 3.2 * len(ns)), squeeze=False)
    for row, n in enumerate(ns):
        for beta in BETAS:
            h = runs(bed, seeds, n=n, beta=beta, **FIG2)
            label = {0.0: "β=0 (BoN-SFT)", 0.5: "β=0.5 (Jeffreys)", 1.0: "β=1 (vBoN)"}[beta]
            for ax, key in zip(axes[row], ("backward_kl", "forward_kl", "log_quantile")):
                curve(ax, h, key, label)
            finals[n, beta] = {key: final(h, key)[0] for key in ("forward_kl", "backward_kl", "log_quantile")}
            rows.append(
                f"| {n} | {beta} | {fmt(final(h, 'forward_kl'))} | {fmt(final(h, 'backward_kl'))} "
                f"| {fmt(final(h, 'log_quantile'))} | {fmt(final(h, 'kl_ref'))} |"
            )
        target = bed.evaluate(bed.bon_log_probs(n))["log_quantile"]
        axes[row, 2].axhline(target, color="k", ls=":", lw=1, label=f"exact BoN_{n}")
        for ax, title in zip(axes[row], ("backward KL(π‖π_BoN)", "forward KL(π_BoN‖π)", "E_π log p≤")):
            ax.set_title(f"{title}, N={n}")
            ax.set_xlabel("step")
        axes[row, 0].set_yscale("log")
        axes[row, 1].set_yscale("log")
        axes[row, 2].set_ylim(target - 0.25, target + 0.05)
    axes[0, 2].legend(fontsize=8)
    fig.suptitle(f"BOND with the Jeffreys divergence, {policy} policy ({seeds} seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(out / f"fig2_jeffreys_{policy}.png", dpi=110)
    plt.close(fig)
    notes = []
    for n in ns:
        f = {beta: finals[n, beta] for beta in BETAS}
        notes.append(
            f"{policy}, N={n}: β=0.5 has {f[0.5]['forward_kl'] / f[0.0]['forward_kl']:.2f}x the forward KL of "
            f"β=0 and {f[0.5]['backward_kl'] / f[1.0]['backward_kl']:.2f}x the backward KL of β=1; β=1 has "
            f"{f[1.0]['forward_kl'] / f[0.5]['forward_kl']:.2f}x β=0.5's forward KL, β=0 has "
            f"{f[0.0]['backward_kl'] / f[0.5]['backward_kl']:.2f}x its backward KL; E log p≤ of β=1 minus β=0: "
            f"{f[1.0]['log_quantile'] - f[0.0]['log_quantile']:+.3f}, of β=0.5 minus β=0: "
            f"{f[0.5]['log_quantile'] - f[0.0]['log_quantile']:+.3f}."
        )
    return rows, notes


# ----------------------------------------------------------------------------- Figure 4


def figure4(bed: TestBed, seeds: int, out: Path) -> tuple[list[str], list[str]]:
    histories = {}
    rows = ["| method | E r | E log p≤ at step 300 | E log p≤ at the end | KL(π‖π_ref) |", "|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    configs = [(f"BOND, N={n}", dict(method="bond", n=n)) for n in (4, 8, 16)]
    configs += [(f"iterative BOND, n={n}", dict(method="iterative_bond", n=n)) for n in (2, 4)]
    for label, config in configs:
        h = histories[label] = runs(bed, seeds, **config, **FIG4)
        curve(axes[0], h, "reward", label)
        curve(axes[1], h, "log_quantile", label)
        axes[2].plot(h["kl_ref"].mean(0), h["log_quantile"].mean(0), label=label)
        mid = list(h["step"][0]).index(300)
        rows.append(
            f"| {label} | {fmt(final(h, 'reward'))} | {h['log_quantile'][:, mid].mean():.3f} "
            f"| {fmt(final(h, 'log_quantile'))} | {fmt(final(h, 'kl_ref'))} |"
        )
    exact = [bed.evaluate(bed.bon_log_probs(2**j)) for j in range(1, 8)]
    axes[2].plot([e["kl_ref"] for e in exact], [e["log_quantile"] for e in exact], "k:", marker="o", ms=3,
                 label="exact BoN_2^j, j=1..7")
    for j, e in enumerate(exact[:5], start=1):
        axes[1].axhline(e["log_quantile"], color="k", ls=":", lw=0.7)
        axes[1].text(FIG4["steps"], e["log_quantile"], f" BoN_{2**j}", fontsize=7, va="center")
    axes[0].set_title("E_π r")
    axes[1].set_title(f"E_π log p≤ (anchor update every {FIG4['anchor_period']} steps)")
    axes[1].set_ylim(-1.0, 0.02)
    axes[2].set_title("E_π log p≤ vs KL(π‖π_ref)")
    for ax in axes[:2]:
        ax.set_xlabel("step")
    axes[2].set_xlabel("KL(π‖π_ref)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Iterative BOND vs BOND, MLP policy, Jeffreys β=0.5 ({seeds} seeds)")
    fig.tight_layout()
    fig.savefig(out / "fig4_iterative_bond.png", dpi=110)
    plt.close(fig)
    steps = list(histories["BOND, N=4"]["step"][0])
    quantile = {label: h["log_quantile"].mean(0) for label, h in histories.items()}
    fixed, iterative = quantile["BOND, N=4"], quantile["iterative BOND, n=2"]
    period = FIG4["anchor_period"]
    phases = []
    for j in range(0, 6):  # after j anchor updates: distilling BoN_2 of BoN_2^j = BoN_2^(j+1)
        reached = iterative[steps.index(period * (j + 1))] if period * (j + 1) in steps else None
        if reached is not None:
            target = bed.evaluate(bed.bon_log_probs(2 ** (j + 1)))["log_quantile"]
            phases.append(f"{reached:.3f} vs BoN_{2 ** (j + 1)} {target:.3f}")
    notes = [
        f"BOND N=4: E log p≤ {fixed[steps.index(300)]:.3f} at step 300, {fixed[-1]:.3f} at the end "
        f"(exact BoN_4: {bed.evaluate(bed.bon_log_probs(4))['log_quantile']:.3f}); iterative BOND n=2: "
        f"{iterative[steps.index(300)]:.3f} at step 300, {iterative[-1]:.3f} at the end.",
        "Iterative BOND n=2 at the end of each anchor phase (policy vs its target): " + "; ".join(phases) + ".",
    ]
    return rows, notes


# ----------------------------------------------------------------------------- Figure 7


def optimum_reward(bed: TestBed, kl_ref: np.ndarray) -> np.ndarray:
    """The best reward any policy reaches at each KL from π_ref (the exponential tilt)."""
    tilted = [bed.evaluate(bed.tilted_log_probs(b)) for b in np.geomspace(0.05, 50.0, 400)]
    kls = np.array([t["kl_ref"] for t in tilted])[::-1]
    rewards = np.array([t["reward"] for t in tilted])[::-1]
    return np.interp(kl_ref, kls, rewards)


def figure7(bed: TestBed, seeds: int, out: Path) -> tuple[list[str], list[str]]:
    rows = [
        "| method | final E r | final KL(π‖π_ref) | largest KL rise per 10 steps | reward above the REINFORCE points: min / median, KL ∈ (0.3, 1.1) | same, KL ∈ (1.5, 3.2) | mean reward below the exact optimum, KL ∈ (0.3, 1.6) |",
        "|---|---|---|---|---|---|---|",
    ]
    reinforce = {b: runs(bed, seeds, method="rloo", beta_rl=b, **FIG7) for b in BETAS_RL}
    jbond = {
        "J-BOND η=0.02, γ=0": runs(bed, seeds, method="jbond", beta=0.5, eta=0.02, gamma=0.0, **FIG7),
        "J-BOND η=0.005, γ=0": runs(bed, seeds, method="jbond", beta=0.5, eta=0.005, gamma=0.0, **FIG7),
        "J-BOND η=0.02, γ=1": runs(bed, seeds, method="jbond", beta=0.5, eta=0.02, gamma=1.0, **FIG7),
    }
    front_kl = np.concatenate([h["kl_ref"].mean(0) for h in reinforce.values()])
    front_reward = np.concatenate([h["reward"].mean(0) for h in reinforce.values()])

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, h in list(jbond.items()) + [(f"REINFORCE β_RL={b}", h) for b, h in reinforce.items()]:
        style = dict(lw=2) if label.startswith("J-BOND") else dict(lw=1, ls="--")
        curve(axes[0], h, "reward", label, **style)
        curve(axes[1], h, "kl_ref", label, **style)
        axes[2].plot(h["kl_ref"].mean(0), h["reward"].mean(0), label=label, **style)
        kl_mean, reward_mean = h["kl_ref"].mean(0), h["reward"].mean(0)
        gaps = front_gap(kl_mean, reward_mean, front_kl, front_reward)
        cells = []
        for low, high in ((0.3, 1.1), (1.5, 3.2)):
            inside = (kl_mean > low) & (kl_mean < high)
            cells.append(f"{gaps[inside].min():+.2f} / {np.median(gaps[inside]):+.2f}" if inside.any() else "–")
        rise = np.diff(h["kl_ref"], axis=1).max(axis=1).mean()
        if label.startswith("REINFORCE"):
            cells = ["(is the front)"] * 2
        inside = (kl_mean > 0.3) & (kl_mean < 1.6)
        deficit = (optimum_reward(bed, kl_mean[inside]) - reward_mean[inside]).mean() if inside.any() else np.nan
        rows.append(
            f"| {label} | {fmt(final(h, 'reward'))} | {fmt(final(h, 'kl_ref'))} | {rise:.2f} | {cells[0]} "
            f"| {cells[1]} | {deficit:.3f} |"
        )
    betas = np.geomspace(0.15, 5.0, 40)
    tilted = [bed.evaluate(bed.tilted_log_probs(b)) for b in betas]
    axes[2].plot([t["kl_ref"] for t in tilted], [t["reward"] for t in tilted], "k:", lw=1,
                 label="exact optimum π_ref·e^(r/β)")
    exact = [bed.evaluate(bed.bon_log_probs(2**j)) for j in range(1, 7)]
    axes[2].plot([e["kl_ref"] for e in exact], [e["reward"] for e in exact], "ko", ms=3, label="exact BoN_2^j")
    axes[0].set_title("E_π r")
    axes[1].set_title("KL(π‖π_ref)")
    axes[2].set_title("E_π r vs KL(π‖π_ref)")
    for ax in axes[:2]:
        ax.set_xlabel("step")
    axes[2].set_xlabel("KL(π‖π_ref)")
    axes[2].set_xlim(0, 3.7)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"J-BOND vs REINFORCE (RLOO, 2 samples), MLP policy, lr {FIG7['lr']} ({seeds} seeds)")
    fig.tight_layout()
    fig.savefig(out / "fig7_jbond_vs_reinforce.png", dpi=110)
    plt.close(fig)
    settled = reinforce[1.0]
    optimum = bed.evaluate(bed.tilted_log_probs(1.0))
    notes = [
        f"REINFORCE β_RL=1 settles at KL {final(settled, 'kl_ref')[0]:.3f}, reward {final(settled, 'reward')[0]:.3f}; "
        f"the exact maximiser of E r − KL has KL {optimum['kl_ref']:.3f}, reward {optimum['reward']:.3f}: "
        "it converges onto the exact reward/KL front, which no method can beat."
    ]
    return rows, notes


def methods_table(bed: TestBed, seeds: int) -> list[str]:
    rows = ["| method (target BoN_8) | forward KL | backward KL | E log p≤ | KL(π‖π_ref) |", "|---|---|---|---|---|"]
    target = bed.evaluate(bed.bon_log_probs(8), n=8)
    rows.append(f"| exact π_BoN | 0 | 0 | {target['log_quantile']:.3f} | {target['kl_ref']:.3f} |")
    mc = bed.evaluate(bed.mc_backward_target(8, 16), n=8)
    rows.append(
        f"| exact fixed point of the MC-quantile backward term (k=16) | {mc['forward_kl']:.3f} "
        f"| {mc['backward_kl']:.3f} | {mc['log_quantile']:.3f} | {mc['kl_ref']:.3f} |"
    )
    for label, config in [
        ("BOND β=0.5", dict(method="bond", beta=0.5)),
        ("vBoN", dict(method="vbon")),
        ("BoN-SFT", dict(method="bon_sft")),
        ("BoNBoN α=0.5", dict(method="bonbon", alpha=0.5)),
        ("BoNBoN α=0.9", dict(method="bonbon", alpha=0.9)),
    ]:
        h = runs(bed, seeds, n=8, steps=1000, lr=0.02, eval_every=50, **config)
        rows.append(
            f"| {label} | {fmt(final(h, 'forward_kl'))} | {fmt(final(h, 'backward_kl'))} "
            f"| {fmt(final(h, 'log_quantile'))} | {fmt(final(h, 'kl_ref'))} |"
        )
    return rows


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/testbed"), help="folder for the PNGs and README.md")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per curve (0..seeds-1)")
    parser.add_argument("--bed-seed", type=int, default=0, help="seed of the problem (π_ref)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    mlp, tabular = make_testbed("mlp", seed=args.bed_seed), make_testbed("tabular", seed=args.bed_seed)
    sections, notes = {}, []
    for key, (rows, found) in {
        "fig2_mlp": figure2(mlp, "mlp", args.seeds, args.out),
        "fig2_tabular": figure2(tabular, "tabular", args.seeds, args.out, ns=(8,)),
        "fig4": figure4(mlp, args.seeds, args.out),
        "fig7": figure7(mlp, args.seeds, args.out),
    }.items():
        sections[key] = rows
        notes += found
    sections["methods"] = methods_table(mlp, args.seeds)
    sections["notes"] = [f"- {note}" for note in notes]
    write_readme(args.out, sections, args, time.time() - start)
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


def write_readme(out: Path, sections: dict[str, list[str]], args, seconds: float) -> None:
    text = README.format(
        seeds=args.seeds,
        bed_seed=args.bed_seed,
        minutes=seconds / 60,
        **{key: "\n".join(rows) for key, rows in sections.items()},
    )
    (out / "README.md").write_text(text)


README = """# Exact test bed: BOND paper Figures 2, 4, 7

Written by `python -m distill.testbed_figures --seeds {seeds} --bed-seed {bed_seed}`
({minutes:.1f} min on one core). All numbers are exact expectations over the 256 sequences
(4 tokens, vocabulary 4) of the trained policies, mean ± std over {seeds} training seeds on one
problem; "final" = average of the last 5 evaluations. Reward: count of token 1, +0.5 if the last
token is 2 (9 levels, many ties); BOND-type methods use bonbench's strict order (reward, then lower
sequence index). π_ref: a 2-hidden-unit MLP policy at random init; "tabular" = a free logit vector
per prefix. Quantile metric: exact E_π log p≤(y) with p≤ under π_ref; training uses the smoothed
MC estimate (c+1)/(k+1) from k = 16 reference samples.

## Which of the paper's claims held (at the defaults: 3 seeds, bed seed 0)

The short versions are asserted by `tests/distill/test_testbed.py`.

- **Figure 2, Jeffreys β = 0.5: held qualitatively, for the MLP policy.** At N = 8 it gets the
  forward KL of BoN-SFT (1.13x) and the backward KL of vBoN (1.00x), while each specialist is
  1.5x worse on its other divergence, and it keeps vBoN's log-quantile (β = 0 lags by 0.02 at
  N = 8, 0.05 at N = 16). **Not held as docs/math.md §7 quantifies it:** β = 0.5 only matches the
  better specialist on backward KL (0.99-1.00x, not 0.7-0.9x) and is 1.05-1.30x on forward KL
  (not 0.9-1.1x). At N = 4 the three barely differ. With the tabular policy the claims do not
  separate: BoN-SFT is best on both KLs, since the backward term's target is the MC-quantile
  fixed point, KL 0.02 off π_BoN.
- **Figure 4, iterative BOND: held.** BOND N = 4 is flat after step 300; iterative BOND n = 2
  keeps rising and ends each anchor phase j closest to Best-of-2^(j+1), a little behind it.
- **Figure 7, J-BOND vs REINFORCE: held in part.** J-BOND's reward rises with a KL that grows
  smoothly (largest rise per 10 steps 0.27 vs 1.07 for β_RL = 0.001), and beyond KL ≈ 1.5 it lies
  0.2-0.6 above every REINFORCE point. **Not held** between KL 0.7 and 1.12: REINFORCE with
  β_RL = 1 converges to π_ref·e^r/Z, the exact reward/KL optimum, and beats J-BOND there by
  0.13-0.26 reward. No method can beat a converged KL-regularised RL run on the axis it optimises;
  J-BOND follows quantile (Best-of-2) tilts, which lie below that front for this reward.
- **Figure 6 (γ, η): mixed.** γ = 1 improves the trade-off a little (0.235 vs 0.269 mean reward
  below the exact optimum), a slower anchor η = 0.005 does not (0.314).

## Figure 2: Jeffreys divergence (`fig2_jeffreys_mlp.png`, `fig2_jeffreys_tabular.png`)

1000 steps, batch 32, 2 policy samples + 16 reference samples per prompt, Adam lr 0.02.

MLP policy (cannot represent π_BoN):

{fig2_mlp}

Tabular policy (can represent π_BoN):

{fig2_tabular}

## Figure 4: iterative BOND (`fig4_iterative_bond.png`)

Jeffreys β = 0.5, anchor replaced by the policy every 100 steps, MLP policy, 1000 steps, lr 0.02.

{fig4}

## Figure 7: J-BOND vs REINFORCE (`fig7_jbond_vs_reinforce.png`)

800 steps, lr 0.005, batch 32; J-BOND β = 0.5 with 1 policy + 2 anchor samples per prompt (raw
rewards, ties as ≤); REINFORCE = RLOO with 2 policy samples. "Reward above the REINFORCE points" is
J-BOND's mean reward minus the best mean reward any REINFORCE run reached with no more KL
(`distill.testbed.front_gap`), positive = on or above the REINFORCE front.

{fig7}

## Every distillation method against the same target, BoN_8 (MLP policy, 1000 steps)

{methods}

## Measured ratios (computed by the script from the runs above)

{notes}
"""


if __name__ == "__main__":
    main()
