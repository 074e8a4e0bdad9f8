"""Read run folders into the report's normalised tables.

A run folder is recognised by what it holds, never by its name:

* ``evals.xsum`` or ``bonbench measure``: ``run.json`` and ``summary.parquet`` with a ``method``
  column (one row per method: ``BoN-N``, ``policy:<slug>``, and with xsum ``reference``);
* ``evals.benchmarks``: ``benchmarks.parquet`` with ``task``, ``metric`` and ``value`` columns;
* ``evals.judge``: ``summary.parquet`` with an ``lc_win_rate`` column;
* a ``distill`` run: ``metrics.jsonl`` (its ``eval/*`` rows are the training curve) and ``config.json``.

Every loader returns a pandas DataFrame; ``load_runs`` sorts the folders into a ``Runs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonbench.errors import UserError

METHOD_COLUMNS = ["method", "kind", "n", "prompts", "tokens_per_answer", "seconds_per_answer", "reward", "reward_se",
                  "win_rate", "win_low", "win_high", "kl", "kl_kind"]


class NotARunFolder(UserError, ValueError):
    """A folder given to the report holds none of the tables it reads."""


@dataclass
class Runs:
    methods: list = field(default_factory=list)  # (folder, DataFrame of METHOD_COLUMNS + extras)
    benchmarks: list = field(default_factory=list)
    judge: list = field(default_factory=list)
    curves: list = field(default_factory=list)  # (folder, DataFrame: run, step, kl, reward, win_rate)


def _kind(method: str) -> str:
    if method.startswith("BoN-"):
        return "bon"
    if method.startswith("policy:"):
        return "policy"
    return "reference"


def method_table(folder: Path):
    """The per-method summary of an ``evals.xsum`` or ``bonbench measure`` folder, normalised."""
    import pandas as pd

    frame = pd.read_parquet(folder / "summary.parquet")
    if "kind" not in frame:
        frame["kind"] = frame["method"].map(_kind)
    if "tokens_per_answer" not in frame:  # bonbench measure's names
        frame["tokens_per_answer"] = frame["tokens_per_request"]
        frame["seconds_per_answer"] = frame["seconds_per_request"]
    if "kl" not in frame:
        measured = frame["kl_measured"] if "kl_measured" in frame else np.nan
        analytic = frame["kl_analytic"] if "kl_analytic" in frame else np.nan
        frame["kl"] = np.where(frame["kind"] == "bon", analytic, measured)
        frame["kl_kind"] = np.where(frame["kind"] == "bon", "analytic", "measured")
    missing = [c for c in METHOD_COLUMNS if c not in frame]
    if missing:
        raise NotARunFolder(f"{folder}/summary.parquet lacks the column(s) {missing}")
    return frame


def curve_table(folder: Path):
    """The ``eval/*`` rows of a distill run's ``metrics.jsonl``: step, KL to the reference, reward."""
    import pandas as pd

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/reward" in r]
    frame = pd.DataFrame({"step": [r["step"] for r in evals], "kl": [r.get("eval/kl_ref", np.nan) for r in evals],
                          "reward": [r["eval/reward"] for r in evals],
                          "win_rate": [r.get("eval/win_rate", np.nan) for r in evals]})
    frame.insert(0, "run", folder.name)
    return frame


def load_runs(folders: list[Path]) -> Runs:
    """Sort run folders by what they hold; a folder that holds nothing the report reads is an error."""
    import pandas as pd

    runs = Runs()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise NotARunFolder(f"{folder} is not a folder")
        found = False
        summary = folder / "summary.parquet"
        if summary.exists():
            columns = pd.read_parquet(summary).columns
            if "lc_win_rate" in columns:
                runs.judge.append((folder, pd.read_parquet(summary)))
                found = True
            elif "method" in columns:
                runs.methods.append((folder, method_table(folder)))
                found = True
        if (folder / "benchmarks.parquet").exists():
            runs.benchmarks.append((folder, pd.read_parquet(folder / "benchmarks.parquet")))
            found = True
        if (folder / "metrics.jsonl").exists():
            runs.curves.append((folder, curve_table(folder)))
            found = True
        if not found:
            raise NotARunFolder(f"{folder} holds no table the report reads (summary.parquet of evals.xsum, "
                                "bonbench measure or evals.judge, benchmarks.parquet of evals.benchmarks, or a "
                                "distill run's metrics.jsonl)")
    return runs


def bon_curve(methods):
    """Best-of-N's rows sorted by N, the reference sample (Best-of-1) included."""
    return methods[methods["kind"].isin(["bon", "reference"])].sort_values("n")


def matched_n(ns, values, value: float) -> float | None:
    """The N at which Best-of-N's curve reaches ``value``, interpolated linearly in log N.

    ``ns`` increasing, ``values`` Best-of-N's metric at each (non-decreasing in N up to noise: the
    running maximum is used so that a noisy dip cannot make the answer ambiguous). ``None`` when
    ``value`` is below Best-of-``ns[0]`` or above Best-of-``ns[-1]``.
    """
    ns, values = np.asarray(ns, dtype=float), np.maximum.accumulate(np.asarray(values, dtype=float))
    if len(ns) == 0 or value < values[0] or value > values[-1]:
        return None
    index = int(np.searchsorted(values, value, side="left"))
    if values[index] == value or index == 0:
        return float(ns[index])
    lo, hi = values[index - 1], values[index]
    t = (value - lo) / (hi - lo)
    return float(np.exp2((1 - t) * np.log2(ns[index - 1]) + t * np.log2(ns[index])))
