"""The report's figures (matplotlib, Agg): each function takes tables and writes one PNG.

Inputs are the report's normalised frames (see ``evals/report.py``): ``methods`` has a row per
method (``kind`` is ``reference``, ``bon`` or ``policy``), ``curves`` a row per evaluated
training step of each ``distill`` run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evals.report_tables import bon_curve

_COLORS = {"bon": "#1f77b4", "reference": "#7f7f7f", "policy": "#d62728"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _finish(ax, title: str, xlabel: str, ylabel: str, log_x: bool = True) -> None:
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _error(frame, low: str, high: str, value: str):
    """Asymmetric error bars (2, rows) from interval columns; zeros where missing."""
    lo = (frame[value] - frame[low]).fillna(0).clip(lower=0).to_numpy()
    hi = (frame[high] - frame[value]).fillna(0).clip(lower=0).to_numpy()
    return np.vstack([lo, hi])


def cost_vs_quality(methods, path: Path, metric: str = "win_rate") -> Path:
    """Generated tokens per answer (log x) against the win rate: the price of each method's quality."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    bon = bon_curve(methods)
    if len(bon):
        ax.errorbar(bon["tokens_per_answer"], bon[metric], yerr=_error(bon, "win_low", "win_high", metric),
                    color=_COLORS["bon"], marker="o", capsize=3, label="Best-of-N (reference samples)")
        for row in bon.itertuples():
            ax.annotate(f"N={row.n}", (row.tokens_per_answer, getattr(row, metric)), textcoords="offset points",
                        xytext=(5, -12), fontsize=8, color=_COLORS["bon"])
    for row in methods[methods["kind"] == "policy"].itertuples():
        ax.errorbar([row.tokens_per_answer], [getattr(row, metric)],
                    yerr=[[max(getattr(row, metric) - row.win_low, 0)], [max(row.win_high - getattr(row, metric), 0)]],
                    marker="*", markersize=12, capsize=3, linestyle="none", label=row.method)
    _finish(ax, "Cost against quality", "generated tokens per answer served (log scale)",
            "win rate against one reference sample")
    return _save(fig, path)


def win_rate_vs_n(methods, path: Path) -> Path:
    """Best-of-N's win rate against N (measured and N/(N+1)), each policy as a line at one sample."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    bon = bon_curve(methods)
    if len(bon):
        ax.errorbar(bon["n"], bon["win_rate"], yerr=_error(bon, "win_low", "win_high", "win_rate"),
                    color=_COLORS["bon"], marker="o", capsize=3, label="Best-of-N, measured")
        grid = np.geomspace(1, bon["n"].max(), 50)
        ax.plot(grid, grid / (grid + 1), color=_COLORS["bon"], linestyle=":", label="N/(N+1), no ties")
    for i, row in enumerate(methods[methods["kind"] == "policy"].itertuples()):
        ax.axhline(row.win_rate, color=plt.cm.Reds(0.5 + 0.4 * i / max(1, len(methods))), linestyle="--",
                   label=f"{row.method} (1 sample)")
    _finish(ax, "Win rate against N", "N (samples per answer)", "win rate against one reference sample")
    return _save(fig, path)


def reward_vs_kl(methods, curves, path: Path) -> Path:
    """Reward against KL(π ‖ π_ref): Best-of-N at its analytic KL, each policy at its measured KL,
    and each training run's evaluations as a curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    bon = bon_curve(methods)
    if len(bon):
        ax.plot(bon["kl"], bon["reward"], color=_COLORS["bon"], marker="o", label="Best-of-N (analytic KL)")
        for row in bon.itertuples():
            ax.annotate(f"N={row.n}", (row.kl, row.reward), textcoords="offset points", xytext=(5, -12), fontsize=8)
    for row in methods[methods["kind"] == "policy"].itertuples():
        ax.plot([row.kl], [row.reward], marker="*", markersize=12, linestyle="none", label=f"{row.method} (measured)")
    if curves is not None and len(curves):
        for run, frame in curves.groupby("run"):
            frame = frame.sort_values("step")
            ax.plot(frame["kl"], frame["reward"], marker=".", alpha=0.6, label=f"{run}: training evaluations")
    _finish(ax, "Reward against KL", "KL(π ‖ π_ref) (nats)", "mean reward", log_x=False)
    return _save(fig, path)
