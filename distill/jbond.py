"""J-BOND: distil Best-of-N into the policy with the Jeffreys divergence and a moving anchor.

BOND (Sessa et al. 2024, §5, Algorithm 2; docs/math.md §4). Each step, per prompt: one sample y from
the policy and two from the anchor. The forward-KL term fine-tunes on the better anchor sample
(Best-of-2 of the anchor); the backward-KL term is a policy gradient with reward r_J = -log 16 when
y is worse than both anchor samples (else 0) and a KL penalty to the anchor; the anchor trails
the policy as an EMA. After many steps the policy approaches Best-of-2^j of where it started,
with no N chosen up front and no quantile estimation.

Departures from the paper, all small: LoRA by default (policy and anchor are two adapters on one
frozen base; the reference is the base), with an lr to match; the leave-one-out baseline averages
the other prompts' returns in the micro-batch; only anchor samples that can win a pair are scored
with gradients (the others' weight is zero in the loss anyway). ``--anchor-samples k`` draws k > 2
anchor samples and averages r_J and the forward term over all their pairs: the paper's expected
gradient with less variance, for k - 2 more rows a step (docs/math.md §4).

Cost: with LoRA a step is one sampling batch (policy and anchor rows together, plus a shadow row
per policy sample that reads log pi_anchor(y) as y is drawn) and one gradient pass in which each
prompt runs once for its scored answers (two with the paper's k = 2).

    python -m distill.jbond                                      # 2-core CPU: 8 min (AMX, bf16), 13 (AVX2, fp32)
    python -m distill.jbond --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --batch-prompts 64
    accelerate launch --config_file distill/configs/accelerate_ddp.yaml -m distill.jbond --config distill/configs/jbond.yaml
    torchrun --nproc_per_node 2 -m distill.jbond --device cpu      # DDP over gloo, no GPU needed

Under several processes each takes its share of a step's prompts (``batch_prompts`` is the global
batch), the leave-one-out baseline averages within a process's share, and the main process alone
evaluates, logs and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonbench.cli import run_command
from bonbench.config import option
from bonbench.seeds import derive_seed
from distill.config import TrainConfig
from distill.loop import Batch, Context, run_recipe
from distill.policy import Draw
from distill.losses import LossOutput, best_of_n_weights, jbond_loss


@dataclass
class JBondConfig(TrainConfig):
    lr: float = option(1e-3, "Adam learning rate; 1e-3 suits the default's 24 LoRA steps (measured against 3e-4 "
                            "and 5e-4 in reports/jbond-default/); use less for long runs")
    beta: float = option(0.5, "Jeffreys weight: 0 forward KL only, 1 backward KL only (paper: 0.5)")
    eta: float = option(0.02, "EMA rate of the anchor (paper: 0.02)")
    gamma: float = option(0.0, "extra KL(pi || anchor) regularisation (paper: 0 to 2)")
    anchor_samples: int = option(2, "anchor samples per prompt (paper: 2); k > 2 averages r_J and the forward "
                                    "term over all pairs of them: the same expected gradient, less variance")
    baseline: bool = option(True, "leave-one-out baseline over the micro-batch's prompts")
    out: str = option("runs/jbond", "run folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta <= 1 or not 0 < self.eta <= 1 or self.gamma < 0:
            raise ValueError("J-BOND needs 0 <= beta <= 1, 0 < eta <= 1 and gamma >= 0")
        if self.anchor_samples < 2:
            raise ValueError("r_J compares the policy sample with pairs of anchor samples: anchor_samples >= 2")
        if self.baseline and self.batch_prompts // self.grad_accum < 2:
            raise ValueError("the baseline averages other prompts: a micro-batch needs >= 2 prompts")


class JBond:
    name = "jbond"
    needs_anchor = True

    def __init__(self, cfg: JBondConfig):
        self.cfg = cfg

    def loss(self, ctx: Context, batch: Batch, seed: int) -> LossOutput:
        p, k = len(batch.ids), self.cfg.anchor_samples
        # Each prompt runs once under the policy, with gradients, and once under the anchor (its frozen
        # trunk read from the policy's pass): the engine continues both instead of prefilling, and the
        # gradient pass below reads the policy's.
        states = ctx.policies.prompt_states("policy", batch.ids, grad=True)
        prefixes = {"policy": states, "anchor": ctx.policies.prompt_states("anchor", batch.ids, trunk_from=states)}
        # One batch for both roles; log pi_anchor(y) comes from a shadow row while y is drawn.
        ys, anchors = ctx.sample_together(batch, [Draw("policy", 1, derive_seed(seed, 0), score_under=("anchor",)),
                                                  Draw("anchor", k, derive_seed(seed, 1))], prefixes)
        ys = [row[0] for row in ys]
        texts = [c.text for c in ys] + [c.text for row in anchors for c in row]
        rewards = ctx.score(batch.messages + [m for m in batch.messages for _ in range(k)], texts)
        policy_rewards, anchor_rewards = rewards[:p], rewards[p:].view(p, k)
        # The forward term reads log pi of the anchor samples that can win a pair: score those only.
        read = best_of_n_weights(anchor_rewards, 2) > 0
        pairs = read.nonzero().tolist()  # row-major, the order masked_scatter fills
        with_grad = ctx.policies.logprobs("policy", batch.ids + [batch.ids[i] for i, _ in pairs],
                                          [c.token_ids for c in ys] + [anchors[i][j].token_ids for i, j in pairs],
                                          grad=True, states=states)
        policy_lp = with_grad[:p]
        anchor_sample_lp = torch.zeros(p, k, dtype=with_grad.dtype).masked_scatter(read, with_grad[p:])
        anchor_lp = torch.tensor([c.logprob_under["anchor"] for c in ys], dtype=policy_lp.dtype)
        out = jbond_loss(policy_lp, anchor_lp, policy_rewards.to(policy_lp.dtype), anchor_rewards,
                         anchor_sample_lp, beta=self.cfg.beta, gamma=self.cfg.gamma,
                         use_baseline=self.cfg.baseline)
        out.metrics["tokens_per_sample"] = sum(c.num_tokens for c in ys) / p
        return out

    def after_step(self, ctx: Context, step: int) -> None:
        ctx.policies.update_anchor(self.cfg.eta)


def main(argv: list[str] | None = None) -> None:
    out = run_recipe(JBondConfig, JBond, argv, "python -m distill.jbond", __doc__)
    print(f"done: policy in {out / 'policy'}, metrics in {out / 'metrics.jsonl'}; compare it with Best-of-N:\n"
          f"  python -m bonbench measure --out reports/measure-default --split test --limit 40 --ns 1 2 4 8 "
          f"--k 16 --max-tokens 48 --policy {out / 'policy'}")


if __name__ == "__main__":
    run_command(main)
