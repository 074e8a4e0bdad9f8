"""Kill the default J-BOND run with SIGKILL mid-step and between steps, resume it, and compare it with
an uninterrupted run of the same configuration (issue 13, faults).

    python reports/jbond-default/kill_resume.py [--steps 6] [--work runs/kill-resume]

Both runs use the default configuration (embedded model, default reward, 8 prompts a step) with
``--steps`` steps, a checkpoint every 2 steps and one evaluation at the end on 8 test prompts. The
interrupted run is killed (1) halfway through step 4, after the checkpoint of step 2, so it must
redo steps 3 and 4, and (2) right after the checkpoint of step 4 is written, between steps. Writes
``reports/jbond-default/kill-resume.md``: every logged number of both runs side by side and the
largest difference between the two final adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMING = ("_s", "lr")  # keys that measure time (or are the schedule): not compared


def command(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "distill.jbond", "--steps", str(steps), "--save-every", "2",
            "--eval-every", str(steps), "--eval-prompts", "8", "--out", str(out), "--log-level", "warning"]


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def checkpoint_step(out: Path) -> int:
    meta = out / "checkpoint" / "state.pt"
    if not meta.exists():
        return 0
    import torch

    try:
        return int(torch.load(meta, weights_only=False)["step"])
    except Exception:  # being renamed or written right now: look again in half a second
        return 0


def run_until(out: Path, steps: int, kill_when, log) -> None:
    """Start the run; SIGKILL it as soon as ``kill_when(out)`` is true (or let it finish if None)."""
    with open(log, "a") as sink:
        proc = subprocess.Popen(command(out, steps), stdout=sink, stderr=sink)
        while proc.poll() is None:
            if kill_when is not None and kill_when(out):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                print(f"killed at: {[r['step'] for r in rows(out) if 'loss' in r]} steps logged, "
                      f"checkpoint at step {checkpoint_step(out)}", flush=True)
                return
            time.sleep(0.5)
    if proc.returncode:
        raise SystemExit(f"the run in {out} failed (exit {proc.returncode}); see {log}")


def mid_step(after: int):
    """True halfway through step ``after + 1`` (half of step ``after``'s time after it was logged)."""
    state: dict = {}

    def check(out: Path) -> bool:
        done = [r for r in rows(out) if r["step"] == after and "step_s" in r]
        if not done:
            return False
        state.setdefault("seen", time.monotonic())
        return time.monotonic() - state["seen"] > done[0]["step_s"] / 2

    return check


def after_checkpoint(step: int):
    return lambda out: checkpoint_step(out) == step


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa = load_file(str(next((a / "policy").rglob("adapter_model.safetensors"))))
    wb = load_file(str(next((b / "policy").rglob("adapter_model.safetensors"))))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def compare(full: list[dict], resumed: list[dict]) -> tuple[list[str], float]:
    lines, worst = [], 0.0
    lines.append("| step | metric | uninterrupted | killed twice and resumed | difference |")
    lines.append("|---|---|---|---|---|")
    for a, b in zip(full, resumed, strict=True):
        assert a["step"] == b["step"]
        for key in a:
            if key == "step" or key.endswith(TIMING) or not isinstance(a[key], (int, float)):
                continue
            diff = abs(a[key] - b[key])
            worst = max(worst, diff)
            lines.append(f"| {a['step']} | {key} | {a[key]:.6g} | {b[key]:.6g} | {diff:.2g} |")
    return lines, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", default="runs/kill-resume")
    args = parser.parse_args()
    work = Path(args.work)
    full, killed = work / "uninterrupted", work / "killed"
    log = work / "runs.log"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not (full / "policy").exists():
        run_until(full, args.steps, None, log)
    first = time.time()
    if not (killed / "policy").exists():
        run_until(killed, args.steps, mid_step(3), log)  # mid step 4; the checkpoint holds step 2
        run_until(killed, args.steps, after_checkpoint(4), log)  # between steps 4 and 5
        run_until(killed, args.steps, None, log)
    table, worst = compare(rows(full), rows(killed))
    weights = adapter_difference(full, killed)
    report = [
        "# Kill and resume on the default J-BOND run",
        "",
        f"`python reports/jbond-default/kill_resume.py --steps {args.steps}` on {time.strftime('%Y-%m-%d')}: the default",
        f"configuration with {args.steps} steps, a checkpoint every 2 steps and an evaluation on 8 test prompts at the",
        "end, run once uninterrupted and once killed with SIGKILL twice: halfway through step 4 (the last",
        "checkpoint then held step 2, so steps 3 and 4 were redone) and right after the checkpoint of",
        "step 4 was written, then resumed to the end. Timing columns are left out (they differ by design).",
        "",
        f"- largest difference over every logged number: **{worst:.3g}**",
        f"- largest difference between the two final LoRA adapters' weights: **{weights:.3g}**",
        f"- wall time: uninterrupted {first - started:.0f} s, interrupted and resumed {time.time() - first:.0f} s "
        "(0 s when a run was already there)",
        "",
        *table,
        "",
    ]
    out = Path(__file__).with_name("kill-resume.md")
    out.write_text("\n".join(report))
    print("\n".join(report[:12]))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
