r"""``python -m evals.xsum``: one-sentence summaries against human references, for the reference
policy, Best-of-N and distilled policies.

    python -m evals.xsum                                      # reference, BoN-2/4/8 on 20 test prompts
    python -m evals.xsum --policy runs/jbond/policy runs/bond/policy     # add policies (only they sample)
    python -m evals.xsum --task xsum --limit 200 --device cuda           # EdinburghNLP/xsum (needs the hub)
    python -m evals.xsum --task my_articles.jsonl --out runs/evals/mine  # your own data, XSum's columns
    python -m evals.judge --a runs/evals/xsum/answers.parquet --a-method policy:jbond-policy \
        --b runs/evals/xsum/answers.parquet --b-method reference    # a side-by-side of two methods

Sampling is ``bonbench measure``'s, in-process (``bonbench.collect``): for every prompt the reference
π_ref (``--model``) draws ``k`` reference samples (the reward distribution that quantiles and win
rates are taken against) and ``pool`` candidates (default: the largest N), seeded by the prompt's
index alone; each policy (``--policy``: merged checkpoints or LoRA folders from ``distill``) draws
``--policy-samples`` answers at temperature 1, teacher-forced through π_ref for its KL. The run
folder is a ``bonbench.samplestore.SampleStore``: rerun with the same ``--out`` and only what is
missing is drawn (a grown ``--limit``, a policy added later); every table is recomputed from the
stored samples. ``run.json`` (``"kind": "evals.xsum"``) keeps the settings the pool depends on.

Methods and the answers they serve
----------------------------------
* ``reference`` (kind ``reference``): π_ref's own answer; candidate g is served and faces reference g.
* ``BoN-N`` (kind ``bon``), N in ``--ns``: the candidates cut in draw order into disjoint groups of
  N (``bonbench.estimators.bon_groups``, as measure's win rate), the highest reward of group g
  served (the first in draw order on a tie) and compared with reference g. It costs N samples.
* ``policy:<slug>`` (kind ``policy``): each policy sample is served; sample i faces reference i.

Per served answer (``served`` table): ROUGE-1/2/L F1 against the human summary (``evals.metrics.rouge_f1``,
stemming on), reward, ``log_quantile`` = log((c + 1)/(k + 1)) against the prompt's k references,
length in words and in tokens, and its cost: ``generated_tokens`` and ``seconds`` (a BoN-N answer
costs its whole group's tokens, sampling time and the reward's time; a one-sample answer its own
sampling time), and for a policy ``log_ratio`` = log π(y) − log π_ref(y).

Per method (``summary``): every mean is over prompts, each prompt weighing the same (the mean of
its served answers first), and every ``*_se`` is the standard error of that mean across prompts
(not a bootstrap); a 95% interval is ± 1.96 se. More prompts (``--limit``) tighten them.
``win_rate`` (ties half) and its Wilson interval ``[win_low, win_high]`` pool the disjoint
comparisons of all prompts (``bonbench.bon.win_rate``; ``win_pairs`` of them); ``win_rate_all``
is the lower-variance estimate against every reference sample of the prompt, (p̂< + p̂≤)/2, with
its standard error across prompts. ``kl``: for
``BoN-N`` the analytic log N − (N−1)/N (exact without repeated answers, an upper bound with
them), 0 for the reference, ``kl_kind`` "analytic"; for a policy the measured mean of
log π(y) − log π_ref(y), ``kl_kind`` "measured". ``tokens_per_answer`` and ``seconds_per_answer``:
generation cost per answer served. ``*_delta``: the method minus the reference, paired by prompt
(mean and se of the per-prompt differences). ``flag``: reward hacking (``evals.metrics``), a reward
above the reference's while ROUGE-L falls or the answers grow by more than the 95% interval.

Outputs in ``--out`` (.parquet and .csv each): ``served`` (every answer served), ``answers`` (the
first answer each method served per prompt: one row per method and prompt, the input of
``evals.judge`` with ``--a-method``/``--b-method``), ``per_prompt`` and ``summary`` (also
``summary.md``). The stored samples are in ``OUT/samples/``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bonbench.cli import run_command, setup_logging
from bonbench.collect import SamplingOptions
from bonbench.config import option, parse_config
from bonbench.errors import UserError
from bonbench.samplestore import SampleStore, pool_settings

log = logging.getLogger("evals.xsum")

KIND = "evals.xsum"
PROG = "python -m evals.xsum"
Z95 = 1.96
ANSWER_COLUMNS = ["method", "kind", "n", "prompt_index", "prompt_id", "sample", "prompt", "document", "answer",
                  "reference", "reward", "versus_reward", "win_rate_all", "log_quantile", "log_ratio", "rouge1",
                  "rouge2", "rougeL",
                  "words", "tokens", "generated_tokens", "seconds", "finish_reason"]
MEANS = ["reward", "win_rate_all", "log_quantile", "rouge1", "rouge2", "rougeL", "words",
         "tokens"]  # each with its _se
DELTAS = ["reward", "rougeL", "words"]  # paired against the reference, each as <name>_delta(_se)


@dataclass
class XsumConfig(SamplingOptions):
    """``bonbench.collect.SamplingOptions`` (model, reward, task, pool and sampling) with the defaults
    of the default comparison on a small CPU, and these."""

    task: str = option("default", "prompts with human summaries: 'default' (shipped news passages, offline), "
                                 "'xsum' (EdinburghNLP/xsum, needs the hub), or a JSON/JSONL file with "
                                 "XSum's columns document, summary [, id]")
    limit: int = option(20, "number of prompts, the first of the split (0: all); more prompts tighten the CIs")
    ns: list[int] = option([2, 4, 8], "the N values of Best-of-N (the reference row is Best-of-1)")
    k: int = option(8, "reference samples per prompt: quantiles and win rates are taken against them")
    policy_samples: int = option(4, "answers per prompt from each policy")
    policy: list[str] = option([], "policies to compare: model folders or PEFT LoRA adapter folders "
                                  "(adapter_config.json, applied to --model), e.g. runs/jbond/policy")
    out: str = option("runs/evals/xsum", "output folder; an existing one is resumed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.ns) < 2:
            raise ValueError(f"--ns needs integers >= 2 (the reference row is Best-of-1), got {self.ns}")
        self.check_policy_temperature(bool(self.policy))


# ---------------------------------------------------------------------------------------
# Before any model work: the inputs, the task and the run folder


class Plan(NamedTuple):
    store: SampleStore
    pool: int
    items: list[dict]  # index, id, document, summary, prompt (the chat prompt's text)
    policies: list[dict]  # run.json entries of this command's --policy


def prepare(cfg: XsumConfig) -> Plan:
    """Check the models and the task, open (or resume) the run folder and register the policies.
    Raises ``UserError`` with one sentence on bad input."""
    from bonbench.collect import check_sources
    from bonbench.tasks import load_task, summary_prompt

    check_sources(cfg, cfg.policy)
    try:
        data = load_task(cfg.task, cfg.split, cfg.limit or None)
    except OSError as exc:  # a missing file; the hub unreachable
        raise UserError(f"--task {cfg.task}: {exc}") from None
    items = [{"index": i, "id": str(row["id"]), "document": row["document"], "summary": row["summary"],
              "prompt": summary_prompt(row["document"])[0]["content"]} for i, row in enumerate(data)]
    if not items:
        raise UserError(f"--task {cfg.task} has no prompts in split {cfg.split!r}")
    store = SampleStore(Path(cfg.out))
    pool = store.pool_size(cfg.pool, max(cfg.ns))
    options = dataclasses.asdict(cfg)
    config = {k: v for k, v in options.items() if k not in ("policy", "policy_samples")}
    store.check_settings(pool_settings(options, pool), pool_settings(dataclasses.asdict(XsumConfig()), pool),
                         config, kind=KIND)
    policies = [store.register_policy(path, cfg.policy_samples) for path in cfg.policy]
    return Plan(store, pool, items, policies)


# ---------------------------------------------------------------------------------------
# Served answers (pure: sample tables in, tables out)


def _prompt_answers(samples, ns) -> list[dict]:
    """One prompt's served answers (``ANSWER_COLUMNS`` less the texts and scores filled later)."""
    from bonbench.estimators import bon_groups

    ref = samples[samples["role"] == "reference"].sort_values("sample_index")
    cand = samples[samples["role"] == "candidate"].sort_values("sample_index")
    ref_r, cand_r = ref["reward"].to_numpy(float), cand["reward"].to_numpy(float)
    rows = []

    def serve(method, kind, n, g, sample, tokens, seconds, versus, log_ratio=float("nan")):
        rows.append({"method": method, "kind": kind, "n": n, "sample": g, "answer": sample["text"],
                     "reward": float(sample["reward"]), "versus_reward": versus, "log_ratio": log_ratio,
                     "tokens": int(sample["num_tokens"]), "generated_tokens": int(tokens), "seconds": float(seconds),
                     "finish_reason": sample["finish_reason"]})

    for n in [1, *ns]:
        for g, group in enumerate(bon_groups(len(cand_r), len(ref_r), n)):
            drawn = cand.iloc[group]
            seconds = drawn["sample_seconds"].sum() + (drawn["reward_seconds"].sum() if n > 1 else 0.0)
            serve("reference" if n == 1 else f"BoN-{n}", "reference" if n == 1 else "bon", n, g,
                  cand.iloc[group[np.argmax(cand_r[group])]], drawn["num_tokens"].sum(), seconds, ref_r[g])
    policy = samples[samples["role"] == "policy"]
    for slug, own in policy.groupby("policy", sort=False):
        for i, (_, sample) in enumerate(own.sort_values("sample_index").iterrows()):
            serve(f"policy:{slug}", "policy", 1, i, sample, sample["num_tokens"], sample["sample_seconds"],
                  ref_r[i] if i < len(ref_r) else float("nan"), sample["logprob"] - sample["ref_logprob"])
    for row in rows:
        r = row["reward"]
        row["log_quantile"] = float(np.log((np.sum(ref_r <= r) + 1.0) / (len(ref_r) + 1.0)))
        # against every reference sample of the prompt, ties half: (p̂< + p̂≤) / 2 (docs/math.md §6.2)
        row["win_rate_all"] = float((np.sum(ref_r < r) + 0.5 * np.sum(ref_r == r)) / len(ref_r))
    return rows


def served_answers(samples, ns, items: list[dict]):
    """Every answer each method serves, scored: ``ANSWER_COLUMNS``, methods in the order reference,
    BoN-N by N, policies by registration; within one, by prompt and then draw order.

    ``samples``: a samples table (``bonbench.samplestore.SAMPLE_COLUMNS``); ``items``: the prompts
    (``index``, ``id``, ``document``, ``summary``, ``prompt``).
    """
    import pandas as pd

    from evals.metrics import rouge_f1, word_count

    by_index = {item["index"]: item for item in items}
    rows = []
    for index, group in samples.groupby("prompt_index", sort=True):
        item = by_index[index]
        for row in _prompt_answers(group, ns):
            rows.append(row | {"prompt_index": index, "prompt_id": item["id"], "prompt": item["prompt"],
                               "document": item["document"], "reference": item["summary"]})
    frame = pd.DataFrame(rows)
    frame = frame.assign(**rouge_f1(frame["answer"], frame["reference"]), words=word_count(frame["answer"]))
    order = {m: i for i, m in enumerate(dict.fromkeys(frame["method"]))}
    frame = frame.sort_values(["method", "prompt_index", "sample"], key=lambda c: c.map(order) if c.name == "method"
                              else c, kind="stable")
    return frame[ANSWER_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Per prompt and per method


def per_prompt_table(served):
    """One row per (method, prompt): the means of its served answers and its cost per answer."""
    columns = [*MEANS, "log_ratio", "generated_tokens", "seconds"]
    table = served.groupby(["method", "prompt_index"], sort=False)[columns].mean()
    keys = served.groupby(["method", "prompt_index"], sort=False)[["kind", "n", "prompt_id"]].first()
    return keys.join(table).reset_index()


def _method_row(method, own, answers, reference, policy_paths: dict[str, str]) -> dict:
    """A method's summary row: ``own`` its per-prompt rows, ``answers`` its served answers,
    ``reference`` the reference method's per-prompt rows (indexed by prompt)."""
    from bonbench import bon
    from bonbench.estimators import mean_se

    kind, n = own["kind"].iloc[0], int(own["n"].iloc[0])
    pairs = answers.dropna(subset=["versus_reward"])
    win = bon.win_rate(pairs["reward"].to_numpy(float), pairs["versus_reward"].to_numpy(float))
    if kind == "policy":
        kl, kl_se, kl_kind = *mean_se(own["log_ratio"]), "measured"
    else:
        kl, kl_se, kl_kind = float(bon.bon_kl(n)), float("nan"), "analytic"
    row = {"method": method, "kind": kind, "n": n, "prompts": len(own), "answers": len(answers),
           "tokens_per_answer": float(own["generated_tokens"].mean()),
           "seconds_per_answer": float(own["seconds"].mean()),
           "win_rate": win.rate, "win_low": win.low, "win_high": win.high, "win_pairs": win.count,
           "kl": kl, "kl_se": kl_se, "kl_kind": kl_kind}
    for name in MEANS:
        row[name], row[f"{name}_se"] = mean_se(own[name])
    mine = own.set_index("prompt_index")
    for name in DELTAS:
        row[f"{name}_delta"], row[f"{name}_delta_se"] = mean_se((mine[name] - reference[name]).dropna())
    row["policy_path"] = policy_paths.get(method.removeprefix("policy:"), "") if kind == "policy" else ""
    return row


def summarize(served, policy_paths: dict[str, str] | None = None):
    """``(per_prompt, summary)`` from the served answers; ``policy_paths``: slug -> path."""
    import pandas as pd

    from evals.metrics import reward_hacking_flags

    per_prompt = per_prompt_table(served)
    reference = per_prompt[per_prompt["method"] == "reference"].set_index("prompt_index")
    rows = [_method_row(method, own, served[served["method"] == method], reference, policy_paths or {})
            for method, own in per_prompt.groupby("method", sort=False)]
    summary = pd.DataFrame(rows)
    flags = reward_hacking_flags(summary["reward_delta"], summary["rougeL_delta"], summary["rougeL_delta_se"],
                                 summary["words_delta"], summary["words_delta_se"], z=Z95)
    summary.insert(len(summary.columns) - 1, "flag", flags)
    return per_prompt, summary


# ---------------------------------------------------------------------------------------


def evaluate(cfg: XsumConfig, plan: Plan):
    """Draw what ``plan``'s run folder lacks, score every served answer, write the tables, return
    the summary DataFrame."""
    import pandas as pd
    import torch

    from bonbench.collect import draw_missing

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store, items = plan.store, plan.items
    pool_todo = store.missing(items)
    policy_todo = [(entry, store.missing(items, store.policy_method(entry["slug"]))) for entry in plan.policies]
    log.info("%s: %d prompts, %d to sample for the reference pool; %s", store.root, len(items), len(pool_todo),
             ", ".join(f"policy {e['slug']}: {len(todo)} to sample" for e, todo in policy_todo) or "no new policy")
    draw_missing(cfg, store, plan.pool, pool_todo, policy_todo)

    registered = store.policies()
    samples = store.load_samples(items, registered)
    served = served_answers(samples, cfg.ns, items)
    per_prompt, summary = summarize(served, {e["slug"]: e["path"] for e in registered})
    for row in summary[summary["prompts"] < len(items)].itertuples():
        log.warning("%s covers %d of the %d prompts; rerun with its --policy to sample the rest", row.method,
                    row.prompts, len(items))
    answers = served[served["sample"] == 0].reset_index(drop=True)
    store.write_tables({"served": served, "answers": answers, "per_prompt": per_prompt, "summary": summary})
    shown = ["method", "prompts", "tokens_per_answer", "reward", "win_rate", "win_rate_all", "kl", "rougeL", "words",
             "flag"]
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 80):
        print(summary[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwritten to {store.root}/ (summary, answers, served, per_prompt: .parquet and .csv; summary.md)")
    return summary


def run(cfg: XsumConfig):
    """The whole command: prepare, sample what is missing, write the tables; returns the summary."""
    return evaluate(cfg, prepare(cfg))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(XsumConfig, argv, prog=PROG,
                       description="Summaries against human references: ROUGE, reward, win rate, KL and cost of "
                                   "the reference, Best-of-N and distilled policies, with a reward-hacking flag.")
    setup_logging(cfg.log_level)
    evaluate(cfg, prepare(cfg))


if __name__ == "__main__":
    run_command(main)
