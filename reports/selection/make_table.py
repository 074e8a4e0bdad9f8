"""The selection table from an ``evals.benchmarks`` run folder: exact match per Best-of-N row with a
95% bootstrap interval over questions, and the paired difference from Best-of-1 on the same questions.

    python -m reports.selection.make_table RUN_FOLDER [OUT]        # from the repository root
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from evals.metrics import bootstrap_interval


def per_question(run: Path) -> pd.DataFrame:
    """One column per Best-of-N row (method and the reward column's label), one row per question."""
    columns = {}
    for raw in sorted((run / "raw").glob("*/*.json")):
        meta = json.loads(raw.read_text())["bonbench"]
        samples = run / "samples" / raw.parent.name / f"{raw.stem}.jsonl"
        scores = {json.loads(line)["doc"]["id"]: json.loads(line)["exact_match"]
                  for line in samples.read_text().splitlines()}
        columns[(meta["method"], meta["reward"] or "greedy (lm-eval hf)")] = pd.Series(scores)
    return pd.DataFrame(columns)


def table(em: pd.DataFrame, baseline: tuple[str, str]) -> pd.DataFrame:
    base = em[baseline].to_numpy()
    rows = []
    for (method, rule), column in em.items():
        y = column.to_numpy()
        diff = y - base
        low, high = bootstrap_interval(lambda idx: float(y[idx].mean()), y.size)
        d_low, d_high = bootstrap_interval(lambda idx: float(diff[idx].mean()), y.size)
        rows.append({"method": method, "selection": rule, "questions": y.size, "exact_match": y.mean(),
                     "ci_low": low, "ci_high": high, "vs_bon1": diff.mean(), "vs_bon1_low": d_low,
                     "vs_bon1_high": d_high, "better": int((diff > 0).sum()), "worse": int((diff < 0).sum())})
    t = pd.DataFrame(rows)  # the reference first, then Best-of-N by N
    t["_n"] = t["method"].map(lambda m: int(m.split("-")[-1]) if m.startswith("bon-") else 0)
    return t.sort_values(["_n", "selection"]).drop(columns="_n").reset_index(drop=True)


def markdown(t: pd.DataFrame) -> str:
    lines = ["| method | selection | questions | exact match [95% CI] | minus Best-of-1 [95% CI] | better / worse |",
             "|---|---|---|---|---|---|"]
    for r in t.itertuples():
        lines.append(f"| {r.method} | {r.selection} | {r.questions} | {r.exact_match:.3f} [{r.ci_low:.3f}, "
                     f"{r.ci_high:.3f}] | {r.vs_bon1:+.3f} [{r.vs_bon1_low:+.3f}, {r.vs_bon1_high:+.3f}] | "
                     f"{r.better} / {r.worse} |")
    return "\n".join(lines) + "\n"


def main(run: str, out: str = "reports/selection") -> None:
    em = per_question(Path(run))
    baseline = next(key for key in em.columns if key[0] == "bon-1")
    t = table(em, baseline)
    Path(out).mkdir(parents=True, exist_ok=True)
    t.to_csv(Path(out) / "table.csv", index=False, float_format="%.4f")
    (Path(out) / "table.md").write_text(markdown(t))
    print(markdown(t))


if __name__ == "__main__":
    main(*sys.argv[1:])
