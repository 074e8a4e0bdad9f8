"""What bfloat16 changes in Best-of-N on the default task, against float32.

Draws Best-of-``--n`` for ``--prompts`` default-task test prompts with the same seeds in float32
and in bfloat16, scores every candidate with the default reward and reports

  - how many candidates are token for token the same in both dtypes;
  - how often the chosen answer (the highest reward) differs;
  - how far bfloat16's log-probabilities are from float32's, on the same tokens: the float32
    candidates teacher-forced through both models (``bonbench.logprobs.sequence_logprobs``),
    per sequence and per token.

    python benchmarks/bf16_agreement.py                  # 6 prompts x 8 candidates, a few minutes on CPU
    python benchmarks/bf16_agreement.py --prompts 20 --out bf16-agreement-20

Written to ``reports/bench/<--out>.md`` and printed.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bonbench.backends.base import SamplingParams  # noqa: E402
from bonbench.backends.sampling import SampleRequest, sample  # noqa: E402
from bonbench.backends.transformers import encode_prompt, eos_ids, load_causal_lm  # noqa: E402
from bonbench.cli import run_command  # noqa: E402
from bonbench.config import option, parse_config  # noqa: E402
from bonbench.logprobs import sequence_logprobs  # noqa: E402
from bonbench.models import resolve_policy  # noqa: E402
from bonbench.seeds import derive_seed  # noqa: E402


@dataclass
class AgreementConfig:
    model: str = option("default", "policy: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or folder")
    reward_model: str = option("default", "reward that picks the best candidate")
    prompts: int = option(6, "default-task test prompts")
    n: int = option(8, "candidates per prompt")
    max_tokens: int = option(48, "new tokens per candidate")
    seed: int = option(0, "seed the prompts' seeds are derived from")
    out: str = option("bf16-agreement", "report name: writes reports/bench/<out>.md")

    def __post_init__(self) -> None:
        if min(self.prompts, self.n, self.max_tokens) < 1:
            raise ValueError("--prompts, --n and --max-tokens must be >= 1")
        if Path(self.out).name != self.out:
            raise ValueError("--out is a file name (no folders): the report goes under reports/bench/")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(AgreementConfig, argv, prog="python benchmarks/bf16_agreement.py",
                       description=__doc__.split("\n\n")[0])
    from bonbench.rewards import load_reward
    from bonbench.tasks import load_task, summary_prompt

    reward = load_reward(cfg.reward_model)
    messages = [summary_prompt(d) for d in load_task(split="test")["document"][: cfg.prompts]]
    models, draws = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_causal_lm(resolve_policy(cfg.model), dtype)
        prompts = [encode_prompt(tokenizer, m) for m in messages]
        requests = [SampleRequest(p, SamplingParams(n=cfg.n, max_tokens=cfg.max_tokens, seed=derive_seed(cfg.seed, i)))
                    for i, p in enumerate(prompts)]
        draws[dtype] = sample(model, tokenizer, requests, eos_ids(model, tokenizer))
        models[dtype] = model
        print(f"sampled {dtype}", flush=True)

    same_tokens = chosen_differs = 0
    reward_gap = []
    for message, fp32, bf16 in zip(messages, draws["float32"], draws["bfloat16"]):
        same_tokens += sum(a.token_ids == b.token_ids for a, b in zip(fp32, bf16))
        scores = {d: reward.score([message] * cfg.n, [c.text for c in cands])
                  for d, cands in (("float32", fp32), ("bfloat16", bf16))}
        best = {d: max(range(cfg.n), key=lambda k, d=d: scores[d][k]) for d in scores}
        chosen_differs += fp32[best["float32"]].text != bf16[best["bfloat16"]].text
        reward_gap.append(scores["bfloat16"][best["bfloat16"]] - scores["float32"][best["float32"]])

    answers = [c.token_ids for cands in draws["float32"] for c in cands]
    contexts = [p for p, cands in zip(prompts, draws["float32"]) for _ in cands]
    with torch.inference_mode():
        lp = {d: sequence_logprobs(m, tokenizer, contexts, answers).double() for d, m in models.items()}
    diff = (lp["bfloat16"] - lp["float32"]).abs()
    per_token = diff / torch.tensor([len(a) for a in answers], dtype=torch.float64)
    total = cfg.prompts * cfg.n
    rows = [
        ("candidates identical token for token", f"{same_tokens}/{total} ({same_tokens / total:.0%})"),
        ("chosen answer differs", f"{chosen_differs}/{cfg.prompts} prompts"),
        ("reward of the chosen answer, bf16 - fp32 (mean)", f"{statistics.fmean(reward_gap):+.4f}"),
        ("abs(log π_bf16(y) - log π_fp32(y)) per sequence, mean / max",
         f"{float(diff.mean()):.3f} / {float(diff.max()):.3f}"),
        ("the same divided by the sequence's tokens, mean", f"{float(per_token.mean()):.4f}"),
        ("log π_fp32(y) per sequence, mean (for scale)", f"{float(lp['float32'].mean()):.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    table = "\n".join([f"| {'measure':{width}s} | value |", f"| {'---':{width}s} | --- |"]
                      + [f"| {k:{width}s} | {v} |" for k, v in rows])
    setup = (f"model {cfg.model}, reward {cfg.reward_model}, {cfg.prompts} default-task test prompts x {cfg.n} "
             f"candidates, up to {cfg.max_tokens} tokens, T=1, the same seeds in both dtypes; log-probabilities of "
             f"the float32 candidates teacher-forced through both models")
    print(f"\n{setup}\n\n{table}")
    out = REPO / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.out}.md").write_text(f"# bfloat16 against float32 in Best-of-N\n\n{setup}.\n\n{table}\n")
    print(f"\nwrote {out / cfg.out}.md")


if __name__ == "__main__":
    run_command(main)
