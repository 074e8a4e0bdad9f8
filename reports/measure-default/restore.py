"""Restore the working copy of this measurement from the committed tables, so that new policies can
be measured against the same reference pool without drawing it again (about 22 min).

    python reports/measure-default/restore.py runs/measure-default
    python -m bonbench measure --out runs/measure-default --split test --limit 40 --ns 1 2 4 8 \
        --k 16 --max-tokens 48 --policy runs/<folder>/policy

It writes ``OUT/samples/prompt-<index>.parquet`` (the pool), ``OUT/samples/policy-<slug>/…`` (each
policy measured here) and ``OUT/run.json``, exactly as ``bonbench measure`` stores them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from bonbench.samplestore import SampleStore  # noqa: E402


def restore(out: Path) -> int:
    if (out / "run.json").exists():
        raise SystemExit(f"{out} already holds a run; choose an empty folder")
    samples = pd.read_parquet(HERE / "samples.parquet")
    store = SampleStore(out)
    for (index, policy), frame in samples.groupby(["prompt_index", "policy"], sort=True):
        store.write(frame.reset_index(drop=True), int(index), store.policy_method(policy) if policy else "")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "run.json", out / "run.json")
    return samples["prompt_index"].nunique()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/measure-default")
    print(f"restored {restore(target)} prompts into {target}")
