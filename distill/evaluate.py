"""Periodic evaluation on held-out prompts, as the BOND paper measures (docs/math.md §6).

Per prompt: ``eval_k`` reference samples (drawn once, kept in ``eval_reference.json`` so every
evaluation and a resumed run compare against the same ones) and one policy sample. Reports:

- ``eval/reward``: mean reward of the policy sample;
- ``eval/log_quantile``: mean smoothed log p̂≤ of that reward among the reference rewards
  (``bonbench.bon.log_quantile``: (c + 1) / (k + 1));
- ``eval/kl_ref``: E_pi[log pi(y) - log pi_ref(y)] over the policy samples (a one-sample-per-prompt
  estimate: unbiased, noisy);
- ``eval/win_rate`` with a Wilson interval: the policy sample against the first reference sample
  (one independent pair per prompt), ties half; ``eval/win_rate_all_refs``: against every reference
  sample (lower variance, no interval since the pairs share the policy sample).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bonbench import bon
from bonbench.seeds import derive_seed


class Evaluator:
    def __init__(self, ctx, prompts, out: Path):
        self.ctx = ctx
        self.prompts = prompts
        self.cache = out / "eval_reference.json"
        self._ref_rewards: np.ndarray | None = None

    def reference_rewards(self, seed: int) -> np.ndarray:
        """(P, k) rewards of the reference samples, drawn once per run."""
        if self._ref_rewards is None:
            if self.cache.exists():
                self._ref_rewards = np.asarray(json.loads(self.cache.read_text())["rewards"])
            else:
                k = self.ctx.cfg.eval_k
                samples = self.ctx.sample("ref", self.prompts, k, seed=derive_seed(seed, 0))
                texts = [c.text for row in samples for c in row]
                messages = [m for m in self.prompts.messages for _ in range(k)]
                self._ref_rewards = self.ctx.score(messages, texts).numpy().reshape(len(samples), k)
                self.cache.write_text(json.dumps({"rewards": self._ref_rewards.tolist(), "texts": texts}))
        return self._ref_rewards

    def run(self, seed: int) -> dict[str, float]:
        refs = self.reference_rewards(seed)
        # "policy" in score_under: the trained model's log pi(y), not an external engine's (precision)
        drawn = self.ctx.sample("policy", self.prompts, 1, seed=derive_seed(seed, 1), score_under=("ref", "policy"))
        samples = [row[0] for row in drawn]
        rewards = self.ctx.score(self.prompts.messages, [c.text for c in samples]).numpy()
        policy_lp = np.array([c.logprob_under["policy"] for c in samples])
        ref_lp = np.array([c.logprob_under["ref"] for c in samples])
        win = bon.win_rate(rewards, refs[:, 0])
        all_refs = bon.win_rate(np.repeat(rewards, refs.shape[1]), refs.reshape(-1))
        return {
            "eval/reward": float(rewards.mean()),
            "eval/ref_reward": float(refs.mean()),
            "eval/log_quantile": float(bon.log_quantile(rewards[:, None], refs).mean()),
            "eval/kl_ref": float((policy_lp - ref_lp).mean()),
            "eval/win_rate": float(win.rate),
            "eval/win_rate_low": float(win.low),
            "eval/win_rate_high": float(win.high),
            "eval/win_rate_all_refs": float(all_refs.rate),
            "eval/tokens": float(np.mean([c.num_tokens for c in samples])),
        }
