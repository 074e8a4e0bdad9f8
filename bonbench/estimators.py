"""Estimators over stored samples: what Best-of-N and a sampled method score, per prompt and overall.

Pure functions on arrays and sample tables (pandas DataFrames with the columns of
``bonbench.samplestore.SAMPLE_COLUMNS``); no file, model or socket is opened here. The Best-of-N
mathematics they rest on is in ``bonbench/bon.py``; what each estimator estimates, and why, is in
the docstring of ``bonbench/measure.py``. Checked against brute force in
``tests/bonbench/test_estimators.py``.

A prompt's samples come in three roles: ``reference`` (K draws of π_ref that quantiles and win
rates are taken against), ``candidate`` (M further draws of π_ref that Best-of-N selects from) and
``policy`` (draws of another method, told apart by the ``policy`` column). Every per-prompt
number is unbiased for its per-prompt expectation; the summary weighs prompts equally and its
standard errors are across prompts.

Beside plain Best-of-N, the same candidates measure its variants (``Variants``): another selection
rule (``bonbench.select``) or early rejection (``bonbench.rejection``) applied to each disjoint
group of N candidates (``bon_groups``), as if those N had been drawn for one request.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from bonbench import bon
from bonbench.rejection import EarlyRejection, simulate
from bonbench.samplestore import partial_column
from bonbench.seeds import derive_seed
from bonbench.select import Candidates, SelectionRule, describe

__all__ = [
    "Served",
    "Variants",
    "bon_groups",
    "bon_pairs",
    "bon_prompt_rows",
    "duplicate_rate",
    "early_rejection_served",
    "log_quantile_theory",
    "mean_se",
    "prompt_stats",
    "rule_label",
    "rule_served",
    "sampled_prompt_row",
    "served_prompt_row",
    "summarize",
    "variant_prompt_rows",
]

Pairs = tuple[np.ndarray, np.ndarray]  # (a method's rewards, the rewards of the references they face)


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


def bon_pairs(candidate_rewards, reference_rewards, n: int) -> Pairs:
    """Disjoint Best-of-n comparisons of one prompt.

    Args:
        candidate_rewards: shape ``(M,)``, in draw order.
        reference_rewards: shape ``(K,)``, in draw order.
        n: the N of Best-of-N.

    Returns:
        (best rewards, reference rewards), each ``(G,)`` with ``G = min(⌊M/n⌋, K)``: the
        candidates are cut into groups of n in draw order and the best of group g faces reference g.
    """
    cand, ref = np.asarray(candidate_rewards, float), np.asarray(reference_rewards, float)
    groups = bon_groups(len(cand), len(ref), n)
    return cand[groups].max(axis=1), ref[: len(groups)]


def bon_groups(candidates: int, references: int, n: int) -> np.ndarray:
    """The disjoint Best-of-n draws of one prompt's pool, as candidate positions.

    Returns:
        shape ``(G, n)``, ``G = min(⌊candidates/n⌋, references)``: row g holds the positions (in
        draw order) of the n candidates whose best is Best-of-n's g-th answer, compared with
        reference g. Candidates past the last whole group are not used.
    """
    groups = min(candidates // n, references)
    return np.arange(groups * n).reshape(groups, n)


def duplicate_rate(texts: Sequence[str]) -> float:
    """Share of identical pairs among ``texts`` (NaN for fewer than two): an unbiased estimate of
    ``Σ_y π(y)²`` when the texts are independent draws of π."""
    count = len(texts)
    if count < 2:
        return float("nan")
    same = sum(c * (c - 1) // 2 for c in Counter(texts).values())
    return same / (count * (count - 1) / 2)


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``values`` (shape ``(P,)``), NaNs left out; the
    error is NaN with fewer than two values, both are NaN with none."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def bon_prompt_rows(pool, ns: Sequence[int]) -> tuple[list[dict], dict[str, Pairs]]:
    """One prompt's ``BoN-N`` rows, one per N, and their disjoint comparisons.

    ``pool``: the prompt's ``reference`` and ``candidate`` rows. The reward is the U-statistic
    ``E[max of N]`` over the whole pool (K + M samples); the log quantile and ``win_rate_all`` are
    averaged over every N-subset of the candidates, against the references.
    """
    ref = pool[pool["role"] == "reference"].sort_values("sample_index")
    cand = pool[pool["role"] == "candidate"].sort_values("sample_index")
    ref_r, cand_r = ref["reward"].to_numpy(float), cand["reward"].to_numpy(float)
    if max(ns) > len(cand_r):
        raise ValueError(f"N = {max(ns)} exceeds the {len(cand_r)} candidates stored per prompt")
    quant = bon.mc_quantiles(cand_r, ref_r)
    cand_logq = bon.log_quantile(cand_r, ref_r)
    cand_win = 0.5 * (quant.p_less + quant.p_leq)
    mean_tokens = pool["num_tokens"].mean()
    sample_s, reward_s = pool["sample_seconds"].mean(), pool["reward_seconds"].mean()
    dup = duplicate_rate(list(pool["text"]))
    rows, pairs = [], {}
    for n in ns:
        mine, theirs = bon_pairs(cand_r, ref_r, n)
        method = f"BoN-{n}"
        pairs[method] = (mine, theirs)
        rows.append({"method": method, "n": n,
                     "reward": float(bon.expected_best_of(pool["reward"].to_numpy(float), n)),
                     "log_quantile": float(bon.expected_best_of(cand_logq, n)),
                     "win_rate": bon.win_rate(mine, theirs).rate, "win_pairs": len(mine),
                     "win_rate_all": float(bon.expected_best_of(cand_win, n)),
                     "kl_measured": float("nan"), "duplicate_rate": dup,
                     "tokens_per_request": n * mean_tokens,
                     "seconds_per_request": n * sample_s + (n * reward_s if n > 1 else 0.0)})
    return rows, pairs


def sampled_prompt_row(method: str, samples, reference_rewards) -> tuple[dict, Pairs]:
    """One prompt's row for a method that is sampled directly (one answer per request).

    Args:
        method: the row's label.
        samples: the method's rows for the prompt, with ``logprob`` (log π) and ``ref_logprob``
            (log π_ref) of each answer.
        reference_rewards: shape ``(K,)``, the prompt's references in draw order.

    Returns:
        the row, and the comparisons of sample i with reference i (``min(S, K)`` pairs).
    """
    samples = samples.sort_values("sample_index")
    rewards, ref_r = samples["reward"].to_numpy(float), np.asarray(reference_rewards, float)
    count = min(len(rewards), len(ref_r))
    pairs = (rewards[:count], ref_r[:count])
    quant = bon.mc_quantiles(rewards, ref_r)
    row = {"method": method, "n": 1, "reward": float(rewards.mean()),
           "log_quantile": float(bon.log_quantile(rewards, ref_r).mean()),
           "win_rate": bon.win_rate(*pairs).rate, "win_pairs": count,
           "win_rate_all": float((0.5 * (quant.p_less + quant.p_leq)).mean()),
           "kl_measured": float((samples["logprob"] - samples["ref_logprob"]).mean()),
           "duplicate_rate": duplicate_rate(list(samples["text"])),
           "tokens_per_request": float(samples["num_tokens"].mean()),
           "seconds_per_request": float(samples["sample_seconds"].mean())}
    return row, pairs


# ---------------------------------------------------------------------------------------
# Best-of-N variants on the disjoint groups of a prompt's candidates


@dataclass(frozen=True)
class Variants:
    """The Best-of-N variants measured beside ``BoN-N``, each at every N > 1: selection ``rules``
    (row ``BoN-N:<rule_label>``) and ``early_rejection`` plans (row ``ER-N:<plan.label>``).
    ``seed``: the run's seed; the random stream of a rule on group g of prompt p at N is
    ``derive_seed(seed, p, N, g)``, the same for every rule (common random numbers)."""

    rules: Sequence[SelectionRule] = ()
    early_rejection: Sequence[EarlyRejection] = ()
    seed: int = 0


class Served(NamedTuple):
    """What a variant did with each disjoint group of one prompt's candidates, each shape ``(G,)``:
    the candidate it served (position in draw order), the tokens drawn and the compute time spent."""

    chosen: np.ndarray
    tokens: np.ndarray
    seconds: np.ndarray


def rule_label(rule: SelectionRule) -> str:
    """``name`` or ``name(key=value,...)``: ``soft(temperature=0.1)``, ``regularized(beta=0.01,penalty=length)``."""
    params = describe(rule)
    if not params:
        return rule.name
    text = ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in params.items())
    return f"{rule.name}({text})"


def _column(cand, name: str) -> np.ndarray | None:
    """A candidate column as floats, or None where any value is missing (NaN)."""
    values = cand[name].to_numpy(float)
    return None if np.isnan(values).any() else values


def rule_served(rule: SelectionRule, cand, groups: np.ndarray, seeds: Sequence[int]) -> Served:
    """``rule`` applied to each group of one prompt's candidates.

    Args:
        rule: the selection rule; it sees a group's texts, token counts, rewards, log-probabilities
            and self-certainties (``bonbench.select.Candidates``; a column with a NaN is left out).
        cand: the prompt's ``candidate`` rows, in draw order.
        groups: shape ``(G, N)``, candidate positions (``bon_groups``).
        seeds: shape ``(G,)``, the seed of the random stream each group's choice draws from.

    Returns:
        the served candidates; the tokens of the whole group; its sampling time plus, for a rule
        that reads the reward, the reward's time on every candidate.
    """
    texts = cand["text"].tolist()
    lengths = cand["num_tokens"].to_numpy(float)
    columns = {name: _column(cand, column) for name, column in
               (("rewards", "reward"), ("logprobs", "logprob"), ("self_certainty", "self_certainty"))}
    sample_s, reward_s = cand["sample_seconds"].to_numpy(float), cand["reward_seconds"].to_numpy(float)
    chosen, tokens, seconds = [], [], []
    for group, seed in zip(groups, seeds):
        view = Candidates([texts[i] for i in group], lengths[group],
                          **{name: None if values is None else values[group] for name, values in columns.items()})
        chosen.append(group[rule.choose(view, 1, np.random.default_rng(seed)).chosen[0]])
        tokens.append(lengths[group].sum())
        seconds.append(sample_s[group].sum() + (reward_s[group].sum() if rule.needs_reward else 0.0))
    return Served(np.array(chosen, dtype=np.int64), np.array(tokens, float), np.array(seconds, float))


def early_rejection_served(plan: EarlyRejection, cand, groups: np.ndarray) -> Served:
    """Early rejection replayed on each group of one prompt's candidates (``rejection.simulate``).

    Args:
        plan: the checkpoints and the fraction kept; ``cand`` must have the ``partial_reward_<c>``
            column of each checkpoint c.
        cand: the prompt's ``candidate`` rows, in draw order, drawn to their end.
        groups: shape ``(G, N)``, candidate positions (``bon_groups``).

    Returns:
        the served candidates; the tokens drawn (a rejected candidate's first c tokens); the time:
        each candidate's sampling time in proportion to the tokens it drew, ``partial_seconds`` for
        every partial answer scored (each running candidate at each checkpoint), and the reward's
        time on the candidates that ran to their end.
    """
    missing = [partial_column(c) for c in plan.checkpoints if partial_column(c) not in cand]
    if missing:
        raise ValueError(f"early rejection {plan.label} reads {', '.join(missing)}, which the samples lack")
    partial = cand[[partial_column(c) for c in plan.checkpoints]].to_numpy(float)
    lengths = cand["num_tokens"].to_numpy(np.int64)
    rewards = cand["reward"].to_numpy(float)
    sample_s, reward_s = cand["sample_seconds"].to_numpy(float), cand["reward_seconds"].to_numpy(float)
    partial_s = cand["partial_seconds"].to_numpy(float)
    checkpoints = np.array(plan.checkpoints)
    chosen, tokens, seconds = [], [], []
    for group in groups:
        out = simulate(plan, partial[group], lengths[group], rewards[group])
        drawn = np.where(out.rejected_at > 0, out.rejected_at, lengths[group])
        stopped = np.where(out.rejected_at > 0, out.rejected_at, np.iinfo(np.int64).max)
        # candidate i is scored at checkpoint c when it runs there: longer than c, not rejected before c
        scored = ((lengths[group, None] > checkpoints) & (stopped[:, None] >= checkpoints)).sum(axis=1)
        chosen.append(group[out.chosen[0]])
        tokens.append(out.tokens)
        seconds.append((sample_s[group] * drawn / lengths[group]).sum() + (partial_s[group] * scored).sum()
                       + reward_s[group][out.rejected_at == 0].sum())
    return Served(np.array(chosen, dtype=np.int64), np.array(tokens, float), np.array(seconds, float))


def served_prompt_row(method: str, n: int, served: Served, candidate_rewards, reference_rewards) -> tuple[dict, Pairs]:
    """One prompt's row for a variant that served ``served.chosen[g]`` from group g of ``bon_groups``.

    ``reward``, ``log_quantile`` and ``win_rate_all`` are means over the groups of the served
    candidate's values; the served answer of group g faces reference g (as ``bon_pairs``);
    ``tokens_per_request`` and ``seconds_per_request`` are means over the groups. No KL: a
    variant's distribution has no closed form here (NaN). The row has no ``duplicate_rate`` (a
    property of the pool, which the caller adds).
    """
    cand_r, ref_r = np.asarray(candidate_rewards, float), np.asarray(reference_rewards, float)
    rewards = cand_r[served.chosen]
    pairs = (rewards, ref_r[: len(rewards)])
    quant = bon.mc_quantiles(rewards, ref_r)
    row = {"method": method, "n": n, "reward": float(rewards.mean()),
           "log_quantile": float(bon.log_quantile(rewards, ref_r).mean()),
           "win_rate": bon.win_rate(*pairs).rate, "win_pairs": len(rewards),
           "win_rate_all": float((0.5 * (quant.p_less + quant.p_leq)).mean()),
           "kl_measured": float("nan"),
           "tokens_per_request": float(served.tokens.mean()), "seconds_per_request": float(served.seconds.mean())}
    return row, pairs


def variant_prompt_rows(pool, ns: Sequence[int], variants: Variants) -> tuple[list[dict], dict[str, Pairs]]:
    """One prompt's rows of every rule, then every early-rejection plan, each at every N > 1 of
    ``ns``, and their disjoint comparisons. ``pool``: the prompt's ``reference`` and ``candidate``
    rows (with ``prompt_index``)."""
    ref = pool[pool["role"] == "reference"].sort_values("sample_index")
    cand = pool[pool["role"] == "candidate"].sort_values("sample_index")
    ref_r, cand_r = ref["reward"].to_numpy(float), cand["reward"].to_numpy(float)
    prompt = int(pool["prompt_index"].iloc[0])
    dup = duplicate_rate(list(pool["text"]))
    methods = [("BoN", rule_label(rule), rule) for rule in variants.rules]
    methods += [("ER", plan.label, plan) for plan in variants.early_rejection]
    rows, pairs = [], {}
    for family, setting, how in methods:
        for n in (n for n in ns if n > 1):
            groups = bon_groups(len(cand_r), len(ref_r), n)
            if isinstance(how, EarlyRejection):
                served = early_rejection_served(how, cand, groups)
            else:
                served = rule_served(how, cand, groups, [derive_seed(variants.seed, prompt, n, g)
                                                          for g in range(len(groups))])
            method = f"{family}-{n}:{setting}"
            row, pairs[method] = served_prompt_row(method, n, served, cand_r, ref_r)
            rows.append(row | {"duplicate_rate": dup})
    return rows, pairs


def prompt_stats(samples, ns: Sequence[int], variants: Variants | None = None) -> tuple[list[dict], dict[str, Pairs]]:
    """One prompt's per-method statistics and win-rate pairs.

    ``samples``: the prompt's rows of the samples table. Best-of-N rows come first (``BoN-N``),
    then those of ``variants`` (``variant_prompt_rows``), then one row per policy
    (``policy:<slug>`` by the ``policy`` column, ``policy`` if it is empty). Returns the rows, each
    with the prompt's ``prompt_index`` and ``prompt_id``, and per method the (own rewards,
    reference rewards) of its disjoint comparisons.
    """
    base = {"prompt_index": int(samples["prompt_index"].iloc[0]), "prompt_id": samples["prompt_id"].iloc[0]}
    is_policy = samples["role"] == "policy"
    rows, pairs = bon_prompt_rows(samples[~is_policy], ns)
    if variants is not None:
        more_rows, more_pairs = variant_prompt_rows(samples[~is_policy], ns, variants)
        rows += more_rows
        pairs |= more_pairs
    ref = samples[samples["role"] == "reference"].sort_values("sample_index")
    for label, group in samples[is_policy].groupby("policy", sort=False):
        method = f"policy:{label}" if label else "policy"
        row, pairs[method] = sampled_prompt_row(method, group, ref["reward"].to_numpy(float))
        rows.append(row)
    return [base | row for row in rows], pairs


def _summary_row(method: str, group, pairs: list[Pairs], k: int, policy_path: str) -> dict:
    n = int(group["n"].iloc[0])
    is_bon = method == f"BoN-{n}"  # plain Best-of-N, which the theory columns describe
    win = bon.win_rate(np.concatenate([m for m, _ in pairs]), np.concatenate([t for _, t in pairs]))
    reward, reward_se = mean_se(group["reward"])
    logq, logq_se = mean_se(group["log_quantile"])
    kl, kl_se = mean_se(group["kl_measured"])
    return {
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
        "policy_path": policy_path,
    }


def summarize(samples, ns: Sequence[int], k: int, policy_paths: dict[str, str] | None = None,
              variants: Variants | None = None):
    """``(per_prompt, summary)`` DataFrames from a samples table: one row per (prompt, method), and
    one per method with its means, standard errors, pooled win rate and the Best-of-N theory.

    ``k``: the references per prompt (for ``log_quantile_theory``). ``policy_paths``: slug -> path
    of the policies, for the summary's ``policy_path`` column. ``variants``: the Best-of-N
    variants to measure on the same candidates (none by default).
    """
    import pandas as pd

    rows, pairs = [], {}
    for _, group in samples.groupby("prompt_index", sort=True):
        prompt_rows, prompt_pairs = prompt_stats(group, ns, variants)
        rows += prompt_rows
        for method, pair in prompt_pairs.items():
            pairs.setdefault(method, []).append(pair)
    per_prompt = pd.DataFrame(rows)
    paths = {f"policy:{slug}": path for slug, path in (policy_paths or {}).items()}
    summary = [_summary_row(method, group, pairs[method], k, paths.get(method, ""))
               for method, group in per_prompt.groupby("method", sort=False)]
    return per_prompt, pd.DataFrame(summary)
