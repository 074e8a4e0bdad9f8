r"""``python -m evals.report``: does a distilled policy give Best-of-N's quality at one sample's cost?

    python -m evals.report                                   # runs the default comparison, then the report
    python -m evals.report --from runs/evals/xsum runs/jbond runs/evals/judge --name my-report

With no ``--from`` it runs the default comparison itself, on the embedded default model and
reward (CPU, offline): ``evals.xsum`` for the reference, Best-of-2/4/8 and every policy found
under ``--runs`` (``runs/*/policy``), ``evals.benchmarks`` on the project's local tasks,
``evals.judge`` (each policy against the reference, both orders), then builds the report from
those folders and the distill runs' training curves. Each step resumes from its folder, so a
second call only rebuilds.

Writes ``reports/<name>/report.md`` (figures beside it as PNG), ``report.html`` (self-contained:
figures embedded) and the tables it shows as CSV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bonbench.cli import log_level_option, run_command, setup_logging
from bonbench.config import option, parse_config
from evals import report_figures as figures
from evals.report_render import Section, write_report
from evals.report_tables import Runs, bon_curve, load_runs, matched_n

log = logging.getLogger("evals.report")


@dataclass
class ReportConfig:
    name: str = option("default", "report name: the output goes to <reports>/<name>/")
    reports: str = option("reports", "folder that holds the reports")
    from_runs: list[str] = option([], "run folders to build from (evals.xsum, bonbench measure, evals.benchmarks, "
                                 "evals.judge, distill runs); none: run the default comparison first", flag="--from")
    runs: str = option("runs", "with no --from: where to look for distilled policies (runs/*/policy) and where "
                              "the default comparison writes (runs/evals/)")
    title: str = option("Best-of-N against distilled policies", "the report's title")
    # -- the default comparison (no --from) --------------------------------------------------------
    model: str = option("default", "the reference policy: 'default' (embedded SmolLM2-135M-Instruct), a hub id or "
                                  "a folder; the policies found under --runs must be of it")
    reward_model: str = option("default", "the reward that picks Best-of-N's answers and scores every method")
    limit: int = option(20, "summarisation prompts (evals.xsum --limit)")
    bench_limit: float = option(40, "documents per benchmark task (evals.benchmarks --limit)")
    judge_base_url: str = option("", "an OpenAI-compatible judge for the side-by-sides (default: the embedded "
                                    "model on loopback, a weak judge)")
    judge_model: str = option("", "the judge's model name at --judge-base-url")
    log_level: str = log_level_option()

    def __post_init__(self) -> None:
        if Path(self.name).name != self.name or not self.name:
            raise ValueError("--name is a folder name, without slashes")


# -- sections ----------------------------------------------------------------------------------


def _methods(runs: Runs):
    import pandas as pd

    if not runs.methods:
        return None
    frames = [frame.assign(source=str(folder)) for folder, frame in runs.methods]
    return pd.concat(frames, ignore_index=True)


def _verdicts(methods) -> list[str]:
    """One sentence per policy: which Best-of-N it matches, at what share of the tokens. Read on the
    win rate against every reference sample where the run has it (lower variance), else on the
    win rate against one."""
    bon = bon_curve(methods)
    metric = "win_rate_all" if "win_rate_all" in methods and methods["win_rate_all"].notna().all() else "win_rate"
    said = "win rate against all reference samples" if metric == "win_rate_all" else "win rate"
    out = []
    for row in methods[methods["kind"] == "policy"].itertuples():
        value = getattr(row, metric)
        n = matched_n(bon["n"], bon[metric], value) if len(bon) else None
        head = (f"**{row.method}**: {said} {value:.3f} (against one reference sample {row.win_rate:.3f} "
                f"[{row.win_low:.3f}, {row.win_high:.3f}])")
        if n is None and len(bon) and value < bon[metric].iloc[0]:
            out.append(f"{head}, below Best-of-{bon['n'].iloc[0]}'s {bon[metric].iloc[0]:.3f}: one sample of this "
                       "policy is no better than one of the reference here, so distillation did not pay on this run.")
        elif n is None and len(bon):
            out.append(f"{head}, above every Best-of-N measured (up to N={bon['n'].iloc[-1]}).")
        elif n is not None:
            per_sample = bon["tokens_per_answer"].iloc[0] / bon["n"].iloc[0]
            share = row.tokens_per_answer / (n * per_sample)
            out.append(f"{head}: it matches Best-of-{n:.1f} on the Best-of-N curve at {share:.2f}x its generated "
                       f"tokens, with KL {row.kl:.3f} where Best-of-N spends {_bon_kl(n):.3f} (analytic) at that N.")
    return out


def _bon_kl(n: float) -> float:
    import math

    return math.log(n) - (n - 1) / n


def headline(methods, folder: Path) -> Section:
    columns = {"method": "method", "n": "samples", "tokens_per_answer": "tokens/answer",
               "seconds_per_answer": "s/answer", "win_rate": "win rate", "win_low": "low", "win_high": "high",
               "win_rate_all": "vs all refs", "reward": "reward", "kl": "KL", "kl_kind": "KL is"}
    extra = {c: c for c in ("rougeL", "words", "flag") if c in methods}
    table = methods[list(columns) + list(extra)].rename(columns=columns)
    section = Section("One sample of each policy against Best-of-N", _verdicts(methods), [("", table)])
    section.paragraphs.append(
        "Win rate: against one independent reference sample per answer, ties counted half, Wilson 95% "
        "interval; 'vs all refs': against every reference sample of the prompt, the lower-variance estimate. KL: Best-of-N's analytic log N − (N−1)/N (an upper bound when answers repeat); a policy's "
        "is measured, the mean of log π(y) − log π_ref(y) over its samples.")
    section.figures += [
        ("Generated tokens per answer against win rate: Best-of-N pays N samples, a policy one.",
         figures.cost_vs_quality(methods, folder / "cost_vs_quality.png")),
        ("Win rate against N; each policy as a dashed line at its one-sample win rate.",
         figures.win_rate_vs_n(methods, folder / "win_rate_vs_n.png")),
    ]
    return section


def reward_kl(methods, runs: Runs, folder: Path) -> Section:
    import pandas as pd

    curves = pd.concat([c for _, c in runs.curves], ignore_index=True) if runs.curves else None
    return Section("Reward against KL", [
        "Training curves are the runs' own periodic evaluations (their own held-out prompts, fewer than the "
        "comparison's), so read their shape, not their level against the points."],
        figures=[("Reward against KL(π ‖ π_ref).", figures.reward_vs_kl(methods, curves, folder / "reward_vs_kl.png"))])


def rouge_length(methods) -> Section | None:
    """ROUGE against the human summaries and answer length: where reward hacking would show."""
    if "rougeL" not in methods:
        return None
    columns = ["method", "reward", "rouge1", "rouge2", "rougeL", "rougeL_se", "words", "words_se", "flag"]
    table = methods[[c for c in columns if c in methods]].copy()
    flagged = table[table["flag"].fillna("") != ""]["method"].tolist() if "flag" in table else []
    verdict = (f"Flagged as possible reward hacking: {', '.join(flagged)}." if flagged else
               "No method's reward rose while its ROUGE-L fell or its answers grew beyond their intervals.")
    return Section("ROUGE and length against the human summaries", [
        "ROUGE-1/2/L F1 of each served answer against the task's reference summary (stemmed); words per "
        "answer. A reward that climbs while ROUGE-L falls or answers grow is the signature of reward hacking.",
        verdict], [("", table)])


def benchmark_section(runs: Runs) -> Section | None:
    """lm-eval scores, one row per task and metric, one column per method (with the reward that chose
    each Best-of-N answer in its name)."""
    import pandas as pd

    if not runs.benchmarks:
        return None
    frame = pd.concat([f for _, f in runs.benchmarks], ignore_index=True)
    label = frame["method"].astype(str)
    bon = frame["n"] > 1
    label = label.where(~bon, label + " (reward: " + frame["reward"].astype(str) + ")")
    frame = frame.assign(column=label, cell=[f"{v:.3f}" + (f" ± {e:.3f}" if e == e else "")
                                             for v, e in zip(frame["value"], frame["stderr"])])
    table = frame.pivot_table(index=["task", "metric"], columns="column", values="cell", aggfunc="first")
    table = table.reset_index()
    table.columns.name = None
    return Section("Benchmarks (lm-eval)", [
        "Scores ± lm-eval's standard error. The reference and policy columns decode as each task says "
        "(the shipped generation tasks: greedy); Best-of-N columns sample their candidates at temperature 1, "
        "so bon-1 is one plain sample and bon-N - bon-1 is what the selection adds. A Best-of-N column names "
        "the reward that chose its answers: a summary reward is the wrong judge for short answers, and the "
        "table shows what that costs."], [("", table)])


def judge_section(runs: Runs) -> Section | None:
    import pandas as pd

    if not runs.judge:
        return None
    frame = pd.concat([f for _, f in runs.judge], ignore_index=True)
    columns = ["method_a", "method_b", "judge", "judged", "win_rate", "win_low", "win_high", "lc_win_rate",
               "lc_low", "lc_high", "position_bias", "mean_len_a", "mean_len_b"]
    notes = sorted({n for n in frame.get("note", pd.Series(dtype=str)).fillna("") if n})
    return Section("Side-by-side (LLM judge)", [
        "Each pair judged in both orders (position bias cancelled); win rate of A over B with a bootstrap "
        "interval; the length-controlled win rate is AlpacaEval's GLM read at zero length difference.", *notes],
        [("", frame[[c for c in columns if c in frame]])])


# -- the default comparison ----------------------------------------------------------------------


def find_policies(runs: Path) -> list[Path]:
    """Every ``distill`` output under ``runs``: ``runs/<run>/policy`` holding a model or a LoRA adapter."""
    from bonbench.models import is_model_folder

    return sorted(p for p in runs.glob("*/policy") if is_model_folder(p))


def default_comparison(cfg: ReportConfig) -> list[Path]:
    """Run the default comparison (each step resumes from its folder); return the folders to report."""
    import pandas as pd

    from evals import benchmarks, judge, xsum

    runs = Path(cfg.runs)
    policies = find_policies(runs)
    out = runs / "evals"
    log.info("default comparison in %s/ with %d polic%s: %s", out, len(policies), "y" if len(policies) == 1 else "ies",
             ", ".join(map(str, policies)) or "none (train one with python -m distill.jbond)")
    xsum_dir = out / "xsum"
    xsum.run(xsum.XsumConfig(model=cfg.model, reward_model=cfg.reward_model, limit=cfg.limit,
                             policy=[str(p) for p in policies], out=str(xsum_dir)))
    answers = str(xsum_dir / "answers.parquet")
    pairs = [("BoN-4", "reference")]  # the judge's own check: Best-of-4 should beat one sample
    summary = pd.read_parquet(xsum_dir / "summary.parquet")
    pairs += [(m, "reference") for m in summary.loc[summary["kind"] == "policy", "method"]]
    judge_dirs = []
    for a, b in pairs:
        folder = out / "judge" / f"{a.replace(':', '-')}-vs-{b}"
        judge.run(judge.JudgeConfig(a=answers, a_method=a, b=answers, b_method=b, out=str(folder),
                                    judge_base_url=cfg.judge_base_url, judge_model=cfg.judge_model))
        judge_dirs.append(folder)
    bench_dir = out / "benchmarks"
    benchmarks.run(benchmarks.BenchmarkConfig(model=cfg.model, reward_model=cfg.reward_model, bon_n=[1, 4],
                                              policies=[str(p) for p in policies], limit=cfg.bench_limit,
                                              out=str(bench_dir)))
    distill_runs = [p.parent for p in policies if (p.parent / "metrics.jsonl").exists()]
    return [xsum_dir, *judge_dirs, bench_dir, *distill_runs]


def build(cfg: ReportConfig, folders: list[Path]) -> tuple[Path, Path]:
    """Build the report from run folders; return the paths of report.md and report.html."""
    runs = load_runs(folders)
    folder = Path(cfg.reports) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    methods = _methods(runs)
    if methods is not None:
        methods.to_csv(folder / "methods.csv", index=False)
        sections += [headline(methods, folder), reward_kl(methods, runs, folder)]
        sections.append(rouge_length(methods))
    sections += [benchmark_section(runs), judge_section(runs)]
    sections = [s for s in sections if s is not None]
    sources = Section("Where the numbers come from", [f"`{f}`" for f in folders])
    sections.append(sources)
    md, page = write_report(folder, cfg.title, sections)
    print(f"report: {md}\n        {page}")
    return md, page


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ReportConfig, argv, prog="python -m evals.report",
                       description="Best-of-N against distilled policies: one report with tables and plots.")
    setup_logging(cfg.log_level)
    folders = [Path(f) for f in cfg.from_runs] or default_comparison(cfg)
    build(cfg, folders)


if __name__ == "__main__":
    run_command(main)
