"""REINFORCE with a leave-one-out baseline (RLOO), the BOND paper's RL baseline (docs/math.md §5).

Per prompt, ``samples`` (>= 2) policy samples; return r(y) − beta_rl·(log pi(y) − log pi_ref(y)),
baseline the mean return of the prompt's other samples. The paper sweeps beta_rl over
{0.001, 0.01, 0.1, 1}.

    python -m distill.rloo --beta-rl 0.01
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonbench.cli import run_command
from bonbench.config import option
from distill.config import TrainConfig
from distill.loop import Batch, Context, run_recipe
from distill.losses import LossOutput, rloo_loss


@dataclass
class RlooConfig(TrainConfig):
    beta_rl: float = option(0.01, "KL coefficient to the reference")
    samples: int = option(2, "policy samples per prompt (>= 2)")
    out: str = option("runs/rloo", "run folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 2 or self.beta_rl < 0:
            raise ValueError("RLOO needs samples >= 2 and beta_rl >= 0")


class Rloo:
    name = "rloo"
    needs_anchor = False

    def __init__(self, cfg: RlooConfig):
        self.cfg = cfg

    def loss(self, ctx: Context, batch: Batch, seed: int) -> LossOutput:
        p, s = len(batch.ids), self.cfg.samples
        # log pi_ref(y): a shadow row per sample as y is drawn where LoRA sits over a frozen trunk, else the
        # loop's teacher-forced pass (distill.transformers_generation.shadow_rows_pay).
        # Each prompt runs once under the policy, with gradients, and once under the reference (its
        # frozen trunk read from the policy's pass): the engine continues both instead of prefilling,
        # and the gradient pass and the reference's scores read them.
        states = ctx.policies.prompt_states("policy", batch.ids, grad=True)
        prefixes = {"policy": states, "ref": ctx.policies.prompt_states("ref", batch.ids, trunk_from=states)}
        ys = ctx.sample("policy", batch, s, seed, score_under=("ref",), prefixes=prefixes)
        flat_ids = [batch.ids[i] for i in range(p) for _ in range(s)]
        y_ids = [c.token_ids for row in ys for c in row]
        rewards = ctx.score([m for m in batch.messages for _ in range(s)], [c.text for row in ys for c in row])
        policy_lp = ctx.policies.logprobs("policy", flat_ids, y_ids, grad=True, states=states).view(p, s)
        ref_lp = torch.tensor([c.logprob_under["ref"] for row in ys for c in row], dtype=policy_lp.dtype).view(p, s)
        return rloo_loss(policy_lp, ref_lp, rewards.view(p, s).to(policy_lp.dtype), beta_rl=self.cfg.beta_rl)

    def after_step(self, ctx: Context, step: int) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    run_recipe(RlooConfig, Rloo, argv, "python -m distill.rloo", __doc__)


if __name__ == "__main__":
    run_command(main)
