r"""``python -m bonbench measure``: what Best-of-N buys and what it costs, and how a policy compares.

    python -m bonbench measure --split test --limit 40 --ns 1 2 4 8 --k 16 --max-tokens 48 \
        --out reports/measure-default
    python -m bonbench measure --split test --limit 40 --ns 1 2 4 8 --k 16 --max-tokens 48 \
        --out reports/measure-default --policy runs/jbond/policy    # a policy against that same pool
    python -m bonbench measure --model Qwen/Qwen2.5-1.5B-Instruct --reward-model <hf id> --device cuda

For every prompt the reference π_ref (``--model``) draws one pool of ``k + M`` samples at
``--temperature``, split by draw order into two roles that never overlap:

* ``reference``: the first ``k``; the reward distribution of π_ref for this prompt. Quantiles are
  always taken against these (MATH.md §2): ``p̂≤(y) = (1/k) Σ_j 1{r(y_j) ≤ r(y)}``, and the log
  quantile is the smoothed ``log((c + 1)/(k + 1))`` of ``bon.log_quantile``.
* ``candidate``: the next ``M`` (``--pool``, default the largest N); the draws Best-of-N selects from.

With ``--policy`` (a model folder, a hub id, or a LoRA adapter folder put on ``--model``) the
policy also draws ``--policy-samples`` answers per prompt at temperature 1 and top_p 1, so the
sampler's log-probability is exactly log π(y); log π_ref(y) of the same tokens comes from
``bonbench.logprobs.sequence_logprobs`` under the reference. A policy is measured against the pool
of its ``--out``: pointed at an existing run it draws the pool only for prompts that lack one (a
grown ``--limit``) and adds its own samples, so any number of policies, measured one command at a
time, share one reference pool.

Estimators (one summary row per method: ``BoN-N`` for each N, ``policy:<slug>`` for each policy)
------------------------------------------------------------------------------------------------
Each per-prompt number below is unbiased for its per-prompt expectation; the summary averages
prompts with equal weight, and every ``*_se`` is the standard error of that average across
prompts (prompts are independent; samples within a prompt are not counted as independent).

* ``reward``: BoN-N, ``E[max of N rewards]`` by the U-statistic ``bon.expected_best_of`` over all
  ``k + M`` pool samples (the average over every N-subset of the pool); policy, the mean reward.
* ``log_quantile``: BoN-N, ``E[log p̂≤(y_BoN)]`` over every N-subset of the candidates, quantiles
  against the disjoint references (``expected_best_of`` applied to the candidates' log quantiles:
  log p̂≤ is non-decreasing in the reward, so the best candidate of a subset has the largest);
  policy, the mean over its samples. ``log_quantile_theory`` is what this estimator gives for an
  exact BoN-N when rewards are continuous: ``E[log((c+1)/(k+1))]``, ``c ~ Binomial(k, U)``,
  ``U ~ Beta(N, 1)``; the rank metrics of Best-of-N do not depend on the model or the reward, so
  these rows are the scale a policy's log quantile is read on.
* ``win_rate`` with its Wilson interval ``[win_low, win_high]`` (``bon.win_rate``, ties count
  half) on ``win_pairs`` disjoint comparisons: BoN-N splits the candidates into ``⌊M/N⌋`` groups
  of N in draw order (at most k) and compares the best of group g with reference g; the policy
  compares its sample i with reference i. No sample is compared with itself and none is used
  twice in one method's comparisons. The interval treats the pairs as independent; pairs of one
  prompt share the prompt, so it is a little optimistic when the true rate varies by prompt.
  ``win_rate_all`` is the lower-variance point estimate that compares with all k references,
  ``(p̂< + p̂≤)/2`` (over every N-subset for BoN-N). ``win_rate_theory = N/(N+1)``, exact without
  ties (MATH.md §1); for BoN against its own reference the measured rate can only differ from it
  by ties (identical answers) and noise, which makes it a check of the pipeline.
* ``kl_analytic = log N − (N−1)/N`` (``bon.bon_kl``): KL(π_BoN || π_ref), exact when no answer
  repeats, an upper bound otherwise. ``duplicate_rate`` (the share of identical pairs among a
  prompt's pool, an unbiased estimate of Σ_y π_ref(y)²) says how far from "no repeats" the run is.
  ``kl_measured`` is left empty for BoN-N on purpose: π_BoN(y) = p≤(y)^N − p<(y)^N needs the
  quantiles of y to within π_ref(y) (e^-50 for a typical answer), which k samples cannot give, and
  the continuous plug-in ``log N + (N−1) log p̂≤`` only re-derives the analytic value with the bias
  of ``log p̂≤``. For the policy, ``kl_measured = mean of log π(y) − log π_ref(y)`` over its samples
  (MATH.md §6): unbiased for KL(π || π_ref) of answers cut at ``--max-tokens`` (a cut answer is
  scored as the prefix it is, under both models).
* ``tokens_per_request``: generated tokens per answer served (BoN-N: N × the pool's mean tokens).
  ``seconds_per_request``: compute time per answer served: each sampling batch's wall time shared
  among its samples by token count, plus, for N > 1, the reward's time per sample; N samples for
  BoN-N, one for the policy (no reward needed). Times depend on the batch size used (policy
  batches are smaller than pool batches) and on the machine; tokens do not.

Storage and resuming: every prompt's pool goes to ``OUT/samples/prompt-<index>.parquet`` as soon
as its batch is scored, and each policy's samples to ``OUT/samples/policy-<slug>/prompt-<index>.parquet``
(``<slug>``: the policy path's last two parts, ``runs/jbond/policy`` -> ``jbond-policy``, made
unique within the run). A rerun with the same ``--out`` samples only what is missing: the pool of
prompts without one (``--limit`` may grow; ``--ns`` may change within the pool) and, with
``--policy``, that policy's samples of prompts without them; then it recomputes all tables from
every stored sample, with a row for every policy measured in ``--out`` (its ``prompts`` column
says how many of the prompts it covers). The settings that define the pool (``--model``,
``--reward-model``, ``--task``, ``--split``, ``--k``, ``--pool``, ``--max-tokens``,
``--temperature``, ``--seed``, ``--dtype``) must match ``run.json``'s ``settings``; the policies
are listed under its ``policies`` (slug, path as given, resolved path, ``--policy-samples``, which
must stay the same for one policy). A policy is known by its path: a policy retrained into the
same folder is measured as a new one only under a new path (or after deleting its
``samples/policy-<slug>``). Each prompt's seed depends only on ``--seed`` and the prompt's index,
not on what else is in its batch or which command drew it.

Outputs in ``--out``: ``samples`` (a ``policy`` column holds the slug of policy rows), ``per_prompt``
and ``summary`` (``policy_path``: the policy of a ``policy:<slug>`` row) as .parquet and .csv, plus
``summary.md`` and ``run.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonbench import bon
from bonbench.config import field, parse_config
from bonbench.rewards import REWARD_HELP

log = logging.getLogger("bonbench.measure")

# Settings that define the reference pool: they must not change between a run and its resumption.
# The policy settings (--policy, --policy-samples) are not among them: policies come and go.
_RESUME_KEYS = ("model", "reward_model", "task", "split", "k", "pool", "max_tokens", "temperature", "seed",
                "dtype")
SAMPLE_COLUMNS = ["prompt_index", "prompt_id", "role", "policy", "sample_index", "text", "num_tokens",
                  "finish_reason", "logprob", "ref_logprob", "sample_seconds", "reward", "reward_seconds", "created"]


@dataclass
class MeasureConfig:
    model: str = field("default", "the reference policy: 'default' (embedded SmolLM2-135M-Instruct), "
                                  "a Hugging Face id or a folder")
    policy: str = field("", "a policy to compare with Best-of-N: a model folder, or a PEFT LoRA adapter "
                            "folder (adapter_config.json) applied to --model")
    reward_model: str = field("default", REWARD_HELP)
    task: str = field("default", "prompt set: 'default' (shipped news passages), 'xsum', or a dataset "
                                 "with XSum's columns")
    split: str = field("test", "split of the task")
    limit: int = field(0, "number of prompts, the first of the split (0: all)")
    ns: list[int] = field([1, 2, 4, 8, 16], "the N values of Best-of-N")
    k: int = field(16, "reference samples per prompt: the reward distribution quantiles are taken against")
    pool: int = field(0, "candidate samples per prompt that Best-of-N selects from (0: the largest N)")
    policy_samples: int = field(4, "samples per prompt from --policy")
    max_tokens: int = field(48, "most tokens per answer")
    temperature: float = field(1.0, "sampling temperature of the reference (the policy samples at 1)")
    batch_prompts: int = field(2, "prompts per sampling batch (each brings k + pool rows)")
    logprob_batch: int = field(16, "answers per teacher-forced forward pass (policy KL)")
    seed: int = field(0, "random seed; each prompt's samples depend only on it and the prompt's index")
    out: str = field("", "output folder (default: runs/measure/<timestamp>); an existing one is resumed")
    dtype: str = field("auto", "auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16")
    device: str = field("cpu", "cpu or cuda[:i]")
    threads: int = field(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        if not self.ns or any(n < 1 for n in self.ns):
            raise ValueError(f"--ns needs positive integers, got {self.ns}")
        self.ns = sorted(set(int(n) for n in self.ns))
        if self.k < 1:
            raise ValueError(f"--k must be >= 1 (quantiles need reference samples), got {self.k}")
        if self.pool < 0 or (self.pool and self.pool < max(self.ns)):
            raise ValueError(f"--pool {self.pool} cannot hold a Best-of-{max(self.ns)}; use 0 (auto) "
                             f"or at least {max(self.ns)}")
        if self.limit < 0:
            raise ValueError(f"--limit must be >= 0 (0: all prompts), got {self.limit}")
        if self.policy_samples < 1:
            raise ValueError(f"--policy-samples must be >= 1, got {self.policy_samples}")
        if self.max_tokens < 1 or self.batch_prompts < 1 or self.logprob_batch < 1:
            raise ValueError("--max-tokens, --batch-prompts and --logprob-batch must be >= 1")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: Best-of-N needs distinct random samples")
        if self.policy and self.temperature != 1.0:
            raise ValueError("--policy needs --temperature 1: the policy's KL, win rate and quantiles are "
                             "measured against the reference distribution itself")


# ---------------------------------------------------------------------------------------
# Estimators (pure)


def log_quantile_theory(n: int, k: int) -> float:
    """``E[log((c + 1)/(k + 1))]`` for an exact Best-of-n sample under continuous rewards.

    The sample's quantile is ``U ~ Beta(n, 1)`` (the largest of n uniforms) and the count of
    k independent references at or below it is ``c | U ~ Binomial(k, U)``, so
    ``P(c) = C(k, c) · n · B(c + n, k − c + 1)``.
    """
    from scipy.special import betaln, gammaln

    c = np.arange(k + 1, dtype=np.float64)
    log_p = gammaln(k + 1.0) - gammaln(c + 1.0) - gammaln(k - c + 1.0) + math.log(n) + betaln(c + n, k - c + 1.0)
    return float(np.sum(np.exp(log_p) * np.log((c + 1.0) / (k + 1.0))))


def bon_pairs(candidate_rewards, reference_rewards, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint BoN-n comparisons of one prompt: ``G = min(⌊M/n⌋, K)`` groups of n candidates in
    draw order; the best of group g faces reference g. Returns (best rewards, reference rewards),
    each ``(G,)``."""
    cand, ref = np.asarray(candidate_rewards, float), np.asarray(reference_rewards, float)
    groups = min(len(cand) // n, len(ref))
    best = cand[: groups * n].reshape(groups, n).max(axis=1)
    return best, ref[:groups]


def duplicate_rate(texts) -> float:
    """Share of identical pairs among ``texts`` (NaN for fewer than two)."""
    count = len(texts)
    if count < 2:
        return float("nan")
    same = sum(c * (c - 1) // 2 for c in Counter(texts).values())
    return same / (count * (count - 1) / 2)


def prompt_stats(samples, ns: list[int]) -> tuple[list[dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One prompt's per-method statistics (see the module docstring) and win-rate pairs.

    ``samples``: the prompt's rows of the samples table; policy rows are told apart by the
    ``policy`` column (method ``policy:<slug>``; ``policy`` where the column is absent or empty).
    Returns one row per method and, per method, the (own rewards, reference rewards) of its
    disjoint comparisons.
    """
    by_role = {role: g.sort_values("sample_index") for role, g in samples.groupby("role")}
    ref, cand = by_role["reference"], by_role["candidate"]
    ref_r, cand_r = ref["reward"].to_numpy(float), cand["reward"].to_numpy(float)
    pool = samples[samples["role"] != "policy"]
    base = {"prompt_index": int(samples["prompt_index"].iloc[0]), "prompt_id": samples["prompt_id"].iloc[0]}
    rows, pairs = [], {}
    if max(ns) > len(cand_r):
        raise ValueError(f"N = {max(ns)} exceeds the {len(cand_r)} candidates stored per prompt")
    quant = bon.mc_quantiles(cand_r, ref_r)
    cand_logq = bon.log_quantile(cand_r, ref_r)
    cand_win = 0.5 * (quant.p_less + quant.p_leq)
    mean_tokens = pool["num_tokens"].mean()
    sample_s, reward_s = pool["sample_seconds"].mean(), pool["reward_seconds"].mean()
    dup = duplicate_rate(list(pool["text"]))
    for n in ns:
        mine, theirs = bon_pairs(cand_r, ref_r, n)
        method = f"BoN-{n}"
        pairs[method] = (mine, theirs)
        rows.append({**base, "method": method, "n": n,
                     "reward": float(bon.expected_best_of(pool["reward"].to_numpy(float), n)),
                     "log_quantile": float(bon.expected_best_of(cand_logq, n)),
                     "win_rate": bon.win_rate(mine, theirs).rate, "win_pairs": len(mine),
                     "win_rate_all": float(bon.expected_best_of(cand_win, n)),
                     "kl_measured": float("nan"), "duplicate_rate": dup,
                     "tokens_per_request": n * mean_tokens,
                     "seconds_per_request": n * sample_s + (n * reward_s if n > 1 else 0.0)})
    policy_rows = samples[samples["role"] == "policy"]
    policy_rows = policy_rows.assign(policy=policy_rows["policy"].fillna("") if "policy" in policy_rows else "")
    for label, pol in policy_rows.groupby("policy", sort=False):
        method = f"policy:{label}" if label else "policy"
        pol = pol.sort_values("sample_index")
        pol_r = pol["reward"].to_numpy(float)
        count = min(len(pol_r), len(ref_r))
        pairs[method] = (pol_r[:count], ref_r[:count])
        quant = bon.mc_quantiles(pol_r, ref_r)
        rows.append({**base, "method": method, "n": 1, "reward": float(pol_r.mean()),
                     "log_quantile": float(bon.log_quantile(pol_r, ref_r).mean()),
                     "win_rate": bon.win_rate(*pairs[method]).rate, "win_pairs": count,
                     "win_rate_all": float((0.5 * (quant.p_less + quant.p_leq)).mean()),
                     "kl_measured": float((pol["logprob"] - pol["ref_logprob"]).mean()),
                     "duplicate_rate": duplicate_rate(list(pol["text"])),
                     "tokens_per_request": float(pol["num_tokens"].mean()),
                     "seconds_per_request": float(pol["sample_seconds"].mean())})
    return rows, pairs


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def summarize(samples, ns: list[int], k: int, policy_paths: dict[str, str] | None = None):
    """``(per_prompt, summary)`` DataFrames from the samples table (module docstring).

    ``policy_paths``: slug -> path of the policies, for the summary's ``policy_path`` column."""
    import pandas as pd

    rows, pairs = [], {}
    for _, group in samples.groupby("prompt_index", sort=True):
        prompt_rows, prompt_pairs = prompt_stats(group, ns)
        rows += prompt_rows
        for method, (mine, theirs) in prompt_pairs.items():
            pairs.setdefault(method, []).append((mine, theirs))
    per_prompt = pd.DataFrame(rows)
    summary = []
    for method, group in per_prompt.groupby("method", sort=False):
        n = int(group["n"].iloc[0])
        is_bon = method.startswith("BoN-")
        mine = np.concatenate([m for m, _ in pairs[method]])
        theirs = np.concatenate([t for _, t in pairs[method]])
        win = bon.win_rate(mine, theirs)
        reward, reward_se = _mean_se(group["reward"].to_numpy(float))
        logq, logq_se = _mean_se(group["log_quantile"].to_numpy(float))
        kl, kl_se = _mean_se(group["kl_measured"].to_numpy(float))
        summary.append({
            "method": method, "n": n, "prompts": len(group),
            "reward": reward, "reward_se": reward_se,
            "log_quantile": logq, "log_quantile_se": logq_se,
            "log_quantile_theory": log_quantile_theory(n, k) if is_bon else float("nan"),
            "win_rate": win.rate, "win_low": win.low, "win_high": win.high, "win_pairs": win.count,
            "win_rate_all": float(group["win_rate_all"].mean()),
            "win_rate_theory": float(bon.bon_win_rate(n)) if is_bon else float("nan"),
            "kl_measured": kl, "kl_measured_se": kl_se,
            "kl_analytic": float(bon.bon_kl(n)) if is_bon else float("nan"),
            "duplicate_rate": float(group["duplicate_rate"].mean()),
            "tokens_per_request": float(group["tokens_per_request"].mean()),
            "seconds_per_request": float(group["seconds_per_request"].mean()),
            "policy_path": "" if is_bon else (policy_paths or {}).get(method.partition(":")[2], ""),
        })
    return per_prompt, pd.DataFrame(summary)


# ---------------------------------------------------------------------------------------
# Models


@dataclass
class _Models:
    ref_model: object
    tokenizer: object
    eos: list[int]
    policy_model: object = None
    policy_tokenizer: object = None
    policy_eos: list[int] | None = None


def load_policy(path: str, ref_path: str, dtype: str, device: str):
    """A policy folder, or a PEFT LoRA adapter (``adapter_config.json``) merged onto the reference's
    weights. Returns (model, tokenizer)."""
    from bonbench.backends.transformers import load_causal_lm
    from bonbench.models import resolve_policy

    return load_causal_lm(resolve_policy(path), dtype, device, adapter_base=ref_path)


def load_models(cfg: MeasureConfig, policy: bool = True) -> _Models:
    """The reference, and ``cfg.policy`` if given and ``policy``."""
    from bonbench.backends.transformers import eos_ids, load_causal_lm
    from bonbench.models import resolve_policy

    ref_path = resolve_policy(cfg.model)
    ref_model, tokenizer = load_causal_lm(ref_path, cfg.dtype, cfg.device)
    models = _Models(ref_model, tokenizer, eos_ids(ref_model, tokenizer))
    if cfg.policy and policy:
        models.policy_model, models.policy_tokenizer = load_policy(cfg.policy, ref_path, cfg.dtype, cfg.device)
        if models.policy_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"--policy {cfg.policy} and --model {cfg.model} have different vocabularies: "
                             "log π − log π_ref needs the same tokens under both")
        models.policy_eos = eos_ids(models.policy_model, models.policy_tokenizer)
    return models


# ---------------------------------------------------------------------------------------
# Sampling and scoring one batch of prompts


def _prompt_seed(seed: int, index: int, role: int) -> int:
    return seed * 10_000_019 + 2 * index + role  # role 0: reference pool, 1: policy


def _timed_sample(model, tokenizer, requests, eos):
    from bonbench.backends.sampling import sample

    start = time.perf_counter()
    results = sample(model, tokenizer, requests, eos, keep_tokens=False)
    seconds = time.perf_counter() - start
    total = sum(c.num_tokens for cands in results for c in cands) or 1
    shares = [[seconds * c.num_tokens / total for c in cands] for cands in results]
    return results, shares


def _encode(tokenizer, prompt, max_tokens: int, model) -> list[int]:
    from bonbench.backends.base import PromptTooLong
    from bonbench.backends.transformers import encode_prompt

    ids = encode_prompt(tokenizer, prompt)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and len(ids) + max_tokens > context:
        raise PromptTooLong(f"a prompt has {len(ids)} tokens; with --max-tokens {max_tokens} it exceeds "
                            f"the model's context of {context}")
    return ids


def measure_pool(models: _Models, reward, cfg: MeasureConfig, pool: int, batch: list[dict]):
    """Sample and score the reference pool (``k`` references, ``pool`` candidates) of a batch.

    ``batch``: dicts with ``index``, ``id``, ``document``. Returns the batch's samples table rows.
    """
    from bonbench.backends.base import SamplingParams
    from bonbench.backends.sampling import SampleRequest
    from bonbench.tasks import summary_prompt

    prompts = [summary_prompt(item["document"]) for item in batch]
    ids = [_encode(models.tokenizer, p, cfg.max_tokens, models.ref_model) for p in prompts]
    requests = [SampleRequest(pid, SamplingParams(n=cfg.k + pool, max_tokens=cfg.max_tokens,
                                                  temperature=cfg.temperature,
                                                  seed=_prompt_seed(cfg.seed, item["index"], 0)))
                for pid, item in zip(ids, batch)]
    pool_cands, pool_secs = _timed_sample(models.ref_model, models.tokenizer, requests, models.eos)
    rows = []
    for item, cands, secs in zip(batch, pool_cands, pool_secs):
        for j, (c, s) in enumerate(zip(cands, secs)):
            role, index = ("reference", j) if j < cfg.k else ("candidate", j - cfg.k)
            rows.append(_row(item, role, index, c, s))
    return _scored(reward, batch, prompts, rows)


def measure_policy(models: _Models, reward, cfg: MeasureConfig, slug: str, batch: list[dict]):
    """Sample ``cfg.policy_samples`` answers per prompt from the policy, score them and teacher-force
    them through the reference (``ref_logprob``). Returns the batch's samples table rows."""
    import torch

    from bonbench.backends.base import SamplingParams
    from bonbench.backends.sampling import SampleRequest
    from bonbench.logprobs import sequence_logprobs
    from bonbench.tasks import summary_prompt

    prompts = [summary_prompt(item["document"]) for item in batch]
    ids = [_encode(models.tokenizer, p, cfg.max_tokens, models.ref_model) for p in prompts]
    pol_ids = [_encode(models.policy_tokenizer, p, cfg.max_tokens, models.policy_model) for p in prompts]
    if pol_ids != ids:
        raise ValueError("the policy's tokenizer encodes the prompts differently from the reference's")
    requests = [SampleRequest(pid, SamplingParams(n=cfg.policy_samples, max_tokens=cfg.max_tokens,
                                                  temperature=1.0, top_p=1.0,
                                                  seed=_prompt_seed(cfg.seed, item["index"], 1)))
                for pid, item in zip(ids, batch)]
    pol_cands, pol_secs = _timed_sample(models.policy_model, models.policy_tokenizer, requests, models.policy_eos)
    flat = [(pid, c) for pid, cands in zip(ids, pol_cands) for c in cands]
    with torch.inference_mode():
        ref_lp = sequence_logprobs(models.ref_model, models.tokenizer, [p for p, _ in flat],
                                   [c.token_ids for _, c in flat], batch_size=cfg.logprob_batch).cpu().tolist()
    lp_iter = iter(ref_lp)
    rows = []
    for item, cands, secs in zip(batch, pol_cands, pol_secs):
        for j, (c, s) in enumerate(zip(cands, secs)):
            rows.append(_row(item, "policy", j, c, s, ref_logprob=next(lp_iter), policy=slug))
    return _scored(reward, batch, prompts, rows)


def _scored(reward, batch, prompts, rows):
    """``rows`` with their rewards, the reward's time per sample and a creation time, as a table."""
    import pandas as pd

    from bonbench.rewards import checked_scores

    by_prompt = {item["index"]: p for item, p in zip(batch, prompts)}
    start = time.perf_counter()
    scores = checked_scores(reward, [by_prompt[r["prompt_index"]] for r in rows], [r["text"] for r in rows])
    per_sample = (time.perf_counter() - start) / len(rows)
    created = pd.Timestamp.now(tz="UTC")
    for r, score in zip(rows, scores):
        r.update(reward=score, reward_seconds=per_sample, created=created)
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def _row(item, role, index, cand, seconds, ref_logprob=float("nan"), policy="") -> dict:
    return {"prompt_index": item["index"], "prompt_id": item["id"], "role": role, "policy": policy,
            "sample_index": index, "text": cand.text, "num_tokens": cand.num_tokens,
            "finish_reason": cand.finish_reason, "logprob": cand.logprob, "ref_logprob": ref_logprob,
            "sample_seconds": seconds}


# ---------------------------------------------------------------------------------------
# Storage and resumption


def _settings(cfg: MeasureConfig, pool: int) -> dict:
    values = dataclasses.asdict(cfg) | {"pool": pool}
    return {key: values[key] for key in _RESUME_KEYS}


def _read_run(out: Path) -> dict | None:
    saved = out / "run.json"
    return json.loads(saved.read_text()) if saved.exists() else None


def _write_run(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out / "run.json")


def _resolve_pool(cfg: MeasureConfig, out: Path) -> int:
    """``--pool``, else the pool of the run being resumed, else the largest N."""
    saved = _read_run(out)
    if cfg.pool:
        return cfg.pool
    if saved is not None:
        pool = saved["settings"]["pool"]
        if pool < max(cfg.ns):
            raise ValueError(f"{out} holds {pool} candidates per prompt, too few for Best-of-{max(cfg.ns)}")
        return pool
    return max(cfg.ns)


def _check_resume(cfg: MeasureConfig, out: Path, pool: int) -> None:
    """The pool settings must match those of ``run.json`` (written on a first run). Settings of runs
    from before policies were kept apart (``policy``, ``policy_samples``) are not compared."""
    settings = _settings(cfg, pool)
    saved = _read_run(out)
    if saved is not None:
        before = saved["settings"]
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out} holds a run with other settings ({detail}); use a new --out")
        return
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("policy", "policy_samples")}
    _write_run(out, {"settings": settings, "config": config, "policies": []})


def policy_slug(path: str) -> str:
    """A folder-name label for a policy: the last two parts of its path or hub id, ``-``-joined
    (``runs/jbond/policy`` -> ``jbond-policy``)."""
    parts = [part for part in Path(path).parts if part not in ("/", ".", "..")]
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", "-".join(parts[-2:])).strip("-.")
    return slug or "policy"


def _policy_key(path: str) -> str:
    """What identifies a policy: the resolved folder, or the name as given (a hub id)."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def register_policy(cfg: MeasureConfig, out: Path) -> dict:
    """``cfg.policy``'s entry in ``run.json``'s ``policies`` (``slug``, ``path``, ``resolved``,
    ``policy_samples``), added with a slug no other policy of the run has if it is new."""
    data = _read_run(out)
    policies = data.setdefault("policies", [])
    key = _policy_key(cfg.policy)
    for entry in policies:
        if entry["resolved"] == key or entry["path"] == cfg.policy:
            if entry["policy_samples"] != cfg.policy_samples:
                raise ValueError(f"{out} holds samples of policy {entry['path']} drawn with --policy-samples "
                                 f"{entry['policy_samples']}, not {cfg.policy_samples}; use that, or delete "
                                 f"{_policy_dir(out, entry['slug'])} and its entry in run.json")
            return entry
    taken = {entry["slug"] for entry in policies}
    base = slug = policy_slug(cfg.policy)
    count = 1
    while slug in taken or _policy_dir(out, slug).exists():
        count += 1
        slug = f"{base}-{count}"
    entry = {"slug": slug, "path": cfg.policy, "resolved": key, "policy_samples": cfg.policy_samples}
    policies.append(entry)
    _write_run(out, data)
    return entry


def _prompt_file(out: Path, index: int) -> Path:
    return out / "samples" / f"prompt-{index:05d}.parquet"


def _policy_dir(out: Path, slug: str) -> Path:
    return out / "samples" / f"policy-{slug}"


def _policy_file(out: Path, slug: str, index: int) -> Path:
    return _policy_dir(out, slug) / f"prompt-{index:05d}.parquet"


def _write_atomic(frame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _read_prompt(path: Path, item: dict):
    import pandas as pd

    frame = pd.read_parquet(path)
    if set(frame["prompt_id"]) != {item["id"]}:
        raise ValueError(f"{path} holds prompt {frame['prompt_id'].iloc[0]!r}, but prompt "
                         f"{item['index']} of the task is {item['id']!r}")
    return frame


def load_samples(out: Path, items: list[dict], policies: list[dict] = ()):
    """The stored samples of ``items`` (those that have a pool file), checked against the prompt ids:
    per prompt its pool, then the samples of each of ``policies`` (``run.json`` entries) it has."""
    import pandas as pd

    frames, legacy = [], 0
    for item in items:
        path = _prompt_file(out, item["index"])
        if not path.exists():
            continue
        frame = _read_prompt(path, item)
        if "policy" not in frame:
            frame.insert(frame.columns.get_loc("role") + 1, "policy", "")
        if (frame["role"] == "policy").any():  # a run from before policies had files of their own
            legacy += 1
            frame = frame[frame["role"] != "policy"]
        frames.append(frame)
        for entry in policies:
            path = _policy_file(out, entry["slug"], item["index"])
            if path.exists():
                frames.append(_read_prompt(path, item).assign(policy=entry["slug"]))
    if legacy:
        log.warning("%d prompt files in %s hold policy samples from an older bonbench among the pool's; they "
                    "are left out (measure that policy again with --policy)", legacy, out / "samples")
    return pd.concat(frames, ignore_index=True)[SAMPLE_COLUMNS] if frames else None


def write_tables(out: Path, samples, per_prompt, summary) -> None:
    for name, frame in (("samples", samples), ("per_prompt", per_prompt), ("summary", summary)):
        frame.to_parquet(out / f"{name}.parquet", index=False)
        frame.to_csv(out / f"{name}.csv", index=False)
    (out / "summary.md").write_text(to_markdown(summary) + "\n")


def to_markdown(frame, digits: int = 4) -> str:
    """A GitHub markdown table (pandas' own ``to_markdown`` needs ``tabulate``)."""
    def cell(value):
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def _sample_missing(todo: list[dict], cfg: MeasureConfig, desc: str, measure, path_of) -> None:
    """Run ``measure(batch)`` over ``todo`` in batches, each prompt's rows to ``path_of(index)``."""
    from tqdm import tqdm

    tokens, start = 0, time.perf_counter()
    with tqdm(total=len(todo), unit="prompt", desc=desc) as bar:
        for s in range(0, len(todo), cfg.batch_prompts):
            batch = todo[s : s + cfg.batch_prompts]
            frame = measure(batch)
            for item in batch:
                _write_atomic(frame[frame["prompt_index"] == item["index"]], path_of(item["index"]))
            tokens += int(frame["num_tokens"].sum())
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")


def run(cfg: MeasureConfig):
    """Measure (resuming from ``cfg.out``), write the tables, return the summary DataFrame."""
    import pandas as pd
    import torch

    from bonbench.rewards import load_reward
    from bonbench.tasks import load_task

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out or f"runs/measure/{time.strftime('%Y%m%d-%H%M%S')}")
    pool = _resolve_pool(cfg, out)
    _check_resume(cfg, out, pool)
    policy = register_policy(cfg, out) if cfg.policy else None
    data = load_task(cfg.task, cfg.split, cfg.limit or None)
    items = [{"index": i, "id": str(row["id"]), "document": row["document"]} for i, row in enumerate(data)]
    pool_todo = [item for item in items if not _prompt_file(out, item["index"]).exists()]
    policy_todo = [item for item in items if policy and not _policy_file(out, policy["slug"], item["index"]).exists()]
    log.info("%s: %d prompts, %d with a reference pool, %d to sample", out, len(items),
             len(items) - len(pool_todo), len(pool_todo))
    if policy:
        log.info("policy %s (%s): %d prompts measured, %d to sample", policy["slug"], cfg.policy,
                 len(items) - len(policy_todo), len(policy_todo))

    if pool_todo or policy_todo:
        models = load_models(cfg, policy=bool(policy_todo))
        reward = load_reward(cfg.reward_model, device=cfg.device)
        if reward is None:
            raise ValueError("measure needs a reward model; --reward-model none has none")
        if pool_todo:
            _sample_missing(pool_todo, cfg, "reference pool",
                            lambda batch: measure_pool(models, reward, cfg, pool, batch),
                            lambda index: _prompt_file(out, index))
        if policy_todo:
            slug = policy["slug"]
            _sample_missing(policy_todo, cfg, f"policy {slug}",
                            lambda batch: measure_policy(models, reward, cfg, slug, batch),
                            lambda index: _policy_file(out, slug, index))

    policies = _read_run(out).get("policies", [])
    samples = load_samples(out, items, policies)
    covered = samples[samples["role"] == "policy"].groupby("policy")["prompt_index"].nunique()
    for slug, count in covered.items():
        if count < len(items):
            log.warning("policy %s covers %d of the %d prompts; measure the rest with --policy %s", slug, count,
                        len(items), next(e["path"] for e in policies if e["slug"] == slug))
    per_prompt, summary = summarize(samples, cfg.ns, cfg.k, {e["slug"]: e["path"] for e in policies})
    write_tables(out, samples, per_prompt, summary)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(summary.drop(columns="policy_path").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwritten to {out}/ (summary, per_prompt, samples: .parquet and .csv; summary.md)")
    return summary


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(MeasureConfig, argv, prog="python -m bonbench measure",
                       description="What Best-of-N buys and costs (and how a policy compares): "
                                   "reward, log quantile, win rate, KL, tokens and time per request.")
    run(cfg)


if __name__ == "__main__":
    main()
