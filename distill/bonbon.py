"""BoNBoN (Gui et al. 2024; docs/math.md §5): fine-tune on the best of n reference samples while holding
the log-ratio gap between the best and the worst at the value true Best-of-n has.

    python -m distill.bonbon --n 8 --alpha 0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonbench.cli import run_command
from bonbench.config import option
from bonbench.seeds import derive_seed
from distill.config import TrainConfig
from distill.loop import Batch, Context, run_recipe
from distill.losses import LossOutput, best_and_worst, bonbon_loss


@dataclass
class BonBonConfig(TrainConfig):
    n: int = option(8, "reference samples per prompt; the best and the worst are used")
    alpha: float = option(0.5, "weight of the SFT term; 1 - alpha on the log-ratio gap term")
    out: str = option("runs/bonbon", "run folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 2 or not 0 <= self.alpha <= 1:
            raise ValueError("BoNBoN needs n >= 2 and 0 <= alpha <= 1")


class BonBon:
    name = "bonbon"
    needs_anchor = False

    def __init__(self, cfg: BonBonConfig):
        self.cfg = cfg

    def loss(self, ctx: Context, batch: Batch, seed: int) -> LossOutput:
        p, n = len(batch.ids), self.cfg.n
        # BOND's seed for its reference draw: with --reference-cache a sweep shares the samples when n == k.
        refs = ctx.sample("ref", batch, n, derive_seed(seed, 1))
        rewards = ctx.score([m for m in batch.messages for _ in range(n)],
                            [c.text for row in refs for c in row]).view(p, n)
        # The loss reads only the best and the worst sample of each prompt: score those two.
        best, worst = best_and_worst(rewards)
        picks = [(i, int(j)) for i in range(p) for j in (best[i], worst[i])]
        ids = [batch.ids[i] for i, _ in picks]
        answers = [refs[i][j].token_ids for i, j in picks]
        index = (torch.tensor([i for i, _ in picks]), torch.tensor([j for _, j in picks]))
        policy_lp = ctx.policies.logprobs("policy", ids, answers, grad=True)
        ref_lp = ctx.policies.logprobs("ref", ids, answers)
        full_policy = torch.zeros(p, n, dtype=policy_lp.dtype).index_put(index, policy_lp)
        full_ref = torch.zeros(p, n, dtype=policy_lp.dtype).index_put(index, ref_lp.to(policy_lp.dtype))
        return bonbon_loss(full_policy, full_ref, rewards.to(policy_lp.dtype), alpha=self.cfg.alpha)

    def after_step(self, ctx: Context, step: int) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    run_recipe(BonBonConfig, BonBon, argv, "python -m distill.bonbon", __doc__)


if __name__ == "__main__":
    run_command(main)
