"""Every distillation method on one budget, measured against Best-of-N on one reference pool.

    python reports/measure-default/restore.py runs/measure-default     # once: the stored pool
    python reports/methods/run.py                                      # train + measure what is missing
    python reports/methods/run.py --report                             # only the tables and the figure

The budget: each method trains for the same 12 optimiser steps of the same 8 training prompts
(``--steps 12``, the recipes' defaults otherwise: LoRA r16 on the top 8 layers, <= 40 tokens,
seed 0, each recipe's own learning rate), with no in-run evaluation. Methods differ in how many
answers they draw per prompt (``SAMPLES``), so the wall time differs and is reported beside each row.
Each trained policy then draws 4 answers on the 40 test prompts of ``runs/measure-default`` (the
pool committed in ``reports/measure-default``): its reward, win rate against the reference and
measured KL come from ``bonbench measure``, against the same references as Best-of-N's rows.

On a 2-core CPU one torch thread does nearly as much as two (36 against 40 tokens/s, sampling the
embedded model in fp32 on an AVX2 machine), so two lanes with ``--threads 1`` finish a sweep sooner
than one. A lane waits for a method that another lane is training, then skips it; ``bonbench
measure`` runs one at a time across lanes (a lock file), since every lane adds its policies to one
pool folder. The wall times are then those of one thread beside another run.

Both steps are resumable: a method whose ``runs/methods/<name>/policy`` exists is not trained
again, and ``bonbench measure`` draws only the samples it lacks. The report (``report.py``) writes
``README.md``, ``methods.csv`` and ``reward_vs_kl.png`` here.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = Path("runs/methods")
POOL = Path("runs/measure-default")
STEPS = 12
MEASURE = ["--split", "test", "--limit", "40", "--ns", "1", "2", "4", "8", "--k", "16", "--max-tokens", "48"]

CACHE = ["--reference-cache", str(RUNS / "reference-cache")]  # the BOND runs draw one set of reference samples

# name -> (module, arguments, answers drawn per prompt per step)
METHODS: dict[str, tuple[str, list[str], int]] = {
    "jbond": ("distill.jbond", [], 3),
    "rloo-b0.01": ("distill.rloo", ["--beta-rl", "0.01"], 2),
    "rloo-b0.1": ("distill.rloo", ["--beta-rl", "0.1"], 2),
    "iterative-bond": ("distill.bond", ["--config", "distill/configs/iterative_bond.yaml"], 6),
    "bond-n4-b0.5": ("distill.bond", ["--n", "4", "--beta", "0.5", *CACHE], 10),
    "bond-n8-b0.5": ("distill.bond", ["--n", "8", "--beta", "0.5", *CACHE], 10),
    "bonbon": ("distill.bonbon", CACHE, 8),
    "bond-n8-b0": ("distill.bond", ["--n", "8", "--beta", "0", *CACHE], 8),
    "bond-n8-b1": ("distill.bond", ["--n", "8", "--beta", "1", *CACHE], 10),
    "bond-n4-b0": ("distill.bond", ["--n", "4", "--beta", "0", *CACHE], 8),
    "bond-n4-b1": ("distill.bond", ["--n", "4", "--beta", "1", *CACHE], 10),
}


def train(name: str, threads: list[str]) -> None:
    module, args, _ = METHODS[name]
    out = RUNS / name
    command = [sys.executable, "-m", module, *args, "--steps", str(STEPS), "--eval-prompts", "0", "--out", str(out),
               *threads]
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a lane already training this method: wait for it, then skip
        if (out / "policy").exists():
            return
        print("+", " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        (out / "wall.json").write_text(json.dumps({"seconds": wall, "command": command[1:]}) + "\n")


def measure(name: str, threads: list[str]) -> None:
    command = [sys.executable, "-m", "bonbench", "measure", "--out", str(POOL), *MEASURE,
               "--policy", str(RUNS / name / "policy"), *threads]
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / "measure.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one measurement at a time: they share the pool's run.json
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per job (0: torch's default)")
    parser.add_argument("--report", action="store_true", help="write the report from what is measured; train nothing")
    args = parser.parse_args()
    os.chdir(REPO)
    if not (POOL / "run.json").exists():
        raise SystemExit(f"{POOL} holds no pool: python reports/measure-default/restore.py {POOL}")
    if not args.report:
        threads = ["--threads", str(args.threads)] if args.threads else []
        for name in args.only:
            train(name, threads)
            measure(name, threads)
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)


if __name__ == "__main__":
    main()
