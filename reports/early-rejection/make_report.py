"""The early-rejection report from a ``bonbench measure`` run folder: what each Best-of-N variant
(early rejection, other selection rules) buys for the tokens it draws, beside plain Best-of-N on the
same candidates.

    python reports/early-rejection/make_report.py RUN_FOLDER [OUT] [--ns 8 16 32]   # from the repository root

Reads ``RUN_FOLDER/summary.parquet`` and ``run.json``; writes ``OUT/README.md`` (default: this
folder) with the command that made the run and the table (method, N, tokens per answer, reward,
win rate against one reference sample with its 95% Wilson interval, win rate against all k
references), and ``OUT/cost_quality.png``: tokens per answer (log scale) against the win rate,
Best-of-N as a line with its intervals, each early-rejection setting as a dashed line over the
plotted Ns, each selection rule as markers (their intervals are in the table). Every column is
defined in the docstring of ``bonbench/measure.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
# BoN-8, BoN-8:soft(temperature=0.1), ER-8:16,32:0.5, policy:<slug>
METHOD = re.compile(r"^(?P<family>BoN|ER)-(?P<n>\d+)(?::(?P<setting>.+))?$")
FAMILY_ORDER = {"BoN": 0, "rule": 1, "ER": 2, "policy": 3}


def parse_method(method: str) -> tuple[str, str]:
    """(family, setting) of a summary row: ``("BoN", "")``, ``("rule", "soft(temperature=0.1)")``,
    ``("ER", "16,32:0.5")``, ``("policy", "<slug>")``."""
    match = METHOD.match(method)
    if match is None:
        return "policy", method.partition(":")[2]
    if match["family"] == "ER":
        return "ER", match["setting"]
    return ("rule", match["setting"]) if match["setting"] else ("BoN", "")


def rule_spec(setting: str) -> str:
    """A rule's label back into the spec ``--rules`` reads: ``soft(temperature=0.1)`` -> ``soft:temperature=0.1``."""
    name, _, params = setting.partition("(")
    return f"{name}:{params.rstrip(')')}" if params else name


def rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with ``family`` and ``setting``, ordered by N, then BoN, rules, early rejection, policies."""
    parsed = summary["method"].map(parse_method)
    frame = summary.assign(family=[f for f, _ in parsed], setting=[s for _, s in parsed])
    frame["_order"] = frame["family"].map(FAMILY_ORDER)
    return frame.sort_values(["n", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def command(run: dict, frame: pd.DataFrame, out: str) -> str:
    """The ``bonbench measure`` command that gives this table: the pool settings of ``run.json`` that
    differ from the defaults, the prompts, the Ns, and the rules and plans of the summary."""
    from bonbench.measure import MeasureConfig

    defaults = dataclasses.asdict(MeasureConfig())
    parts = ["python -m bonbench measure"]

    def add(key, value):
        values = value if isinstance(value, list) else [value]
        parts.append(f"--{key.replace('_', '-')} " + " ".join(str(v) for v in values))

    settings = run["settings"]
    for key, value in settings.items():
        if key != "pool" and value != defaults.get(key):
            add(key, value)
    if settings["pool"] != max(frame["n"]):
        add("pool", settings["pool"])
    add("limit", int(frame["prompts"].max()))
    add("ns", sorted(int(n) for n in frame.loc[frame["family"] == "BoN", "n"]))
    rules = list(dict.fromkeys(rule_spec(s) for s in frame.loc[frame["family"] == "rule", "setting"]))
    plans = list(dict.fromkeys(frame.loc[frame["family"] == "ER", "setting"]))
    if rules:
        add("rules", rules)
    if plans:
        add("early_rejection", plans)
    add("out", out)
    return " ".join(parts)


def markdown(frame: pd.DataFrame) -> str:
    bon_tokens = frame[frame["family"] == "BoN"].set_index("n")["tokens_per_request"]
    lines = ["| method | N | tokens per answer | tokens / BoN-N's | reward | win rate [95% CI] "
             "| win rate vs all refs |", "|---|---|---|---|---|---|---|"]
    for r in frame.itertuples():
        ratio = f"{r.tokens_per_request / bon_tokens[r.n]:.2f}" if r.n in bon_tokens.index else ""
        lines.append(f"| {r.method} | {r.n} | {r.tokens_per_request:.1f} | {ratio} | "
                     f"{r.reward:.3f} ± {r.reward_se:.3f} | {r.win_rate:.3f} [{r.win_low:.3f}, {r.win_high:.3f}] | "
                     f"{r.win_rate_all:.3f} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _errors(frame: pd.DataFrame) -> np.ndarray:
    return np.vstack([(frame["win_rate"] - frame["win_low"]).clip(lower=0),
                      (frame["win_high"] - frame["win_rate"]).clip(lower=0)])


def _panel(ax, frame: pd.DataFrame, ns: list[int], column: str, errors) -> None:
    """One metric against tokens per answer: Best-of-N over every N, the variants at ``ns``."""
    bon = frame[frame["family"] == "BoN"].sort_values("n")
    ax.errorbar(bon["tokens_per_request"], bon[column], yerr=errors(bon), color="black", marker="o", capsize=3,
                label="Best-of-N (argmax)", zorder=5)
    for r in bon.itertuples():
        ax.annotate(f"N={r.n}", (r.tokens_per_request, getattr(r, column)), textcoords="offset points",
                    xytext=(5, -12), fontsize=8)
    shown = frame[frame["n"].isin(ns)]
    for setting, group in shown[shown["family"] == "ER"].groupby("setting", sort=False):
        group = group.sort_values("n")
        ax.plot(group["tokens_per_request"], group[column], marker="s", linestyle="--", alpha=0.85,
                label=f"early rejection {setting}")
    markers = iter("^vDP*Xh<>")
    for setting, group in shown[shown["family"] == "rule"].groupby("setting", sort=False):
        ax.plot(group["tokens_per_request"], group[column], marker=next(markers, "o"), linestyle="none",
                alpha=0.85, label=f"rule {setting}")
    for r in frame[frame["family"] == "policy"].itertuples():
        ax.errorbar([r.tokens_per_request], [getattr(r, column)], yerr=errors(frame.loc[[r.Index]]), marker="*",
                    markersize=11, capsize=2, linestyle="none", label=r.method)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib_ticker().ScalarFormatter())
    ax.set_xlabel("generated tokens per answer served (log scale)")
    ax.grid(alpha=0.3)


def plot(frame: pd.DataFrame, ns: list[int], path: Path) -> Path:
    """Tokens per answer against the win rate (left) and the mean reward (right, less noisy)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    _panel(left, frame, ns, "win_rate", _errors)
    left.set_ylabel("win rate against one reference sample (95% Wilson)")
    _panel(right, frame, ns, "reward", lambda part: 1.96 * part["reward_se"].to_numpy())
    right.set_ylabel("mean reward of the answer served (±1.96 s.e. across prompts)")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"Cost against quality; variants at N = {', '.join(map(str, ns))} (their intervals are in the "
                 "table)", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def readme(frame: pd.DataFrame, run: dict, run_folder: str, notes: str = "") -> str:
    """The report; ``notes`` (the hand-written findings of ``FINDINGS.md``, if any) go at its end."""
    settings = run["settings"]
    prompts = int(frame["prompts"].max())
    return f"""# Early rejection and selection rules against Best-of-N (issue 15)

{prompts} prompts of `{settings['task']}` ({settings['split']}), k = {settings['k']} references and
{settings['pool']} candidates per prompt drawn from `{settings['model']}` at temperature
{settings['temperature']}, reward `{settings['reward_model']}`, answers of at most
{settings['max_tokens']} tokens, partial answers scored at
{', '.join(map(str, settings.get('partial_at', []))) or 'no'} tokens. Written by

    {command(run, frame, run_folder)}
    python reports/early-rejection/make_report.py {run_folder}

Every variant is measured on the candidates Best-of-N selects from: the candidates of a prompt are
cut in draw order into disjoint groups of N, and a rule (`BoN-N:<rule>`) or early rejection
(`ER-N:<checkpoints>:<keep>`) serves one answer per group, which faces the same reference sample
as Best-of-N's answer of that group. Early rejection is replayed on candidates drawn to their end
with their partial rewards, which chooses exactly what the online rule chooses (each candidate
draws from its own seeded generator). `tokens / BoN-N's` is the row's tokens per answer over
plain Best-of-N's at the same N (which averages over the whole pool, so early rejection that keeps
everything reads about 1). The columns are defined in the docstring of `bonbench/measure.py`;
`{run_folder}/summary.md` has them all (reward and log quantile with their errors, time per answer).

![cost against quality](cost_quality.png)

{markdown(frame)}
{notes}"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a bonbench measure run folder (with summary.parquet and run.json)")
    parser.add_argument("out", nargs="?", default=str(HERE), help="where README.md and cost_quality.png go")
    parser.add_argument("--ns", type=int, nargs="+", default=[8, 16, 32],
                        help="the Ns whose variants the plot shows (default: 8 16 32; all N > 1 if none is in the run)")
    args = parser.parse_args(argv)
    run_folder = Path(args.run)
    frame = rows(pd.read_parquet(run_folder / "summary.parquet"))
    run = json.loads((run_folder / "run.json").read_text())
    ns = [n for n in args.ns if n in set(frame["n"])] or sorted(n for n in set(frame["n"]) if n > 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(frame, ns, out / "cost_quality.png")
    findings = out / "FINDINGS.md"
    notes = "\n" + findings.read_text() if findings.exists() else ""
    (out / "README.md").write_text(readme(frame, run, args.run, notes))
    print(markdown(frame))


if __name__ == "__main__":
    main()
