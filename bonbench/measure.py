r"""``python -m bonbench measure``: what Best-of-N buys and what it costs, and how a policy compares.

    python -m bonbench measure --split test --limit 40 --ns 1 2 4 8 --k 16 --max-tokens 48 \
        --out reports/measure-default
    python -m bonbench measure --split test --limit 40 --ns 1 2 4 8 --k 16 --max-tokens 48 \
        --out reports/measure-default --policy runs/jbond/policy    # a policy against that same pool
    python -m bonbench measure --split test --limit 40 --ns 1 2 4 8 16 32 --k 16 --max-tokens 48 \
        --partial-at 8 16 24 --early-rejection 8:0.5 16:0.25 8,16,24:0.5 \
        --rules soft:temperature=0.1 self-certainty majority --out runs/measure/early-rejection
    python -m bonbench measure --model Qwen/Qwen2.5-1.5B-Instruct --reward-model <hf id> --device cuda
    python -m bonbench measure --reward-model judge --judge-model <name> --judge-base-url <url> \
        --judge-api-key-env OPENAI_API_KEY                                # an LLM judge as the reward

For every prompt the reference π_ref (``--model``) draws one pool of ``k + M`` samples at
``--temperature``, split by draw order into two roles that never overlap:

* ``reference``: the first ``k``; the reward distribution of π_ref for this prompt. Quantiles are
  always taken against these (docs/math.md §2): ``p̂≤(y) = (1/k) Σ_j 1{r(y_j) ≤ r(y)}``, and the log
  quantile is the smoothed ``log((c + 1)/(k + 1))`` of ``bon.log_quantile``.
* ``candidate``: the next ``M`` (``--pool``, default the largest N); the draws Best-of-N selects from.

With ``--policy`` (a model folder, a hub id, or a LoRA adapter folder put on ``--model``) the
policy also draws ``--policy-samples`` answers per prompt at temperature 1 and top_p 1, so the
sampler's log-probability is exactly log π(y); log π_ref(y) of the same tokens comes from
``bonbench.logprobs.sequence_logprobs`` under the reference. A policy is measured against the pool
of its ``--out``: pointed at an existing run it draws the pool only for prompts that lack one (a
grown ``--limit``) and adds its own samples, so any number of policies, measured one command at a
time, share one reference pool.

The command is the orchestration of three modules: ``bonbench/collect.py`` loads the models and
draws and scores the samples, ``bonbench/samplestore.py`` keeps them on disk, and
``bonbench/estimators.py`` (pure) turns them into the tables.

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
  ties (docs/math.md §1); for BoN against its own reference the measured rate can only differ from it
  by ties (identical answers) and noise, which makes it a check of the pipeline.
* ``kl_analytic = log N − (N−1)/N`` (``bon.bon_kl``): KL(π_BoN || π_ref), exact when no answer
  repeats, an upper bound otherwise. ``duplicate_rate`` (the share of identical pairs among a
  prompt's pool, an unbiased estimate of Σ_y π_ref(y)²) says how far from "no repeats" the run is.
  ``kl_measured`` is left empty for BoN-N on purpose: π_BoN(y) = p≤(y)^N − p<(y)^N needs the
  quantiles of y to within π_ref(y) (e^-50 for a typical answer), which k samples cannot give, and
  the continuous plug-in ``log N + (N−1) log p̂≤`` only re-derives the analytic value with the bias
  of ``log p̂≤``. For the policy, ``kl_measured = mean of log π(y) − log π_ref(y)`` over its samples
  (docs/math.md §6): unbiased for KL(π || π_ref) of answers cut at ``--max-tokens`` (a cut answer is
  scored as the prefix it is, under both models).
* ``tokens_per_request``: generated tokens per answer served (BoN-N: N × the pool's mean tokens).
  ``seconds_per_request``: compute time per answer served: each sampling batch's wall time shared
  among its samples by token count, plus, for N > 1, the reward's time per sample; N samples for
  BoN-N, one for the policy (no reward needed). Times depend on the batch size used (policy
  batches are smaller than pool batches) and on the machine; tokens do not.

Best-of-N variants (``--rules``, ``--early-rejection``; rows ``BoN-N:<rule>`` and ``ER-N:<plan>``)
--------------------------------------------------------------------------------------------------
Each variant is measured at every N > 1 of ``--ns`` on the candidates BoN-N selects from, cut in
draw order into the same ``⌊M/N⌋`` disjoint groups of N (at most k) as BoN-N's win rate
(``estimators.bon_groups``); each group is one request of N candidates, and the variant serves one
of them (``estimators.variant_prompt_rows``):

* ``BoN-N:<rule>``, a selection rule of ``bonbench.select`` (``--rules soft:temperature=0.1
  regularized:beta=0.01,penalty=length self-certainty majority``, the specs of ``parse_rule``;
  the label writes its parameters, ``soft(temperature=0.1)``): ``rule.choose`` on the group's
  texts, token counts, rewards, log-probabilities (under π_ref at ``--temperature``) and
  self-certainties. ``soft`` on group g of prompt p draws from ``derive_seed(--seed, p, N, g)``,
  the same stream for every rule and setting. ``BoN-N:argmax`` is BoN-N on the groups alone.
* ``ER-N:<checkpoints>:<keep>``, early rejection (``bonbench.rejection``; ``--early-rejection
  8,16:0.5``, each checkpoint one of ``--partial-at``): ``rejection.simulate`` on the group, with
  the partial rewards the pool stored. Each candidate of a seeded request draws from its own
  generator, so rejecting some candidates does not change the tokens of the others, and the replay
  on candidates drawn to their end serves exactly what the online rule would; one pool gives the
  whole cost/quality curve. With ``keep`` 1 nothing is rejected and the row is ``BoN-N:argmax``'s,
  except for the time of the partial scorings.

Per prompt, ``reward``, ``log_quantile`` and ``win_rate_all`` are the means over the groups of the
served candidate's values (unbiased for the variant's expectations on one request of N: the groups
are independent requests), and the win-rate pairs are the served answer of group g against
reference g, the comparisons of BoN-N. ``tokens_per_request`` is the mean over groups of the
tokens drawn: the whole group for a rule, for early rejection each candidate up to where it was
rejected (its first c tokens) or its end. ``seconds_per_request``: the group's sampling time (for
early rejection, each candidate's share in proportion to the tokens it drew), plus the reward's
time per sample on every candidate for a rule that reads the reward (none for ``self-certainty``
and ``majority``), and for early rejection ``partial_seconds`` (the reward's time per partial
answer, measured when the pool was scored) for each partial answer scored plus the reward's time
on the candidates that ran to their end. ``kl_measured``, ``kl_analytic`` and the theory columns
are empty: no variant's distribution has the closed form of BoN-N's, and its likelihood is out of
reach of k samples for the reason given for ``kl_measured`` above. Tests:
``tests/bonbench/test_estimators.py`` (against brute force and a hand-made pool) and
``tests/bonbench/test_measure.py::test_rules_and_early_rejection_are_rows_measured_on_the_same_candidates``.

Storage and resuming: every prompt's pool goes to ``OUT/samples/prompt-<index>.parquet`` as soon
as its batch is scored, and each policy's samples to ``OUT/samples/policy-<slug>/prompt-<index>.parquet``
(``<slug>``: the policy path's last two parts, ``runs/jbond/policy`` -> ``jbond-policy``, made
unique within the run). A rerun with the same ``--out`` samples only what is missing: the pool of
prompts without one (``--limit`` may grow; ``--ns``, ``--rules`` and ``--early-rejection`` may
change within the pool) and, with
``--policy``, that policy's samples of prompts without them; then it recomputes all tables from
every stored sample, with a row for every policy measured in ``--out`` (its ``prompts`` column
says how many of the prompts it covers). The settings that define the pool (``--model``,
``--reward-model``, ``--judge-model``, ``--task``, ``--split``, ``--k``, ``--pool``, ``--max-tokens``,
``--temperature``, ``--seed``, ``--dtype``, ``--partial-at``) must match ``run.json``'s
``settings``; a folder written before a setting existed counts as having its default (no
``--partial-at``), and its samples read back with NaN in the columns they lack
(``self_certainty``, ``partial_seconds``), so ``--rules self-certainty`` is refused there; the policies
are listed under its ``policies`` (slug, path as given, resolved path, ``--policy-samples``, which
must stay the same for one policy). A policy is known by its path: a policy retrained into the
same folder is measured as a new one only under a new path (or after deleting its
``samples/policy-<slug>``). Each prompt's seed depends only on ``--seed`` and the prompt's index,
not on what else is in its batch or which command drew it.

Every sample stores the sampler's ``self_certainty`` (``bonbench.select``); with ``--partial-at
c1 c2 ...`` (which needs a reward with ``score_partial``), each pool candidate also stores
``partial_reward_<c>``, the reward's ``score_partial`` of its first c tokens (decoded without
special tokens), for every checkpoint c it runs past (more than c tokens; NaN otherwise, and for
references and policies), and ``partial_seconds``, the reward's time per partial answer of its batch.

Outputs in ``--out``: ``samples`` (a ``policy`` column holds the slug of policy rows), ``per_prompt``
and ``summary`` (``policy_path``: the policy of a ``policy:<slug>`` row) as .parquet and .csv, plus
``summary.md`` and ``run.json``. The per-prompt files under ``OUT/samples/`` are the run's working
store, kept to resume and grow it; a report commits the tables and leaves them out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bonbench.cli import run_command, setup_logging
from bonbench.collect import SamplingOptions
from bonbench.config import option, parse_config
from bonbench.errors import UserError
from bonbench.samplestore import SampleStore, pool_settings

log = logging.getLogger("bonbench.measure")


@dataclass
class MeasureConfig(SamplingOptions):
    """``bonbench.collect.SamplingOptions`` (model, reward, task, pool and sampling) and these."""

    policy: str = option("", "a policy to compare with Best-of-N: a model folder, or a PEFT LoRA adapter "
                            "folder (adapter_config.json) applied to --model")
    rules: list[str] = option([], "selection rules to measure beside the argmax at every N > 1, as "
                                  "NAME[:key=value,...] (bonbench.select), e.g. soft:temperature=0.1 majority")
    early_rejection: list[str] = option([], "early rejection to measure at every N > 1, as CHECKPOINTS:KEEP "
                                            "(bonbench.rejection), e.g. 8,16:0.5; each checkpoint must be one "
                                            "of --partial-at")
    out: str = option("", "output folder (default: runs/measure/<timestamp>); an existing one is resumed")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_policy_temperature(bool(self.policy))
        self.selection_rules()  # a bad spec is a usage error now, not after the sampling
        for plan in self.rejection_plans():
            if not set(plan.checkpoints) <= set(self.partial_at):
                raise ValueError(f"--early-rejection {plan.label} scores partial answers at "
                                 f"{', '.join(map(str, plan.checkpoints))} tokens: each checkpoint must be one of "
                                 f"--partial-at (now {' '.join(map(str, self.partial_at)) or 'none'})")
        if (self.rules or self.early_rejection) and max(self.ns) < 2:
            raise ValueError("--rules and --early-rejection are measured at each N > 1 of --ns; it has none")

    def selection_rules(self) -> list:
        """``--rules`` as ``bonbench.select`` rules (a ``SelectionError``, a ``ValueError``, on a bad spec)."""
        from bonbench.select import parse_rule

        return [parse_rule(spec) for spec in self.rules]

    def rejection_plans(self) -> list:
        """``--early-rejection`` as ``bonbench.rejection.EarlyRejection`` plans."""
        from bonbench.rejection import parse_early_rejection

        return [parse_early_rejection(spec) for spec in self.early_rejection]


# ---------------------------------------------------------------------------------------


def check_inputs(cfg: MeasureConfig) -> None:
    """What can be wrong before any model loads (``bonbench.collect.check_sources``)."""
    from bonbench.collect import check_sources

    check_sources(cfg, [cfg.policy] if cfg.policy else [])


def _open_store(cfg: MeasureConfig, out: Path) -> tuple[SampleStore, int, dict | None]:
    """The run folder, its pool size and ``cfg.policy``'s entry (None without one), after checking
    that the pool settings match those of the run being resumed (or starting ``run.json``)."""
    store = SampleStore(out)
    pool = store.pool_size(cfg.pool, max(cfg.ns))
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("policy", "policy_samples")}
    store.check_settings(pool_settings(dataclasses.asdict(cfg), pool),
                         pool_settings(dataclasses.asdict(MeasureConfig()), pool), config)
    policy = store.register_policy(cfg.policy, cfg.policy_samples) if cfg.policy else None
    return store, pool, policy


def _check_rules_can_read(rules, samples, out: Path) -> None:
    """Refuse a ``self-certainty`` rule on a pool stored without the self-certainty of its candidates
    (drawn by a bonbench that did not store it)."""
    if any(rule.name == "self-certainty" for rule in rules):
        candidates = samples[samples["role"] == "candidate"]
        lacking = candidates.loc[candidates["self_certainty"].isna(), "prompt_index"].unique()
        if len(lacking):
            raise UserError(f"--rules self-certainty reads each candidate's self-certainty, which the pool stored "
                            f"in {out} lacks for {len(lacking)} prompts (drawn before bonbench stored it); "
                            "measure it on a new --out")


def run(cfg: MeasureConfig):
    """Measure (resuming from ``cfg.out``), write the tables, return the summary DataFrame."""
    import pandas as pd
    import torch

    from bonbench.collect import draw_missing
    from bonbench.estimators import Variants, summarize
    from bonbench.tasks import load_task

    check_inputs(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out or f"runs/measure/{time.strftime('%Y%m%d-%H%M%S')}")
    store, pool, policy = _open_store(cfg, out)
    data = load_task(cfg.task, cfg.split, cfg.limit or None)
    items = [{"index": i, "id": str(row["id"]), "document": row["document"]} for i, row in enumerate(data)]
    pool_todo = store.missing(items)
    policy_todo = store.missing(items, store.policy_method(policy["slug"])) if policy else []
    log.info("%s: %d prompts, %d with a reference pool, %d to sample", out, len(items),
             len(items) - len(pool_todo), len(pool_todo))
    if policy:
        log.info("policy %s (%s): %d prompts measured, %d to sample", policy["slug"], cfg.policy,
                 len(items) - len(policy_todo), len(policy_todo))
    draw_missing(cfg, store, pool, pool_todo, [(policy, policy_todo)] if policy else [])

    policies = store.policies()
    samples = store.load_samples(items, policies, cfg.partial_at)
    rules = cfg.selection_rules()
    _check_rules_can_read(rules, samples, out)
    covered = samples[samples["role"] == "policy"].groupby("policy")["prompt_index"].nunique()
    for slug, count in covered.items():
        if count < len(items):
            log.warning("policy %s covers %d of the %d prompts; measure the rest with --policy %s", slug, count,
                        len(items), next(e["path"] for e in policies if e["slug"] == slug))
    per_prompt, summary = summarize(samples, cfg.ns, cfg.k, {e["slug"]: e["path"] for e in policies},
                                    Variants(rules, cfg.rejection_plans(), cfg.seed))
    store.write_tables({"samples": samples, "per_prompt": per_prompt, "summary": summary})
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(summary.drop(columns="policy_path").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwritten to {out}/ (summary, per_prompt, samples: .parquet and .csv; summary.md)")
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(MeasureConfig, argv, prog="python -m bonbench measure",
                       description="What Best-of-N buys and costs (and how a policy compares): "
                                   "reward, log quantile, win rate, KL, tokens and time per request.")
    setup_logging(cfg.log_level)
    check_inputs(cfg)
    run(cfg)


if __name__ == "__main__":
    run_command(main)
