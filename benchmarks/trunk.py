"""A trainer's sampling call with the frozen trunk run once per prompt, against once per adapter.

With LoRA on the top layers (``distill``'s default: the top 8 of the embedded model's 30), a
trainer samples each prompt under two adapters: J-BOND draws the policy (with a shadow row that
scores under the anchor) and the anchor; RLOO and BOND draw the policy with a shadow row under the
reference. ``bonbench.backends.trunk`` runs the layers below the adapters once per prompt
(``shared``); before it, each adapter's prefill ran them again (``per adapter``). Both are timed
here in one process, interleaved ``--repeats`` times, on the very generator ``distill`` builds
(``TransformersGenerator`` over ``Policies``), and the draws of the two are checked to be the same.

    python benchmarks/trunk.py                       # embedded SmolLM2-135M, 8 train prompts, <= 40 tokens
    python benchmarks/trunk.py --max-tokens 1        # the prefill alone

The table is printed and written to ``reports/bench/<--out>.md`` (raw numbers in ``.json``).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bonbench  # noqa: E402, F401  (before torch: it sets OMP_WAIT_POLICY)
import torch  # noqa: E402

from bonbench.cli import run_command  # noqa: E402
from bonbench.config import option, parse_config  # noqa: E402


@dataclass
class TrunkBenchConfig:
    model: str = option("default", "policy: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or folder")
    prompts: int = option(8, "train prompts of the default task per call (a default step's batch)")
    max_tokens: int = option(40, "most tokens per answer (1: the prefill alone)")
    lora_top_layers: int = option(8, "LoRA on the top L layers (distill's default)")
    repeats: int = option(3, "timed calls per way and draw, interleaved")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    out: str = option("trunk", "report name: writes reports/bench/<out>.md and .json")


def _draws():
    from distill.policy import Draw

    return {"J-BOND (policy 1 + anchor shadow, anchor 2)": [Draw("policy", 1, 11, score_under=("anchor",)),
                                                            Draw("anchor", 2, 12)],
            "RLOO (policy 2 + reference shadows)": [Draw("policy", 2, 13, score_under=("ref",))]}


@contextlib.contextmanager
def per_adapter():
    """The engine as it was before the shared trunk: every adapter's prefill runs every layer."""
    import bonbench.backends.engine as engine

    shared = engine.first_adapted_layer
    engine.first_adapted_layer = lambda model: 0
    try:
        yield
    finally:
        engine.first_adapted_layer = shared


def main(argv: list[str] | None = None) -> None:
    import platform

    from bonbench.backends.transformers import load_causal_lm
    from bonbench.models import resolve_policy
    from distill.config import TrainConfig
    from distill.loop import load_prompts
    from distill.policy import Policies
    from distill.transformers_generation import TransformersGenerator

    cfg = parse_config(TrunkBenchConfig, argv, prog="python benchmarks/trunk.py", description=__doc__.split("\n\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), "float32", "cpu")
    policies = Policies(model, tokenizer, lora=True, lora_top_layers=cfg.lora_top_layers, with_anchor=True)
    generator = TransformersGenerator(policies.role_modules(), tokenizer, policies.eos)
    prompts = load_prompts(TrainConfig(), tokenizer, "train", cfg.prompts).ids
    ways = {"per adapter": per_adapter, "shared": contextlib.nullcontext}
    results: dict = {}
    for name, draws in _draws().items():
        times: dict[str, list[float]] = {w: [] for w in ways}
        tokens: dict[str, list] = {}
        for _ in range(cfg.repeats):
            for way, context in ways.items():
                with context():
                    started = time.perf_counter()
                    out = generator.generate(prompts, draws, cfg.max_tokens)
                    times[way].append(time.perf_counter() - started)
                tokens[way] = [c.token_ids for per_draw in out for row in per_draw for c in row]
        generated = sum(len(t) for t in tokens["shared"])
        results[name] = {"seconds": times, "median_s": {w: statistics.median(t) for w, t in times.items()},
                         "same_draws": tokens["shared"] == tokens["per adapter"], "generated_tokens": generated}
        print(name, json.dumps(results[name]["median_s"]), flush=True)
    report = _table(cfg, results, f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                                  f"{torch.get_num_threads()} threads, fp32")
    print(report)
    folder = REPO / "reports" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{cfg.out}.md").write_text(report)
    (folder / f"{cfg.out}.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2) + "\n")


def _table(cfg: TrunkBenchConfig, results: dict, machine: str) -> str:
    lines = [f"# Sampling with the frozen trunk shared: {cfg.model}, LoRA on the top {cfg.lora_top_layers} layers, "
             f"{cfg.prompts} prompts, <= {cfg.max_tokens} tokens", "", f"Machine: {machine}. Median of "
             f"{cfg.repeats} interleaved calls each.", "",
             "| draw | generated tokens | per adapter, s | shared, s | shared / per adapter | same draws |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        a, b = r["median_s"]["per adapter"], r["median_s"]["shared"]
        lines.append(f"| {name} | {r['generated_tokens']} | {a:.2f} | {b:.2f} | {b / a:.2f}x the time | "
                     f"{'yes' if r['same_draws'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_command(main)
