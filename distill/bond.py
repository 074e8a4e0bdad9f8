"""BOND with the Jeffreys divergence, and its special cases: iterative BOND, vBoN, BoN fine-tuning.

BOND (Sessa et al. 2024, §4; docs/math.md §3): match pi to Best-of-N of the reference. Per prompt,
``k`` reference samples give Monte-Carlo quantiles and the Best-of-N target; ``samples`` policy
samples carry the backward term. The forward term is supervised fine-tuning on the Best-of-N of
the reference samples (every n-subset's best, weighted exactly, ``best_of_n_weights``); the
backward term is a policy gradient with return (N-1)·log p̂≤(y) − (log pi(y) − log pi_ref(y)),
p̂≤ smoothed as (c+1)/(k+1) (docs/math.md §2), baseline from the prompt's other policy samples.

- ``--beta 0.5``: Jeffreys (BOND); ``--beta 1``: backward only (vBoN, Amini et al. 2024);
  ``--beta 0``: forward only (Best-of-N fine-tuning).
- ``--anchor-every T``: iterative BOND (§4.3): the reference role is played by an anchor that is
  set to the policy every T steps, with a small N (2 or 4).

    python -m distill.bond --n 8 --beta 0.5
    python -m distill.bond --config distill/configs/iterative_bond.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bonbench import bon
from bonbench.cli import run_command
from bonbench.config import option
from bonbench.seeds import derive_seed
from distill.config import TrainConfig
from distill.loop import Batch, Context, run_recipe
from distill.losses import LossOutput, best_of_n_weights, bond_loss


@dataclass
class BondConfig(TrainConfig):
    n: int = option(8, "N of the Best-of-N target (iterative BOND: the small n of each phase)")
    beta: float = option(0.5, "Jeffreys weight: 0 forward only (BoN-SFT), 1 backward only (vBoN), 0.5 BOND")
    k: int = option(8, "reference samples per prompt (quantiles and the forward target); k >= n")
    samples: int = option(2, "policy samples per prompt for the backward term (>= 2 gives a baseline)")
    anchor_every: int = option(0, "iterative BOND: replace the anchor by the policy every T steps (0: off)")
    out: str = option("runs/bond", "run folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 2 or self.k < self.n:
            raise ValueError(f"BOND needs 2 <= n <= k (Best-of-{self.n} from {self.k} samples)")
        if not 0 <= self.beta <= 1:
            raise ValueError("beta must be in [0, 1]")
        if self.samples < 1 or self.anchor_every < 0:
            raise ValueError("samples must be >= 1 and anchor_every >= 0")


class Bond:
    needs_anchor = False

    def __init__(self, cfg: BondConfig):
        self.cfg = cfg
        self.needs_anchor = cfg.anchor_every > 0
        self.name = "iterative-bond" if self.needs_anchor else {0.0: "bon-sft", 1.0: "vbon"}.get(cfg.beta, "bond")

    def loss(self, ctx: Context, batch: Batch, seed: int) -> LossOutput:
        cfg, p = self.cfg, len(batch.ids)
        target = "anchor" if self.needs_anchor else "ref"
        refs = ctx.sample(target, batch, cfg.k, derive_seed(seed, 1))
        ref_rewards = ctx.score([m for m in batch.messages for _ in range(cfg.k)],
                                [c.text for row in refs for c in row]).view(p, cfg.k)
        kwargs = {}
        if cfg.beta < 1:
            # Only samples that can be a Best-of-n winner carry weight; score just those with grad.
            read = best_of_n_weights(ref_rewards, cfg.n) > 0
            pairs = read.nonzero().tolist()  # row-major, the order masked_scatter fills
            lp = ctx.policies.logprobs("policy", [batch.ids[i] for i, _ in pairs],
                                       [refs[i][j].token_ids for i, j in pairs], grad=True)
            ref_sample_lp = torch.zeros(p, cfg.k, dtype=lp.dtype).masked_scatter(read, lp)
            kwargs.update(ref_sample_logprobs=ref_sample_lp, ref_rewards=ref_rewards)
        if cfg.beta > 0:
            # log pi_target(y) is read as y is drawn (a shadow row per sample), not in a pass of its own.
            ys = ctx.sample("policy", batch, cfg.samples, derive_seed(seed, 0), score_under=(target,))
            flat_ids = [batch.ids[i] for i in range(p) for _ in range(cfg.samples)]
            y_ids = [c.token_ids for row in ys for c in row]
            rewards = ctx.score([m for m in batch.messages for _ in range(cfg.samples)],
                                [c.text for row in ys for c in row]).view(p, cfg.samples)
            log_q = bon.log_quantile(rewards.numpy(), ref_rewards.numpy())
            policy_lp = ctx.policies.logprobs("policy", flat_ids, y_ids, grad=True).view(p, cfg.samples)
            target_lp = [c.logprob_under[target] for row in ys for c in row]
            kwargs.update(policy_logprobs=policy_lp,
                          ref_logprobs=torch.tensor(target_lp, dtype=policy_lp.dtype).view(p, cfg.samples),
                          log_quantiles=torch.as_tensor(np.asarray(log_q), dtype=policy_lp.dtype))
        out = bond_loss(n=cfg.n, beta=cfg.beta, **kwargs)
        out.metrics["ref_reward_mean"] = float(ref_rewards.mean())
        if cfg.beta > 0:
            out.metrics["reward_mean"] = float(rewards.mean())
        return out

    def after_step(self, ctx: Context, step: int) -> None:
        if self.needs_anchor and step % self.cfg.anchor_every == 0:
            ctx.policies.update_anchor(1.0)


def main(argv: list[str] | None = None) -> None:
    run_recipe(BondConfig, Bond, argv, "python -m distill.bond", __doc__)


if __name__ == "__main__":
    run_command(main)
