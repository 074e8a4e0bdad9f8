"""What one training step costs: TRL's RLOOTrainer against ``distill``'s trainer, and J-BOND in fp32 and bf16.

In one process, on the same model, prompts and reward, one after the other:

  trl           TRL's ``RLOOTrainer`` (the BOND paper's RL baseline): ``--prompts`` prompts x
                ``--samples`` completions of <= ``--max-tokens`` tokens per step, LoRA r``--lora-r`` on
                every linear layer of every block, beta ``--beta-rl``, sampling with ``generate``;
                TRL's defaults otherwise, gradient checkpointing included;
  trl-nogc      the same without gradient checkpointing (``distill`` does not checkpoint either);
  rloo          ``python -m distill.rloo``'s trainer with the same settings (``--lora-top-layers 0``);
  rloo-shadows  the same, its reference log-probs read by shadow rows while it samples (what the engine
                did with LoRA on every layer before stop 25) instead of a teacher-forced pass after it;
  sampler       bonbench's in-process sampler alone, on the same rows (no adapters, no training):
                the ceiling for a step's sampling;
  jbond-fp32    the default J-BOND step (``python -m distill.jbond``'s config), ``--precision fp32``;
  jbond-bf16    the same, ``--precision bf16`` (distill/precision.py: the frozen layers below the
                LoRA layers in bf16), then the sequence log-probs and policy/anchor/reference
                log-ratios of both precisions on the same answers, after the fp32 run's steps.

Each part first runs ``--warmup`` untimed steps: a process's first step pays one-off costs (the
first pass through each new shape, the allocator growing), 13 s of distill's first RLOO step and
14 s of TRL's on a 2-core CPU. Per part: seconds per step (median over ``--steps``), generated tokens
per second (every completion token the step sampled; shadow rows that only score are not
counted), and where the step's time went: sampling, reward, log-prob passes (with and without
gradient), backward, anchor update. The table goes to stdout and ``reports/bench/<--out>.md``
(raw numbers in ``.json``).

    python benchmarks/trainer_step.py                          # embedded SmolLM2-135M, CPU, ~12 min on 2 cores
    python benchmarks/trainer_step.py --parts trl trl-nogc     # TRL with its default gradient checkpointing too
    python benchmarks/trainer_step.py --model <tiny folder> --steps 2
    python benchmarks/trainer_step.py --parts rloo jbond-fp32 jbond-bf16 --device cuda
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bonbench  # noqa: E402, F401  (before torch: it sets OMP_WAIT_POLICY, without which a shared CPU crawls)
import torch  # noqa: E402

from bonbench.cli import run_command  # noqa: E402
from bonbench.config import option, parse_config  # noqa: E402

PARTS = ("trl", "trl-nogc", "rloo", "rloo-shadows", "sampler", "jbond-fp32", "jbond-bf16")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    model: str = option("default", "policy: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or folder")
    reward_model: str = option("default", "reward, as distill's --reward-model")
    device: str = option("cpu", "cpu or cuda")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    parts: list[str] = option([p for p in PARTS if p != "trl"], f"what to measure, in order: any of {', '.join(PARTS)}")
    steps: int = option(3, "timed optimiser steps per part")
    warmup: int = option(1, "untimed steps before them, per part (a process's first step pays one-off costs)")
    prompts: int = option(8, "prompts per step (RLOO: each sampled --samples times)")
    samples: int = option(2, "RLOO completions per prompt")
    max_tokens: int = option(40, "most tokens per completion")
    lora_r: int = option(16, "LoRA rank (alpha = 2r), every linear layer of every block for TRL and rloo")
    beta_rl: float = option(0.01, "RLOO's KL coefficient")
    lr: float = option(1e-4, "learning rate of both RLOO trainers")
    seed: int = option(0, "seed of the prompts' order, LoRA initialisation and sampling")
    out: str = option("trainer_step", "report name (no folder): writes reports/bench/<out>.md and .json")

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown parts {unknown}: choose from {PARTS}")
        if self.steps < 1 or self.warmup < 0 or self.prompts < 2 or self.samples < 2 or self.max_tokens < 1:
            raise ValueError("steps >= 1, warmup >= 0, prompts >= 2, samples >= 2 and max_tokens >= 1")
        if Path(self.out).name != self.out:
            raise ValueError(f"--out is a report name, written under reports/bench/; got a path {self.out!r}")


def _train_prompts(cfg: BenchConfig) -> list[list[dict]]:
    from bonbench.tasks import load_task, summary_prompt

    docs = load_task("default", "train", cfg.prompts * (cfg.warmup + cfg.steps))["document"]
    return [summary_prompt(d) for d in docs]


def _summary(step_s: list[float], tokens: list[float], split: dict[str, list[float]], warmup: int) -> dict:
    """Medians and means over the steps after the first ``warmup``."""
    step_s, tokens, split = step_s[warmup:], tokens[warmup:], {k: v[warmup:] for k, v in split.items()}
    return {"s_per_step": statistics.median(step_s), "step_s": step_s,
            "tokens_per_s": sum(tokens) / sum(step_s), "tokens_per_step": statistics.mean(tokens),
            "split": {k: statistics.mean(v) for k, v in split.items()}}


# -- TRL -----------------------------------------------------------------------------------------


def _timed(obj, name: str, into: dict[str, float], key, after=None) -> None:
    """Wrap ``obj.name`` so each call adds its seconds to ``into[key(...)]`` (``key``: a name or a function of
    nothing); ``after(result)`` sees each result."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        k = key() if callable(key) else key
        into[k] = into.get(k, 0.0) + time.perf_counter() - started
        if after is not None:
            after(out)
        return out

    setattr(obj, name, wrapper)


def bench_trl(cfg: BenchConfig, prompts: list[list[dict]], gradient_checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from bonbench.backends.transformers import load_causal_lm
    from bonbench.models import resolve_policy
    from bonbench.rewards import load_reward
    from bonbench.rewards.base import checked_scores

    reward = load_reward(cfg.reward_model, device=cfg.device)

    def reward_func(prompts, completions, **_) -> list[float]:
        return checked_scores(reward, prompts, [c[-1]["content"] for c in completions])

    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), "float32", cfg.device)
    tokenizer.padding_side = "left"
    args = RLOOConfig(output_dir=tempfile.mkdtemp(prefix="trl-rloo-"), per_device_train_batch_size=cfg.prompts * cfg.samples,
                      num_generations=cfg.samples, max_completion_length=cfg.max_tokens, beta=cfg.beta_rl,
                      learning_rate=cfg.lr, max_steps=cfg.warmup + cfg.steps, logging_steps=1, save_strategy="no", report_to="none",
                      use_cpu=cfg.device == "cpu", bf16=False, seed=cfg.seed, dataloader_num_workers=0,
                      gradient_checkpointing=gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    trainer = RLOOTrainer(model=model, reward_funcs=reward_func, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), peft_config=lora)
    split: dict[str, float] = {}
    tokens: list[int] = []
    _timed(trainer, "_generate", split, "sample_s", after=lambda out: tokens.append(sum(len(c) for c in out[1])))
    _timed(trainer, "_calculate_rewards", split, "reward_s")
    _timed(trainer, "_get_per_token_logps_and_entropies", split,
           lambda: "logprob_grad_s" if torch.is_grad_enabled() else "logprob_s")
    _timed(trainer.accelerator, "backward", split, "backward_s")
    steps: list[float] = []
    splits: dict[str, list[float]] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            split.clear()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append(time.perf_counter() - self.started)
            for k, v in split.items():
                splits.setdefault(k, []).append(v)

    trainer.add_callback(StepTimer())
    trainer.train()
    return _summary(steps, tokens, splits, cfg.warmup)


# -- distill ---------------------------------------------------------------------------------------


def bench_distill(cfg: BenchConfig, recipe_name: str, **overrides) -> tuple[dict, object]:
    """Steps of a distill recipe; returns the summary and the context (open: the caller closes it)."""
    from distill.loop import build_context, train

    if recipe_name == "rloo":
        from distill.rloo import Rloo as Recipe, RlooConfig as Config

        settings = dict(samples=cfg.samples, beta_rl=cfg.beta_rl, lr=cfg.lr, lora_r=cfg.lora_r,
                        lora_alpha=2 * cfg.lora_r, lora_top_layers=0, lora_targets=LORA_TARGETS, precision="fp32")
    else:
        from distill.jbond import JBond as Recipe, JBondConfig as Config

        settings = {}  # the default J-BOND step
    out = Path(tempfile.mkdtemp(prefix=f"bench-{recipe_name}-"))
    train_cfg = Config(**{**settings, **overrides}, model=cfg.model, reward_model=cfg.reward_model, device=cfg.device,
                       steps=cfg.warmup + cfg.steps, batch_prompts=cfg.prompts, max_tokens=cfg.max_tokens, eval_prompts=0,
                       save_every=10**6, seed=cfg.seed, out=str(out / "run"))
    recipe = Recipe(train_cfg)
    ctx = build_context(train_cfg, recipe)
    tokens: list[int] = []
    generate = ctx.generator.generate

    def counting(prompts, draws, max_tokens, prefixes=None):
        result = generate(prompts, draws, max_tokens, prefixes)
        tokens.append(sum(c.num_tokens for per_draw in result for row in per_draw for c in row))
        return result

    ctx.generator.generate = counting
    train(train_cfg, recipe, ctx)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = ("sample_s", "reward_s", "prompt_s", "logprob_s", "backward_s", "anchor_update_s")
    total = cfg.warmup + cfg.steps
    calls = len(tokens) // total  # generate calls per step (one per micro-batch)
    per_step = [sum(tokens[i * calls : (i + 1) * calls]) for i in range(total)]
    return _summary([r["step_s"] for r in rows], per_step,
                    {k: [r.get(k, 0.0) for r in rows] for k in keys}, cfg.warmup), ctx


def bench_sampler(cfg: BenchConfig, prompts: list[list[dict]]) -> dict:
    """The in-process sampler alone on the rows of an RLOO step: ``--prompts`` x ``--samples``."""
    from bonbench.backends.base import SamplingParams
    from bonbench.backends.sampling import SampleRequest, sample
    from bonbench.backends.transformers import encode_prompt, eos_ids, load_causal_lm
    from bonbench.models import resolve_policy
    from bonbench.seeds import derive_seed

    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), "float32", cfg.device)
    steps, tokens = [], []
    for step in range(cfg.warmup + cfg.steps):
        batch = prompts[step * cfg.prompts : (step + 1) * cfg.prompts]
        requests = [SampleRequest(encode_prompt(tokenizer, p), SamplingParams(
            n=cfg.samples, max_tokens=cfg.max_tokens, seed=derive_seed(cfg.seed, step, i))) for i, p in enumerate(batch)]
        started = time.perf_counter()
        out = sample(model, tokenizer, requests, eos_ids(model, tokenizer), keep_tokens=False)
        steps.append(time.perf_counter() - started)
        tokens.append(sum(c.num_tokens for row in out for c in row))
    return _summary(steps, tokens, {"sample_s": steps}, cfg.warmup)


def precision_gap(fp32_ctx, bf16_ctx, cfg: BenchConfig) -> dict:
    """Sequence log-probs of the same answers under both precisions, after the fp32 run's steps (its LoRA
    weights copied into the bf16 model): per role, and for the log-ratios the losses read."""
    from distill.loop import load_prompts

    bf16_ctx.policies.load_state_dict(fp32_ctx.policies.state_dict())
    batch = load_prompts(fp32_ctx.cfg, fp32_ctx.policies.tokenizer, "train", cfg.prompts)
    drawn = fp32_ctx.sample("policy", batch, cfg.samples, seed=cfg.seed)
    prompt_ids = [p for p, row in zip(batch.ids, drawn) for _ in row]
    answers = [c.token_ids for row in drawn for c in row]
    scored = {}
    for name, ctx in (("fp32", fp32_ctx), ("bf16", bf16_ctx)):
        with torch.no_grad():
            scored[name] = {r: ctx.policies.logprobs(r, prompt_ids, answers).double() for r in ("policy", "anchor", "ref")}
    a, b = scored["fp32"], scored["bf16"]
    diffs = {f"logprob_{r}": (b[r] - a[r]).abs() for r in a}
    for other in ("anchor", "ref"):
        diffs[f"log_ratio_policy_{other}"] = ((b["policy"] - b[other]) - (a["policy"] - a[other])).abs()
    out = {k: {"max": float(d.max()), "mean": float(d.mean())} for k, d in diffs.items()}
    out["answers"] = len(answers)
    out["mean_tokens"] = sum(map(len, answers)) / len(answers)
    out["fp32_mean_logprob"] = float(a["policy"].mean())
    out["fp32_mean_log_ratio_policy_anchor"] = float((a["policy"] - a["anchor"]).mean())
    out["fp32_mean_log_ratio_policy_ref"] = float((a["policy"] - a["ref"]).mean())
    return out


# -- the report ------------------------------------------------------------------------------------

SPLIT = (("sample_s", "sampling"), ("reward_s", "reward"), ("prompt_s", "prompt passes"), ("logprob_s", "log-probs, no grad"),
         ("logprob_grad_s", "log-probs, grad"), ("backward_s", "backward"), ("anchor_update_s", "anchor update"))


def table(results: dict, cfg: BenchConfig, machine: str) -> str:
    lines = [f"# Trainer step: {cfg.model}, {cfg.prompts} prompts, <= {cfg.max_tokens} tokens, {cfg.steps} steps after {cfg.warmup} untimed",
             "", machine, "",
             "| part | s/step (median) | generated tokens/step | tokens/s | " + " | ".join(n for _, n in SPLIT) + " |",
             "|---" * (4 + len(SPLIT)) + "|"]
    for part, r in results.items():
        if part == "precision":
            continue
        split = " | ".join(f"{r['split'][k]:.2f}" if k in r["split"] else "" for k, _ in SPLIT)
        lines.append(f"| {part} | {r['s_per_step']:.2f} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:.1f} | {split} |")
    lines += ["", "Split columns: mean seconds per step. distill's log-prob column holds every pass (with and "
              "without gradient) but the prompt passes, which run each prompt once per role (the policy's with "
              "gradients) for the engine to continue and the log-prob passes to read; TRL's `generate` includes "
              "its tokenisation.", ""]
    lines += [f"- {line}" for line in ratios(results)]
    if "precision" in results:
        gap = results["precision"]
        lines += ["", f"bf16 trunk vs fp32, {gap['answers']} answers of {gap['mean_tokens']:.1f} tokens on the default "
                  f"task's train prompts (fp32 mean log pi {gap['fp32_mean_logprob']:.2f}, mean log pi/pi_anchor "
                  f"{gap['fp32_mean_log_ratio_policy_anchor']:.4f}, log pi/pi_ref {gap['fp32_mean_log_ratio_policy_ref']:.4f}):",
                  "", "| quantity | max abs diff | mean abs diff |", "|---|---|---|"]
        lines += [f"| {k} | {v['max']:.4f} | {v['mean']:.4f} |" for k, v in gap.items() if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def ratios(results: dict) -> list[str]:
    out = []
    for name in ("trl", "trl-nogc"):
        if name in results and "rloo" in results:
            trl, ours = results[name], results["rloo"]
            out.append(f"RLOO: {name} {trl['s_per_step']:.2f} s/step / distill {ours['s_per_step']:.2f} s/step = "
                       f"{trl['s_per_step'] / ours['s_per_step']:.2f}x; generated tokens/s distill / {name} = "
                       f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x (target >= 3x)")
    if "rloo" in results and "sampler" in results:
        ours, alone = results["rloo"], results["sampler"]
        split = ours["split"]
        in_step = ours["tokens_per_step"] / split["sample_s"]
        line = (f"sampling inside distill's RLOO step {in_step:.1f} tokens/s / the sampler alone "
                f"{alone['tokens_per_s']:.1f} tokens/s = {in_step / alone['tokens_per_s']:.2f}x (target >= 0.8x)")
        if split.get("prompt_s"):  # the engine continued the step's prompt passes instead of prefilling
            line += (f"; the step's sampling does not prefill: its prompt passes ({split['prompt_s']:.2f} s, every "
                     f"role's prompts once, the policy's with gradients) are their own column")
        out.append(line)
    if "rloo" in results and "rloo-shadows" in results:
        a, b = results["rloo-shadows"], results["rloo"]
        out.append(f"RLOO's reference log-probs: shadow rows {a['s_per_step']:.2f} s/step, a teacher-forced pass "
                   f"{b['s_per_step']:.2f} s/step: {a['s_per_step'] / b['s_per_step']:.2f}x")
    if "jbond-fp32" in results and "jbond-bf16" in results:
        a, b = results["jbond-fp32"], results["jbond-bf16"]
        out.append(f"J-BOND default step: fp32 {a['s_per_step']:.2f} s, bf16 {b['s_per_step']:.2f} s: "
                   f"bf16 / fp32 = {b['s_per_step'] / a['s_per_step']:.2f}x the time")
    return out


def _machine(cfg: BenchConfig) -> str:
    import os
    import platform

    from bonbench.hardware import native_bf16

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()}, native bf16 on {cfg.device}: {native_bf16(cfg.device)}; "
            f"torch {torch.__version__}; 1-minute load average at the end {load:.2f}.")


def main(argv: list[str] | None = None) -> None:
    import contextlib
    import logging
    from unittest.mock import patch  # the rloo-shadows part restores the engine's earlier rule

    import distill.transformers_generation as transformers_generation

    logging.basicConfig(level=logging.WARNING)
    cfg = parse_config(BenchConfig, argv, prog="python benchmarks/trainer_step.py", description=__doc__.split("\n\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prompts = _train_prompts(cfg)
    results: dict = {}
    contexts = {}
    for part in cfg.parts:
        print(f"== {part}", flush=True)
        if part.startswith("trl"):
            results[part] = bench_trl(cfg, prompts, gradient_checkpointing=part == "trl")
        elif part == "sampler":
            results[part] = bench_sampler(cfg, prompts)
        elif part.startswith("rloo"):
            with patch.object(transformers_generation, "shadow_rows_pay", lambda module: True) \
                    if part == "rloo-shadows" else contextlib.nullcontext():
                results[part], ctx = bench_distill(cfg, "rloo")
            ctx.close()
        else:
            results[part], contexts[part] = bench_distill(cfg, "jbond", precision=part.split("-")[1])
        print(json.dumps({k: v for k, v in results[part].items() if k != "step_s"}), flush=True)
    if {"jbond-fp32", "jbond-bf16"} <= contexts.keys():
        results["precision"] = precision_gap(contexts["jbond-fp32"], contexts["jbond-bf16"], cfg)
    for ctx in contexts.values():
        ctx.close()
    report = table(results, cfg, _machine(cfg))
    print(report)
    folder = REPO / "reports" / "bench"  # --out is a name, not a path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{cfg.out}.md").write_text(report)
    (folder / f"{cfg.out}.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    run_command(main)
