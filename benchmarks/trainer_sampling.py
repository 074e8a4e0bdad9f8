"""A trainer's sampling call, computed the ways the engine has computed it, side by side in one process.

A trainer with LoRA on the top layers (``distill``'s default: the top 8 of the embedded model's 30)
samples each prompt under two adapters: J-BOND draws the policy (with a shadow row that scores under
the anchor) and the anchor; RLOO and BOND draw the policy with a shadow row under the reference.
Each way below restores one earlier state of the engine for the length of its calls:

  now                 the engine as it is;
  peft-adapters       the adapters' rows through PEFT's ``adapter_names`` (a loop over the adapters in
                      every LoRA layer) instead of the stacked factors of ``bonbench.backends.lora_stack``;
  explicit-attention  the decoding attention as explicit products, a log-sum-exp and a softmax over the
                      whole score matrix (``shared_prefix._attend_explicit``, the engine before stop 25)
                      instead of torch's fused CPU kernel;
  trunk-per-adapter   every adapter's prefill runs the layers below the adapters too
                      (before ``bonbench.backends.trunk``);
  sampler             the ceiling: bonbench's sampler on the policy alone, as many drawn rows per prompt
                      as the draw has (no shadow rows, no second adapter).

The ways run interleaved ``--repeats`` times on the very generator ``distill`` builds
(``TransformersGenerator`` over ``Policies``, the frozen trunk in bf16 where ``--precision auto``
picks it); the draws of every way but ``sampler`` are checked against ``now``'s.

    python benchmarks/trainer_sampling.py                          # embedded SmolLM2-135M, 8 prompts, <= 40 tokens
    python benchmarks/trainer_sampling.py --ways trunk-per-adapter now --max-tokens 1   # the prefill alone

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
from unittest.mock import patch  # restores one earlier engine function for a way's calls

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bonbench  # noqa: E402, F401  (before torch: it sets OMP_WAIT_POLICY)
import torch  # noqa: E402

from bonbench.cli import run_command  # noqa: E402
from bonbench.config import option, parse_config  # noqa: E402

WAYS = ("explicit-attention", "peft-adapters", "now", "sampler", "trunk-per-adapter")


@dataclass
class SamplingBenchConfig:
    model: str = option("default", "policy: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or folder")
    prompts: int = option(8, "train prompts of the default task per call (a default step's batch)")
    max_tokens: int = option(40, "most tokens per answer (1: the prefill alone)")
    lora_top_layers: int = option(8, "LoRA on the top L layers (distill's default)")
    precision: str = option("auto", "distill's --precision: auto (bf16 trunk where the CPU computes bf16), fp32, bf16")
    ways: list[str] = option(["explicit-attention", "now", "sampler"],
                             f"what to time, interleaved: any of {', '.join(WAYS)}")
    draws: list[str] = option(["jbond", "rloo"], "which trainer's draw: jbond, rloo")
    repeats: int = option(3, "timed calls per way and draw, interleaved")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    out: str = option("trainer-sampling", "report name: writes reports/bench/<out>.md and .json")

    def __post_init__(self) -> None:
        unknown = [w for w in self.ways if w not in WAYS] + [d for d in self.draws if d not in ("jbond", "rloo")]
        if unknown:
            raise ValueError(f"unknown ways or draws {unknown}: ways are {', '.join(WAYS)}; draws jbond, rloo")


def _draws():
    from distill.policy import Draw

    return {"jbond": ("J-BOND (policy 1 + anchor shadow, anchor 2)",
                      [Draw("policy", 1, 11, score_under=("anchor",)), Draw("anchor", 2, 12)]),
            "rloo": ("RLOO (policy 2 + reference shadows)", [Draw("policy", 2, 13, score_under=("ref",))])}


@contextlib.contextmanager
def _no_stack(model, adapters):
    yield False


def _way(name: str) -> contextlib.AbstractContextManager:
    import bonbench.backends.engine as engine
    import bonbench.backends.prefill as prefill
    import bonbench.backends.shared_prefix as shared_prefix

    ways = {"peft-adapters": [(prefill, "stacked_adapters", _no_stack)],
            "explicit-attention": [(shared_prefix, "_attend", shared_prefix._attend_explicit)],
            "trunk-per-adapter": [(engine, "first_adapted_layer", lambda model: 0)]}
    stack = contextlib.ExitStack()
    for module, attr, value in ways.get(name, []):
        stack.enter_context(patch.object(module, attr, value))
    return stack


def _sampler_alone(policies, prompts, draws, max_tokens: int):
    """The policy alone drawing as many rows per prompt as ``draws`` draw (their shadows left out)."""
    from bonbench.backends.base import SamplingParams
    from bonbench.backends.sampling import SampleRequest, sample

    n = sum(d.n for d in draws)
    requests = [SampleRequest(list(p), SamplingParams(n=n, max_tokens=max_tokens, seed=100 + i))
                for i, p in enumerate(prompts)]
    return [sample(policies.model, policies.tokenizer, requests, policies.eos, keep_tokens=False)]


def _time_draw(cfg, generator, policies, prompts, draws) -> dict:
    times: dict[str, list[float]] = {w: [] for w in cfg.ways}
    tokens: dict[str, list] = {}
    with torch.no_grad():  # warm-up, untimed: the first call of a process pays for one-off set-up
        generator.generate(prompts, draws, cfg.max_tokens)
    for _ in range(cfg.repeats):
        for way in cfg.ways:
            with _way(way), torch.no_grad():
                started = time.perf_counter()
                if way == "sampler":
                    out = _sampler_alone(policies, prompts, draws, cfg.max_tokens)
                else:
                    out = generator.generate(prompts, draws, cfg.max_tokens)
                times[way].append(time.perf_counter() - started)
            tokens[way] = [c.token_ids for per_draw in out for row in per_draw for c in row]
    median = {w: statistics.median(t) for w, t in times.items()}
    generated = {w: sum(len(t) for t in tokens[w]) for w in cfg.ways}
    return {"seconds": times, "median_s": median, "generated_tokens": generated,
            "tokens_per_s": {w: generated[w] / median[w] for w in cfg.ways},
            "same_draws_as_now": {w: tokens[w] == tokens["now"] for w in cfg.ways
                                  if w != "sampler" and "now" in tokens}}


def main(argv: list[str] | None = None) -> None:
    import platform

    from bonbench.backends.transformers import load_causal_lm
    from bonbench.models import resolve_policy
    from distill.config import TrainConfig
    from distill.loop import load_prompts
    from distill.policy import Policies
    from distill.precision import resolve_precision
    from distill.transformers_generation import TransformersGenerator

    cfg = parse_config(SamplingBenchConfig, argv, prog="python benchmarks/trainer_sampling.py",
                       description=__doc__.split("\n\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), "float32", "cpu")
    precision = resolve_precision(cfg.precision, "cpu")
    policies = Policies(model, tokenizer, lora=True, lora_top_layers=cfg.lora_top_layers, with_anchor=True,
                        precision=precision)
    with torch.no_grad():  # trained-looking adapters: LoRA's B starts at zero, which would hide the adapters' cost
        for name, p in policies.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    generator = TransformersGenerator(policies.role_modules(), tokenizer, policies.eos)
    prompts = load_prompts(TrainConfig(), tokenizer, "train", cfg.prompts).ids
    results: dict = {}
    for key in cfg.draws:
        name, draws = _draws()[key]
        results[name] = _time_draw(cfg, generator, policies, prompts, draws)
        print(name, json.dumps(results[name]["median_s"]), flush=True)
    machine = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
               f"threads, precision {precision} (--precision {cfg.precision}, {policies.bf16_layers} layers in bf16)")
    report = _table(cfg, results, machine)
    print(report)
    folder = REPO / "reports" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{cfg.out}.md").write_text(report)
    (folder / f"{cfg.out}.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2) + "\n")


def _table(cfg: SamplingBenchConfig, results: dict, machine: str) -> str:
    first = cfg.ways[0]
    lines = [f"# A trainer's sampling call: {cfg.model}, LoRA on the top {cfg.lora_top_layers} layers, "
             f"{cfg.prompts} prompts, <= {cfg.max_tokens} tokens", "", f"Machine: {machine}. Median of "
             f"{cfg.repeats} interleaved calls per way (`benchmarks/trainer_sampling.py`; the ways are in its "
             f"docstring). Generated tokens leave out shadow rows.", "",
             f"| draw | way | s per call | generated tokens | tokens/s | time / {first}'s | same draws as now |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for way in cfg.ways:
            same = r["same_draws_as_now"].get(way)
            lines.append(f"| {name} | {way} | {r['median_s'][way]:.2f} | {r['generated_tokens'][way]} | "
                         f"{r['tokens_per_s'][way]:.1f} | {r['median_s'][way] / r['median_s'][first]:.2f}x | "
                         f"{'' if same is None else 'yes' if same else 'NO'} |")
    lines.append("")
    for name, r in results.items():
        tps = r["tokens_per_s"]
        if "now" in tps and "sampler" in tps:
            lines.append(f"- {name}: sampling now at {tps['now'] / tps['sampler']:.2f}x the sampler's tokens/s alone "
                         f"(issue 13's target: >= 0.8x)")
        for way in (w for w in cfg.ways if w not in ("now", "sampler")):
            if "now" in tps:
                lines.append(f"- {name}: now {r['median_s'][way] / r['median_s']['now']:.2f}x faster than {way}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_command(main)
