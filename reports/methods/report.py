"""The all-methods report: reward against KL for every method of ``run.py`` beside Best-of-N.

    python reports/methods/report.py [POOL]        # POOL: runs/measure-default (the default)

Reads ``POOL/summary.parquet`` and ``POOL/samples.parquet`` (written by ``bonbench measure``) and
each method's ``runs/methods/<name>/wall.json`` (without it, the train time already in
``methods.csv``). Writes here:

- ``methods.csv`` and the table in ``README.md``: per method, answers drawn per prompt and step,
  training wall time, reward, win rate against the reference with its 95% Wilson interval,
  measured KL to the reference with its standard error, and ``vs BoN front``: the method's reward
  minus the reward of Best-of-N's front at the same KL. The front joins the measured Best-of-N
  points (N = 1, 2, 4, 8 at their analytic KL, log N - (N-1)/N) by straight lines; a method above it
  gets more reward than Best-of-N for its KL, as far as the line between two measured Ns says.
- The reward-hacking check (``evals.metrics.reward_hacking_flags``): ROUGE-L against the task's
  human summaries and answer length in words, each method's per-prompt means minus the reference
  policy's (its 24 pool samples per prompt), with standard errors across the 40 prompts.
- ``reward_vs_kl.png``: Best-of-N's front and every method's point with its KL interval.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from bonbench.samplestore import policy_slug  # noqa: E402
from evals.metrics import reward_hacking_flags, rouge_f1, word_count  # noqa: E402

from run import METHODS, RUNS, STEPS  # noqa: E402  (this folder's run.py)

LABELS = {"jbond": "J-BOND", "rloo-b0.01": "RLOO β=0.01", "rloo-b0.1": "RLOO β=0.1",
          "iterative-bond": "iterative BOND (n=2)", "bond-n4-b0.5": "BOND N=4 β=0.5",
          "bond-n8-b0.5": "BOND N=8 β=0.5", "bonbon": "BoNBoN (n=8)", "bond-n8-b0": "BoN-SFT N=8 (β=0)",
          "bond-n8-b1": "vBoN N=8 (β=1)", "bond-n4-b0": "BoN-SFT N=4 (β=0)", "bond-n4-b1": "vBoN N=4 (β=1)"}


# Policies measured in the same pool under another budget, shown beside the sweep: name -> slug
OTHERS = {"jbond-default": "jbond-B-policy", "jbond-linear": "jbond-linear-policy"}
LABELS["jbond-default"] = "J-BOND default: 24 steps (reports/jbond-default/)"
LABELS["jbond-linear"] = "J-BOND, 24 steps, lr decayed linearly (reports/jbond-default/)"
OTHERS["jbond-drift"] = "jbond-drift-policy"
LABELS["jbond-drift"] = "J-BOND default under a random reward: drift (reports/jbond-default/drift/)"
# Stops 22-25: the default again (AVX2, seed 1, an AMX machine before and after stop 23's sampling fixes) and variants
for _name, _slug, _label in [
        ("jbond-default-avx2", "jbond-default-policy", "J-BOND default, seed 0, AVX2 fp32 (stop 22)"),
        ("jbond-seed1", "jbond-seed1-policy", "J-BOND default, seed 1, AVX2 fp32 (stop 22)"),
        ("jbond-b16x24", "jbond-b16x24-policy", "J-BOND, 16 prompts a step (stop 22)"),
        ("jbond-k4", "jbond-k4-policy", "J-BOND, 4 anchor samples a prompt (stop 22)"),
        ("jbond-lora-all", "jbond-lora-all-policy", "J-BOND, LoRA on all 30 layers (stop 22)"),
        ("jbond-gamma1", "jbond-gamma1-policy", "J-BOND, γ = 1 (stop 22)"),
        ("jbond-amx", "jbond-amx-policy", "J-BOND default, seed 0, AMX bf16 trunk (stop 23)"),
        ("jbond-amx-fast", "jbond-amx-fast-policy", "J-BOND default, seed 0, AMX, faster sampling (stop 23)"),
        ("jbond-s48-lr5e-4", "jbond-s48-lr5e-4-policy", "J-BOND, 48 steps at lr 5e-4 (stop 23)"),
        ("jbond-s48-lr7e-4", "jbond-s48-lr7e-4-policy", "J-BOND, 48 steps at lr 7e-4 (stop 23)"),
        ("jbond-s48-lr5e-4-seed1", "jbond-s48-lr5e-4-seed1-policy", "J-BOND, 48 steps at lr 5e-4, seed 1 (stop 23)"),
        ("jbond-amx-seed1", "jbond-amx-seed1-policy", "J-BOND default, seed 1, AMX (stop 24)"),
        ("jbond-top4", "jbond-top4-policy", "J-BOND, LoRA on the top 4 layers (stop 24)"),
        ("jbond-top4-seed1", "jbond-top4-seed1-policy", "J-BOND, LoRA on the top 4 layers, seed 1 (stop 24)"),
        ("jbond-top4-seed2", "jbond-top4-seed2-policy", "J-BOND, LoRA on the top 4 layers, seed 2 (stop 24)"),
        ("jbond-top4-s36", "jbond-top4-s36-policy", "J-BOND, LoRA on the top 4 layers, 36 steps (stop 24)"),
        ("jbond-top4-eta0.1", "jbond-top4-eta0.1-policy", "J-BOND, LoRA on the top 4 layers, η = 0.1 (stop 24)"),
        ("jbond-top4-eta0.1-seed1", "jbond-top4-eta0.1-seed1-policy",
         "J-BOND, LoRA on the top 4 layers, η = 0.1, seed 1 (stop 24)"),
        ("jbond-r8", "jbond-r8-policy", "J-BOND, LoRA r8 on the top 8 layers (stop 24)"),
        ("jbond-top2", "jbond-top2-policy", "J-BOND, LoRA on the top 2 layers (stop 24)"),
        ("jbond-drift-top4", "jbond-drift-top4-policy",
         "J-BOND, LoRA on the top 4 layers, under a random reward: drift (stop 24)"),
        ("jbond-fused", "jbond-fused-policy", "J-BOND default, seed 0, AMX, fused decoding attention (stop 25)"),
        ("jbond-sgd-lr0.03", "jbond-sgd-lr0.03-policy", "J-BOND, SGD (momentum 0.9) at lr 0.03 (stop 25)"),
        ("jbond-sgd-lr0.1", "jbond-sgd-lr0.1-policy", "J-BOND, SGD (momentum 0.9) at lr 0.1 (stop 25)")]:
    OTHERS[_name], LABELS[_name] = _slug, _label
# The long configuration's path: the snapshots `distill/configs/jbond_long.yaml` keeps every 24 steps
LONG_STEPS = (24, 48, 72, 96, 120)
for _step in LONG_STEPS:
    OTHERS[f"jbond-long-{_step}"] = f"snapshots-step-{_step:04d}"
    LABELS[f"jbond-long-{_step}"] = f"J-BOND long (jbond_long.yaml), step {_step}"


def bon_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The plain Best-of-N rows of a ``bonbench measure`` summary, by N."""
    return summary[summary["method"].str.match(r"^BoN-\d+$")].sort_values("n")


def bon_front(summary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Best-of-N's (KL, reward) points, by N."""
    bon = bon_rows(summary)
    return bon["kl_analytic"].to_numpy(float), bon["reward"].to_numpy(float)


def front_reward(kl: float, front_kl: np.ndarray, front_reward_: np.ndarray) -> float:
    """Reward of the piecewise-linear Best-of-N front at ``kl`` (NaN beyond its largest N)."""
    if kl > front_kl[-1]:
        return float("nan")
    return float(np.interp(max(kl, 0.0), front_kl, front_reward_))


def verdict(reward: float, reward_se: float, kl: float, kl_se: float, front_kl: np.ndarray,
            front_r: np.ndarray, z: float = 1.96) -> str:
    """"above" or "below" Best-of-N's front only when the method's 95% reward interval clears the
    front over the whole 95% interval of its KL; else "within noise"."""
    low = front_reward(max(kl - z * kl_se, 0.0), front_kl, front_r)
    high = front_reward(kl + z * kl_se, front_kl, front_r)
    if reward - z * reward_se > (front_r[-1] if np.isnan(high) else high):
        return "above"
    if reward + z * reward_se < low:
        return "below"
    return "within noise"


def paired_delta(values: pd.DataFrame, column: str, reference: pd.Series) -> tuple[float, float]:
    """Mean and standard error over prompts of (the method's per-prompt mean - the reference's)."""
    diff = values.groupby("prompt_index")[column].mean() - reference
    diff = diff.dropna()
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def hacking_columns(samples: pd.DataFrame, slugs: dict[str, str]) -> tuple[pd.DataFrame, dict]:
    from bonbench.tasks import load_task

    task = load_task("default", "test", int(samples["prompt_index"].max()) + 1)
    human = dict(zip(task["id"], task["summary"]))
    samples = samples.assign(rougeL=rouge_f1(samples["text"], [human[i] for i in samples["prompt_id"]])["rougeL"],
                             words=word_count(samples["text"]))
    pool = samples[samples["policy"] == ""]
    reference = pool.groupby("prompt_index")
    rows = []
    for name, slug in slugs.items():
        mine = samples[samples["policy"] == slug]
        if mine.empty:
            continue
        row = {"name": name}
        for column in ("reward", "rougeL", "words"):
            row[f"{column}_delta"], row[f"{column}_delta_se"] = paired_delta(mine, column, reference[column].mean())
        row["rougeL"], row["words"] = mine["rougeL"].mean(), mine["words"].mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    table["flag"] = reward_hacking_flags(table["reward_delta"], table["rougeL_delta"], table["rougeL_delta_se"],
                                         table["words_delta"], table["words_delta_se"])
    return table, {"rougeL": pool["rougeL"].mean(), "words": pool["words"].mean()}


def train_time(name: str, known: pd.DataFrame) -> tuple[float, str]:
    """Train minutes and torch threads of a run: from ``runs/<name>/wall.json`` (``run.py`` writes it),
    else from ``known`` (the ``methods.csv`` already here, by name), so a checkout without the runs
    keeps their times."""
    wall_file = REPO / RUNS / name / "wall.json"
    if wall_file.exists():
        run = json.loads(wall_file.read_text())
        command = run["command"]
        threads = command[command.index("--threads") + 1] if "--threads" in command else "default"
        return run["seconds"] / 60, threads
    if name in known.index and known.at[name, "train_minutes"] != "":
        return float(known.at[name, "train_minutes"]), str(known.at[name, "threads"])
    return float("nan"), ""


def method_rows(summary: pd.DataFrame, slugs: dict[str, str]) -> pd.DataFrame:
    front_kl, front_r = bon_front(summary)
    csv = HERE / "methods.csv"
    known = pd.read_csv(csv, keep_default_na=False).set_index("name") if csv.exists() else pd.DataFrame()
    rows = []
    for name, slug in slugs.items():
        found = summary[summary["method"] == f"policy:{slug}"]
        if found.empty:
            continue
        s = found.iloc[0]
        minutes, threads = train_time(name, known)
        rows.append({"name": name, "method": LABELS.get(name, name),
                     "answers_per_prompt_step": METHODS[name][2] if name in METHODS else np.nan,
                     "train_minutes": minutes, "threads": threads,
                     "reward": s["reward"], "reward_se": s["reward_se"],
                     "win_rate": s["win_rate"], "win_low": s["win_low"], "win_high": s["win_high"],
                     "kl": s["kl_measured"], "kl_se": s["kl_measured_se"],
                     "vs_bon_front": s["reward"] - front_reward(s["kl_measured"], front_kl, front_r),
                     "verdict": verdict(s["reward"], s["reward_se"], s["kl_measured"], s["kl_measured_se"],
                                        front_kl, front_r)})
    return pd.DataFrame(rows)


def plot(summary: pd.DataFrame, table: pd.DataFrame, path: Path) -> None:
    """Two panels: the whole Best-of-N front, and its start (KL <= 0.4) where most methods land."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front_kl, front_r = bon_front(summary)
    ns = bon_rows(summary)["n"].tolist()
    fig, axes = plt.subplots(1, 2, figsize=(12, 7.5), gridspec_kw={"width_ratios": [1, 1.2]})
    for ax, zoom in zip(axes, (False, True)):
        ax.plot(front_kl, front_r, "k-o", label="Best-of-N (analytic KL)")
        for n, x, y in zip(ns, front_kl, front_r):
            ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
        is_long = table["name"].str.startswith("jbond-long-")
        for marker, (_, row) in zip(itertools.cycle("sD^v<>pPX*hH8"), table[~is_long].iterrows()):
            ax.errorbar(row["kl"], row["reward"], xerr=1.96 * row["kl_se"], yerr=1.96 * row["reward_se"],
                        fmt=marker, capsize=2, label=row["method"])
        long = table[is_long]
        if not long.empty:
            ax.errorbar(long["kl"], long["reward"], xerr=1.96 * long["kl_se"], yerr=1.96 * long["reward_se"],
                        fmt="-o", color="tab:red", capsize=2, label="J-BOND long, every 24 steps")
            for _, row in long.iterrows():
                ax.annotate(row["name"].rsplit("-", 1)[1], (row["kl"], row["reward"]), textcoords="offset points",
                            xytext=(5, 4), fontsize=7, color="tab:red")
        ax.set_xlabel("KL(π ‖ π_ref), nats (methods: measured, 95% interval)")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_xlim(-0.02, 0.45)
            ax.set_ylim(0.05, 0.33)
            ax.set_title("the start of the front")
            # below both panels, so that no point of the crowded start hides behind it
            fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=3)
        else:
            ax.set_ylabel("mean reward of one answer (40 test prompts)")
            ax.set_title(f"every method after {STEPS} steps × 8 prompts; J-BOND also at 24–120")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(pool: Path) -> None:
    summary = pd.read_parquet(pool / "summary.parquet")
    samples = pd.read_parquet(pool / "samples.parquet")
    slugs = {name: policy_slug(str(RUNS / name / "policy")) for name in METHODS} | OTHERS
    table = method_rows(summary, slugs)
    hacking, reference = hacking_columns(samples, slugs)
    table = table.merge(hacking, on="name", how="left")
    table.to_csv(HERE / "methods.csv", index=False)
    plot(summary, table, HERE / "reward_vs_kl.png")
    text = render(summary, table, reference)
    (HERE / "README.md").write_text(text)
    print(text)


def front_gap(gap: float) -> str:
    return "beyond the front's end" if np.isnan(gap) else f"{gap:+.3f}"


def render(summary: pd.DataFrame, table: pd.DataFrame, reference: dict) -> str:
    lines = [
        f"# Every method on one budget: {STEPS} steps × 8 prompts, the embedded default, 2-core CPU",
        "",
        "Written by `python reports/methods/run.py` (how the budget and every column are defined: the",
        "docstrings of `run.py` and `report.py`). Rewards, win rates and KL come from `bonbench measure` on",
        "40 test prompts, 4 answers per policy, against the pool in `reports/measure-default/`.",
        "",
        "![reward against KL](reward_vs_kl.png)",
        "",
        "| method | answers / prompt / step | train min (threads) | reward | win rate [95% CI] | KL ± se | vs BoN front | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, s in bon_rows(summary).iterrows():
        lines.append(f"| Best-of-{s['n']} | {s['n']} (at inference) | | {s['reward']:.3f} | {s['win_rate']:.3f} "
                     f"[{s['win_low']:.3f}, {s['win_high']:.3f}] | {s['kl_analytic']:.3f} (analytic) | 0 | |")
    for _, r in table.iterrows():
        answers = "" if np.isnan(r["answers_per_prompt_step"]) else f"{r['answers_per_prompt_step']:.0f}"
        minutes = "" if np.isnan(r["train_minutes"]) else f"{r['train_minutes']:.1f} ({r['threads']})"
        lines.append(f"| {r['method']} | {answers} | {minutes} | "
                     f"{r['reward']:.3f} | {r['win_rate']:.3f} [{r['win_low']:.3f}, {r['win_high']:.3f}] | "
                     f"{r['kl']:.3f} ± {r['kl_se']:.3f} | {front_gap(r['vs_bon_front'])} | {r['verdict']} |")
    groups = {v: table.loc[table["verdict"] == v, "method"].tolist() for v in ("above", "below", "within noise")}
    lines += ["",
              "`vs BoN front`: the method's reward minus Best-of-N's at the same KL, on the straight lines between",
              "the measured Ns. `verdict`: above or below the front only where the method's 95% reward interval",
              "clears the front over the whole 95% interval of its KL.",
              "",
              f"- Point estimates: {int((table['vs_bon_front'] < 0).sum())} of {len(table)} below the front, "
              f"{int((table['vs_bon_front'] >= 0).sum())} on or above it"
              + (f", {int(table['vs_bon_front'].isna().sum())} at a KL beyond the largest N's (no front to compare "
                 "the point with; its verdict compares its interval with the front's end)."
                 if table["vs_bon_front"].isna().any() else "."),
              f"- Above Best-of-N's front: {', '.join(groups['above']) or 'none'}.",
              f"- Below it: {', '.join(groups['below']) or 'none'}.",
              f"- Within noise of it: {', '.join(groups['within noise']) or 'none'}.",
              f"- Not measured yet: {', '.join(LABELS[n] for n in METHODS if n not in set(table['name'])) or 'none'}.",
              "",
              "The BOND and BoNBoN rows (not iterative BOND) share one reference cache (`--reference-cache`): the",
              "first of them to run drew the reference samples and the others read them back, so their train",
              "minutes leave out reference sampling. Answers per prompt and step count what each method draws",
              "or reads. Runs with 1 thread ran as two lanes (`run.py --threads 1`): each train time is one",
              "thread's beside another run; `default` is torch's two threads with the machine to itself.",
              "vBoN N=8 was trained a stop later than the others, on code whose sampler runs the frozen trunk",
              "once per prompt and reads log π_ref(y) from shadow rows (the same draws and, up to rounding, the",
              "same log-probabilities), so its train minutes are not comparable with the rows above it.",
              "",
              "## Reward hacking", "",
              f"The reference policy's answers: ROUGE-L {reference['rougeL']:.3f} against the human summaries, "
              f"{reference['words']:.1f} words.", "",
              "| method | ROUGE-L | Δ ROUGE-L ± se | words | Δ words ± se | Δ reward ± se | flag |",
              "|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['method']} | {r['rougeL']:.3f} | {r['rougeL_delta']:+.3f} ± {r['rougeL_delta_se']:.3f} | "
                     f"{r['words']:.1f} | {r['words_delta']:+.1f} ± {r['words_delta_se']:.1f} | "
                     f"{r['reward_delta']:+.3f} ± {r['reward_delta_se']:.3f} | {r['flag'] or 'none'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "runs" / "measure-default")
