"""An exact test bed for Best-of-N distillation (docs/math.md §7).

The generation space is every sequence of ``length`` tokens over ``vocab`` tokens (4 x 4 gives 256
sequences), so π_ref, π, π_BoN, every KL and every expected quantile are computed exactly by summing
over the whole space, while training only ever sees sampled gradients through ``distill.losses``.
There is one context (no prompts): the P "prompts" of a batch are P independent replicas of it.

Two policy families, both autoregressive, with exact log π over all sequences:

* ``TabularPolicy``: one logit vector per prefix. It can represent any distribution, π_BoN included.
* ``MLPPolicy``: one small MLP over a one-hot encoding of the prefix, shared by all prefixes. Like a
  language model it cannot represent π_BoN exactly, which is where the BOND claims separate.

Samples are drawn exactly from the policy's distribution over whole sequences (equivalent to
ancestral sampling). The reward has ties; every BOND-type quantity (π_BoN, quantiles, Best-of-N
selection inside the losses) uses the one strict order of ``bonbench.bon`` (reward, then the lower
sequence index ranks higher), by feeding the losses ``TestBed.order_keys``, the rank of each sequence
in that order. REINFORCE uses the raw reward. Everything is float64 on CPU.

Run the figures with ``python -m distill.testbed_figures``; the tests are ``tests/distill``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bonbench.bon import bon_probabilities, log_quantile, quantiles_exact, strict_order
from distill.losses import LossOutput, bond_loss, bonbon_loss, jbond_loss, rloo_loss

DTYPE = torch.float64
METHODS = ("bond", "iterative_bond", "jbond", "rloo", "bonbon", "vbon", "bon_sft")


# ----------------------------------------------------------------------------- the space


class SequenceSpace:
    """All ``vocab ** length`` sequences, in lexicographic order, and their prefixes.

    Attributes:
        sequences: ``(M, L)`` int64, ``M = vocab ** length``.
        prefix_ids: ``(M, L)`` int64, id of the prefix ``y_<t`` that predicts token ``t``.
        prefix_features: ``(num_prefixes, L * vocab + L)`` one-hot tokens of the prefix (zeros
            past its end) followed by a one-hot of its length.
    """

    def __init__(self, vocab: int = 4, length: int = 4) -> None:
        if vocab < 2 or length < 1:
            raise ValueError(f"need vocab >= 2 and length >= 1, got {vocab=}, {length=}")
        self.vocab, self.length = vocab, length
        self.sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
        offsets = [sum(vocab**s for s in range(t)) for t in range(length + 1)]
        self.num_prefixes = offsets[length]
        prefix_ids = torch.zeros_like(self.sequences)
        features = torch.zeros(self.num_prefixes, length * vocab + length, dtype=DTYPE)
        for t in range(length):
            code = torch.zeros(len(self.sequences), dtype=torch.long)
            for s in range(t):
                code = code * vocab + self.sequences[:, s]
            prefix_ids[:, t] = offsets[t] + code
            for m in range(len(self.sequences)):
                row = prefix_ids[m, t]
                features[row, length * vocab + t] = 1.0
                for s in range(t):
                    features[row, s * vocab + self.sequences[m, s]] = 1.0
        self.prefix_ids = prefix_ids
        self.prefix_features = features

    @property
    def size(self) -> int:
        return len(self.sequences)

    def sequence_log_probs(self, prefix_logits: torch.Tensor) -> torch.Tensor:
        """``(num_prefixes, vocab)`` next-token logits -> ``(M,)`` log π(y), summed over tokens."""
        log_next = torch.log_softmax(prefix_logits, dim=-1)
        return log_next[self.prefix_ids, self.sequences].sum(dim=-1)


# ----------------------------------------------------------------------------- policies


class TabularPolicy(nn.Module):
    """A free logit vector per prefix: any autoregressive distribution over the space."""

    def __init__(self, space: SequenceSpace, init_scale: float, generator: torch.Generator):
        super().__init__()
        self.space = space
        logits = init_scale * torch.randn(space.num_prefixes, space.vocab, generator=generator, dtype=DTYPE)
        self.logits = nn.Parameter(logits)

    def log_probs(self) -> torch.Tensor:
        """``(M,)`` exact log π of every sequence."""
        return self.space.sequence_log_probs(self.logits)


class MLPPolicy(nn.Module):
    """One tanh MLP, shared by all prefixes, maps the one-hot prefix to next-token logits."""

    def __init__(
        self, space: SequenceSpace, hidden: int, init_scale: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.space = space
        d_in = space.prefix_features.shape[1]

        def init(*shape: int, fan_in: int, scale: float) -> nn.Parameter:
            return nn.Parameter(scale * torch.randn(*shape, generator=generator, dtype=DTYPE) / fan_in**0.5)

        self.w_in = init(d_in, hidden, fan_in=d_in, scale=2.0)
        self.b_in = init(hidden, fan_in=1, scale=0.5)
        self.w_out = init(hidden, space.vocab, fan_in=hidden, scale=init_scale)
        self.b_out = nn.Parameter(torch.zeros(space.vocab, dtype=DTYPE))

    def log_probs(self) -> torch.Tensor:
        """``(M,)`` exact log π of every sequence."""
        hidden = torch.tanh(self.space.prefix_features @ self.w_in + self.b_in)
        return self.space.sequence_log_probs(hidden @ self.w_out + self.b_out)


def structured_reward(space: SequenceSpace) -> torch.Tensor:
    """``(M,)`` reward with many ties: the count of token 1, plus 0.5 if the last token is 2.

    A "what" part (how many good tokens) and a "where" part (a position bonus), on 10 levels.
    """
    count = (space.sequences == 1).sum(dim=-1).to(DTYPE)
    bonus = 0.5 * (space.sequences[:, -1] == 2).to(DTYPE)
    return count + bonus


# ----------------------------------------------------------------------------- exact quantities


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) from ``(M,)`` log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum()


@dataclass
class TestBed:
    """One exact problem: space, reward, reference policy, and a factory for fresh policies.

    ``order_keys`` is the strict rank (0 = worst) of every sequence under bonbench's order
    (reward, then lower index ranks higher); it is what the BOND-type losses receive as rewards.
    ``log_p_leq`` is the exact log p≤ under π_ref in that order.
    """

    space: SequenceSpace
    rewards: torch.Tensor
    ref_policy: nn.Module
    order_keys: torch.Tensor = field(init=False)
    ref_log_probs: torch.Tensor = field(init=False)
    log_p_leq: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        for p in self.ref_policy.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            self.ref_log_probs = self.ref_policy.log_probs()
        rewards = self.rewards.numpy()
        self.order_keys = torch.from_numpy(strict_order(rewards).astype(np.float64))
        _, p_leq = quantiles_exact(self.ref_log_probs.exp().numpy(), rewards)
        self.log_p_leq = torch.from_numpy(np.log(p_leq))
        self._bon_cache: dict[int, torch.Tensor] = {}

    def new_policy(self) -> nn.Module:
        """A trainable copy of π_ref."""
        policy = copy.deepcopy(self.ref_policy)
        for p in policy.parameters():
            p.requires_grad_(True)
        return policy

    def bon_log_probs(self, n: int, base_log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``(M,)`` exact log BoN_n(base), base = π_ref by default (``bonbench.bon``)."""
        if base_log_probs is None:
            if n not in self._bon_cache:
                self._bon_cache[n] = self.bon_log_probs(n, self.ref_log_probs)
            return self._bon_cache[n]
        base = base_log_probs.detach().exp().numpy()
        probs = bon_probabilities(base / base.sum(), self.rewards.numpy(), n)
        return torch.from_numpy(np.log(np.maximum(probs, 1e-300)))

    def mc_backward_target(self, n: int, k: int = 16) -> torch.Tensor:
        """``(M,)`` log of the fixed point of the backward term with smoothed MC quantiles.

        q ∝ π_ref · exp((n - 1) · E[log p̂≤]),  p̂≤ = (c + 1)/(k + 1),  c ~ Binomial(k, p≤(y))
        (docs/math.md §2): where vBoN converges with k reference samples, a little off π_BoN.
        """
        from scipy.stats import binom

        counts = np.arange(k + 1)
        p_leq = np.exp(self.log_p_leq.numpy())
        pmf = binom.pmf(counts[None, :], k, p_leq[:, None])  # (M, k + 1)
        expected_log = pmf @ np.log((counts + 1.0) / (k + 1.0))
        logits = self.ref_log_probs + (n - 1) * torch.from_numpy(expected_log)
        return torch.log_softmax(logits, dim=0)

    def tilted_log_probs(self, beta_rl: float) -> torch.Tensor:
        """``(M,)`` log of π_ref · exp(r / beta_rl) / Z, the maximiser of E_π[r] - beta_rl · KL(π || π_ref).

        Over all distributions it traces the exact reward/KL Pareto front as beta_rl varies.
        """
        return torch.log_softmax(self.ref_log_probs + self.rewards / beta_rl, dim=0)

    def evaluate(self, log_probs: torch.Tensor, n: int | None = None) -> dict[str, float]:
        """Exact statistics of a policy given its ``(M,)`` log-probabilities.

        Keys: ``reward`` E_π[r]; ``log_quantile`` E_π[log p≤(y)] with p≤ exact under π_ref;
        ``kl_ref`` KL(π || π_ref); ``entropy``; with ``n``: ``forward_kl`` KL(π_BoN || π) and
        ``backward_kl`` KL(π || π_BoN), π_BoN = BoN_n(π_ref).
        """
        log_probs = log_probs.detach()
        probs = log_probs.exp()
        out = {
            "reward": float(probs @ self.rewards),
            "log_quantile": float(probs @ self.log_p_leq),
            "kl_ref": float(kl(log_probs, self.ref_log_probs)),
            "entropy": float(-(probs * log_probs).sum()),
        }
        if n is not None:
            bon = self.bon_log_probs(n)
            out["forward_kl"] = float(kl(bon, log_probs))
            out["backward_kl"] = float(kl(log_probs, bon))
        return out


def make_testbed(
    policy: str = "mlp",
    *,
    vocab: int = 4,
    length: int = 4,
    hidden: int = 2,
    init_scale: float = 2.0,
    seed: int = 0,
) -> TestBed:
    """Build the problem: ``policy`` is ``"mlp"`` or ``"tabular"``; π_ref is it at random init."""
    space = SequenceSpace(vocab, length)
    generator = torch.Generator().manual_seed(seed)
    if policy == "mlp":
        ref = MLPPolicy(space, hidden, init_scale, generator)
    elif policy == "tabular":
        ref = TabularPolicy(space, init_scale, generator)
    else:
        raise ValueError(f"policy must be 'mlp' or 'tabular', got {policy!r}")
    return TestBed(space, structured_reward(space), ref)


def front_gap(kl_ref, reward, front_kl, front_reward) -> np.ndarray:
    """How far each (KL, reward) point lies above a set of competitor points.

    For point i: ``reward_i - max{front_reward_j : front_kl_j <= kl_ref_i}`` (``+inf`` when no
    competitor point has so little KL). Non-negative means no competitor point reaches at least
    the same reward with at most the same KL.
    """
    kl_ref, reward = np.asarray(kl_ref, dtype=float), np.asarray(reward, dtype=float)
    front_kl, front_reward = np.asarray(front_kl, dtype=float), np.asarray(front_reward, dtype=float)
    reachable = front_kl[None, :] <= kl_ref[:, None]
    best = np.where(reachable, front_reward[None, :], -np.inf).max(axis=1)
    return reward - best


# ----------------------------------------------------------------------------- training


@dataclass
class TestbedConfig:
    """One training run on the test bed; fields not used by ``method`` are ignored."""

    method: str = "bond"  # one of METHODS
    steps: int = 300
    batch: int = 32  # prompts (replicas of the one context) per step
    lr: float = 0.02  # Adam
    seed: int = 0
    eval_every: int = 10
    n: int = 8  # N of BOND/vBoN/BoN-SFT/BoNBoN; n of iterative BOND
    beta: float = 0.5  # Jeffreys weight of BOND and J-BOND
    policy_samples: int = 2  # per prompt, BOND/vBoN/RLOO (>= 2 for the baselines)
    ref_samples: int = 16  # k: MC quantile samples per prompt, also the BoN-SFT pool (BoNBoN: n)
    anchor_period: int = 100  # T of iterative BOND
    eta: float = 0.02  # EMA rate of the J-BOND anchor
    gamma: float = 0.0  # J-BOND extra regulariser
    use_baseline: bool = True
    beta_rl: float = 0.01  # RLOO KL coefficient
    alpha: float = 0.5  # BoNBoN SFT weight

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method in ("bond", "vbon", "bon_sft", "iterative_bond") and self.n > self.ref_samples:
            raise ValueError(f"the forward term picks Best-of-{self.n} among {self.ref_samples} samples")
        if self.method == "rloo" and self.policy_samples < 2:
            raise ValueError("RLOO's leave-one-out baseline needs policy_samples >= 2")
        if self.method == "jbond" and self.use_baseline and self.batch < 2:
            raise ValueError("the J-BOND baseline averages the other prompts' returns: needs batch >= 2")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta weighs forward against backward KL, so 0 <= beta <= 1, got {self.beta}")
        if self.method == "bonbon" and self.n < 2:
            raise ValueError("BoNBoN needs n >= 2 reference samples (a best and a worst)")


class _Sampler:
    """Exact sampling of sequence indices from ``(M,)`` log-probabilities, seeded."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, log_probs: torch.Tensor, *shape: int) -> torch.Tensor:
        count = int(np.prod(shape))
        probs = log_probs.detach().exp()
        return torch.multinomial(probs, count, replacement=True, generator=self.generator).view(shape)


def _mc_log_quantiles(bed: TestBed, samples: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    # Smoothed MC estimate (c + 1)/(k + 1) on the strict order keys (docs/math.md §2).
    keys = bed.order_keys.numpy()
    return torch.from_numpy(log_quantile(keys[samples.numpy()], keys[pool.numpy()], smoothing=True))


def _bond_step(
    bed: TestBed,
    cfg: TestbedConfig,
    sample: _Sampler,
    log_probs: torch.Tensor,
    base_log_probs: torch.Tensor,
    beta: float,
    n: int,
) -> LossOutput:
    """BOND-type loss with Best-of-n of ``base`` (π_ref, or the anchor for iterative BOND)."""
    pool = sample(base_log_probs, cfg.batch, cfg.ref_samples)
    kwargs = {}
    if beta > 0.0:
        ys = sample(log_probs, cfg.batch, cfg.policy_samples)
        kwargs.update(
            policy_logprobs=log_probs[ys],
            ref_logprobs=base_log_probs[ys],
            log_quantiles=_mc_log_quantiles(bed, ys, pool),
        )
    if beta < 1.0:
        kwargs.update(ref_sample_logprobs=log_probs[pool], ref_rewards=bed.order_keys[pool])
    return bond_loss(n=n, beta=beta, use_baseline=cfg.use_baseline, **kwargs)


def _loss(
    bed: TestBed,
    cfg: TestbedConfig,
    sample: _Sampler,
    log_probs: torch.Tensor,
    anchor_log_probs: torch.Tensor,
) -> LossOutput:
    """One step's loss for ``cfg.method`` from fresh exact samples; ``log_probs`` carries grad."""
    ref = bed.ref_log_probs
    if cfg.method in ("bond", "vbon", "bon_sft"):
        beta = {"bond": cfg.beta, "vbon": 1.0, "bon_sft": 0.0}[cfg.method]
        return _bond_step(bed, cfg, sample, log_probs, ref, beta, cfg.n)
    if cfg.method == "iterative_bond":
        return _bond_step(bed, cfg, sample, log_probs, anchor_log_probs, cfg.beta, cfg.n)
    if cfg.method == "jbond":
        ys = sample(log_probs, cfg.batch)
        anchors = sample(anchor_log_probs, cfg.batch, 2)
        return jbond_loss(
            log_probs[ys],
            anchor_log_probs[ys],
            bed.rewards[ys],
            bed.rewards[anchors],
            log_probs[anchors],
            beta=cfg.beta,
            gamma=cfg.gamma,
            use_baseline=cfg.use_baseline,
        )
    if cfg.method == "rloo":
        ys = sample(log_probs, cfg.batch, cfg.policy_samples)
        return rloo_loss(log_probs[ys], ref[ys], bed.rewards[ys], beta_rl=cfg.beta_rl)
    if cfg.method == "bonbon":
        pool = sample(ref, cfg.batch, cfg.n)
        return bonbon_loss(log_probs[pool], ref[pool], bed.order_keys[pool], alpha=cfg.alpha)
    raise AssertionError(cfg.method)


def train(bed: TestBed, cfg: TestbedConfig) -> dict[str, list[float]]:
    """Train a fresh copy of π_ref with sampled gradients; return the exact metrics over time.

    The history has ``step`` and every key of ``TestBed.evaluate`` (with ``n = cfg.n``), recorded
    at step 0 and every ``cfg.eval_every`` steps, plus ``anchor_updates`` (iterative BOND: the
    number of hard anchor updates so far).
    """
    sample = _Sampler(cfg.seed)
    policy = bed.new_policy()
    anchor = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    history: dict[str, list[float]] = {"step": [], "anchor_updates": []}
    anchor_updates = 0

    def record(step: int, log_probs: torch.Tensor) -> None:
        history["step"].append(step)
        history["anchor_updates"].append(anchor_updates)
        for key, value in bed.evaluate(log_probs, cfg.n).items():
            history.setdefault(key, []).append(value)

    for step in range(cfg.steps):
        log_probs = policy.log_probs()
        if step % cfg.eval_every == 0:
            record(step, log_probs)
        with torch.no_grad():
            anchor_log_probs = anchor.log_probs()
        out = _loss(bed, cfg, sample, log_probs, anchor_log_probs)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        with torch.no_grad():
            if cfg.method == "jbond":  # EMA anchor: θ_anchor ← (1 - η) θ_anchor + η θ
                for a, p in zip(anchor.parameters(), policy.parameters()):
                    a.lerp_(p, cfg.eta)
            elif cfg.method == "iterative_bond" and (step + 1) % cfg.anchor_period == 0:
                anchor.load_state_dict(policy.state_dict())
                anchor_updates += 1
    with torch.no_grad():
        record(cfg.steps, policy.log_probs())
    return history
