"""Collect scored samples: load the reference and a policy, draw answers per prompt, score and time them.

The rows produced here are those of the samples table (``bonbench.samplestore.sample_columns``):
one per answer, with its tokens, the sampler's log-probability and self-certainty, its share of the
batch's wall time and its reward; with ``--partial-at``, each pool candidate also carries the
reward's ``score_partial`` of its first c tokens for every checkpoint c it runs past (what early
rejection, ``bonbench.rejection``, reads there). Each prompt's answers are drawn with a seed that
depends only on the run's seed, the prompt's index and the role (reference pool or policy), never on the other prompts of the
batch, so a resumed or grown run draws what a fresh one would.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from bonbench.cli import log_level_option
from bonbench.config import option
from bonbench.errors import UserError
from bonbench.models import DEFAULT_POLICY, locate_model
from bonbench.rewards import REWARD_HELP
from bonbench.samplestore import partial_column, sample_columns
from bonbench.seeds import derive_seed

if TYPE_CHECKING:
    from bonbench.samplestore import SampleStore

POOL, POLICY = 0, 1  # the roles that seed a prompt's draws

__all__ = ["LoadedLM", "Models", "SamplingOptions", "build_reward", "check_model_source", "check_sources",
           "draw_missing", "load_models", "load_policy", "sample_missing", "sample_policy", "sample_pool",
           "score_partial_rows", "score_rows"]


@dataclass
class SamplingOptions:
    """The options of a command that draws a reference pool and policy samples into a run folder
    (``bonbench measure``, ``evals.xsum``): each command's config derives from this one, adds its
    ``policy`` and ``out`` and may change a default."""

    model: str = option("default", "the reference policy: 'default' (embedded SmolLM2-135M-Instruct), "
                                  "a Hugging Face id or a folder")
    reward_model: str = option("default", REWARD_HELP)
    judge_model: str = option("", "the judge's model name on its server, for --reward-model judge")
    judge_base_url: str = option("", "OpenAI-compatible base URL of the judge (default: OpenAI's)")
    judge_api_key_env: str = option("", "name of the environment variable that holds the judge's API key "
                                       "(e.g. OPENAI_API_KEY; the key itself is never written to run.json)")
    task: str = option("default", "prompt set: 'default' (shipped news passages), 'xsum', or a dataset "
                                 "with XSum's columns")
    split: str = option("test", "split of the task")
    limit: int = option(0, "number of prompts, the first of the split (0: all)")
    ns: list[int] = option([1, 2, 4, 8, 16], "the N values of Best-of-N")
    k: int = option(16, "reference samples per prompt: the reward distribution quantiles are taken against")
    pool: int = option(0, "candidate samples per prompt that Best-of-N selects from (0: the largest N)")
    policy_samples: int = option(4, "samples per prompt from --policy")
    max_tokens: int = option(48, "most tokens per answer")
    partial_at: list[int] = option([], "token counts at which each pool candidate's unfinished answer is also "
                                       "scored (the reward's score_partial), for early rejection; none by default")
    temperature: float = option(1.0, "sampling temperature of the reference (the policy samples at 1)")
    batch_prompts: int = option(2, "prompts per sampling batch (each brings k + pool rows)")
    logprob_batch: int = option(16, "answers per teacher-forced forward pass (policy KL)")
    seed: int = option(0, "random seed; each prompt's samples depend only on it and the prompt's index")
    dtype: str = option("auto", "auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16")
    device: str = option("cpu", "cpu or cuda[:i]")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    log_level: str = log_level_option()

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
        self.partial_at = sorted(set(int(c) for c in self.partial_at))
        if any(c < 1 or c >= self.max_tokens for c in self.partial_at):
            raise ValueError(f"--partial-at needs token counts from 1 to --max-tokens - 1 ({self.max_tokens - 1}): "
                             f"no answer runs past {self.max_tokens} tokens; got {self.partial_at}")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: Best-of-N needs distinct random samples")
        judging = self.reward_model == "judge"
        if judging and not self.judge_model:
            raise ValueError("--reward-model judge needs --judge-model, the judge's model name on its server")
        if not judging and (self.judge_model or self.judge_base_url or self.judge_api_key_env):
            raise ValueError("--judge-model, --judge-base-url and --judge-api-key-env are read only with "
                             "--reward-model judge")

    def check_policy_temperature(self, has_policy: bool) -> None:
        if has_policy and self.temperature != 1.0:
            raise ValueError("--policy needs --temperature 1: a policy's KL, win rate and quantiles are "
                             "measured against the reference distribution itself")


# ---------------------------------------------------------------------------------------
# Models


def check_model_source(option: str, name: str) -> None:
    """Refuse, before any model work, a ``--model``/``--policy`` that is neither a model folder nor a
    reachable Hugging Face id (``bonbench.models.locate_model``'s ``UserError``)."""
    if name != DEFAULT_POLICY:
        locate_model(name, kind="policy" if option == "--policy" else "model")


def check_sources(cfg: SamplingOptions, policies: Sequence[str] = ()) -> None:
    """What can be wrong before any model loads: ``cfg.model`` or one of ``policies`` is not a
    model (``UserError``), the judge's key variable is not set (``ValueError``)."""
    check_model_source("--model", cfg.model)
    for policy in policies:
        check_model_source("--policy", policy)
    if cfg.judge_api_key_env and cfg.judge_api_key_env not in os.environ:
        raise UserError(f"--judge-api-key-env {cfg.judge_api_key_env}: no such environment variable is set")


def build_reward(cfg: SamplingOptions):
    """The reward ``cfg`` names (a judge with its model, URL and key); never None, and able to score
    partial answers when ``cfg.partial_at`` asks for them."""
    from bonbench.rewards import load_reward, scores_partial

    key = os.environ[cfg.judge_api_key_env] if cfg.judge_api_key_env else None
    reward = load_reward(cfg.reward_model, device=cfg.device, judge_model=cfg.judge_model or None,
                         judge_base_url=cfg.judge_base_url or None, judge_api_key=key)
    if reward is None:
        raise UserError("scoring samples needs a reward model; --reward-model none has none")
    if cfg.partial_at and not scores_partial(reward):
        raise UserError(f"--partial-at needs a reward that scores unfinished answers (score_partial); "
                        f"--reward-model {cfg.reward_model} has none")
    return reward


@dataclass
class LoadedLM:
    """A causal LM ready for sampling, its tokenizer and the token ids that end an answer."""

    model: object
    tokenizer: object
    eos: list[int]


@dataclass
class Models:
    reference: LoadedLM
    policy: LoadedLM | None = None


def load_models(model: str, policy: str = "", *, dtype: str = "auto", device: str = "cpu") -> Models:
    """The reference ``model`` ('default', a folder or a hub id) and, if given, ``policy`` (a model
    folder, a hub id, or a PEFT LoRA adapter folder, which goes on the reference's weights)."""
    from bonbench.backends.transformers import eos_ids, load_causal_lm
    from bonbench.models import resolve_policy

    ref_model, tokenizer = load_causal_lm(resolve_policy(model), dtype, device)
    models = Models(LoadedLM(ref_model, tokenizer, eos_ids(ref_model, tokenizer)))
    return load_policy(models, model, policy, dtype=dtype, device=device) if policy else models


def load_policy(models: Models, model: str, policy: str, *, dtype: str = "auto", device: str = "cpu") -> Models:
    """``models`` with ``policy`` loaded beside its reference (``model``, the name that reference
    was loaded from: a LoRA adapter goes on its weights); the reference is shared, not reloaded."""
    from bonbench.backends.transformers import eos_ids, load_causal_lm
    from bonbench.models import resolve_policy

    pol_model, pol_tokenizer = load_causal_lm(resolve_policy(policy), dtype, device,
                                              adapter_base=resolve_policy(model))
    if pol_tokenizer.get_vocab() != models.reference.tokenizer.get_vocab():
        raise UserError(f"--policy {policy} and --model {model} have different vocabularies: "
                         "log π − log π_ref needs the same tokens under both")
    return Models(models.reference, LoadedLM(pol_model, pol_tokenizer, eos_ids(pol_model, pol_tokenizer)))


# ---------------------------------------------------------------------------------------
# Sampling and scoring one batch of prompts


def _encode(tokenizer, prompt, max_tokens: int, model) -> list[int]:
    from bonbench.backends.base import check_context
    from bonbench.backends.kv import engine_context
    from bonbench.backends.transformers import encode_prompt

    ids = encode_prompt(tokenizer, prompt)
    context = engine_context(model)
    check_context(len(ids), max_tokens, context.tokens, "; ".join(filter(None, ["lower --max-tokens", context.hint])))
    return ids


def _draw(lm: LoadedLM, prompt_ids: list[list[int]], batch: list[dict], *, n: int, max_tokens: int,
          temperature: float, seed: int, role: int):
    """``n`` answers per prompt, each prompt seeded by its index and ``role``. Returns the
    candidates and each one's share of the batch's wall time (by token count), both per prompt."""
    from bonbench.backends.base import SamplingParams
    from bonbench.backends.sampling import SampleRequest, sample

    requests = [SampleRequest(ids, SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=1.0,
                                                  seed=derive_seed(seed, item["index"], role)))
                for ids, item in zip(prompt_ids, batch)]
    start = time.perf_counter()
    results = sample(lm.model, lm.tokenizer, requests, lm.eos, keep_tokens=False)
    seconds = time.perf_counter() - start
    total = sum(c.num_tokens for cands in results for c in cands) or 1
    shares = [[seconds * c.num_tokens / total for c in cands] for cands in results]
    return results, shares


def sample_pool(models: Models, reward, batch: list[dict], *, k: int, pool: int, max_tokens: int,
                temperature: float, seed: int, partial_at: Sequence[int] = ()):
    """Sample and score the reference pool of a batch of prompts: ``k`` answers of role
    ``reference`` and then ``pool`` of role ``candidate``, all in one draw of ``k + pool``; each
    candidate also scored on its first c tokens for each c of ``partial_at`` it runs past.

    ``batch``: dicts with ``index``, ``id``, ``document``. Returns the batch's samples table.
    """
    from bonbench.tasks import summary_prompt

    ref = models.reference
    prompts = [summary_prompt(item["document"]) for item in batch]
    ids = [_encode(ref.tokenizer, p, max_tokens, ref.model) for p in prompts]
    cands, secs = _draw(ref, ids, batch, n=k + pool, max_tokens=max_tokens, temperature=temperature,
                        seed=seed, role=POOL)
    rows, partial = [], []
    for item, prompt_cands, prompt_secs in zip(batch, cands, secs):
        for j, (c, s) in enumerate(zip(prompt_cands, prompt_secs)):
            role, index = ("reference", j) if j < k else ("candidate", j - k)
            rows.append(_row(item, role, index, c, s))
            partial.append(_partial_texts(ref.tokenizer, c, partial_at) if role == "candidate" else None)
    if partial_at:
        score_partial_rows(reward, batch, prompts, rows, partial, partial_at)
    return score_rows(reward, batch, prompts, rows, partial_at)


def sample_policy(models: Models, reward, batch: list[dict], *, slug: str, samples: int, max_tokens: int,
                  seed: int, logprob_batch: int = 16):
    """Sample ``samples`` answers per prompt from the policy at temperature 1 and top_p 1 (so the
    sampler's log-probability is log π), score them, and teacher-force them through the reference
    (``ref_logprob``: log π_ref of the same tokens). Returns the batch's samples table."""
    import torch

    from bonbench.logprobs import sequence_logprobs
    from bonbench.tasks import summary_prompt

    ref, pol = models.reference, models.policy
    prompts = [summary_prompt(item["document"]) for item in batch]
    ids = [_encode(ref.tokenizer, p, max_tokens, ref.model) for p in prompts]
    pol_ids = [_encode(pol.tokenizer, p, max_tokens, pol.model) for p in prompts]
    if pol_ids != ids:
        raise UserError("the policy's tokenizer encodes the prompts differently from the reference's")
    cands, secs = _draw(pol, ids, batch, n=samples, max_tokens=max_tokens, temperature=1.0, seed=seed,
                        role=POLICY)
    flat = [(pid, c) for pid, prompt_cands in zip(ids, cands) for c in prompt_cands]
    with torch.inference_mode():
        ref_lp = sequence_logprobs(ref.model, ref.tokenizer, [p for p, _ in flat], [c.token_ids for _, c in flat],
                                   batch_size=logprob_batch).cpu().tolist()
    lp_iter = iter(ref_lp)
    rows = []
    for item, prompt_cands, prompt_secs in zip(batch, cands, secs):
        for j, (c, s) in enumerate(zip(prompt_cands, prompt_secs)):
            rows.append(_row(item, "policy", j, c, s, ref_logprob=next(lp_iter), policy=slug))
    return score_rows(reward, batch, prompts, rows)


def _partial_texts(tokenizer, cand, partial_at: Sequence[int]) -> dict[int, str]:
    """The candidate's text after its first c tokens, for each checkpoint c it runs past (it has
    more than c tokens, so it is unfinished there)."""
    return {c: tokenizer.decode(cand.token_ids[:c], skip_special_tokens=True)
            for c in partial_at if cand.num_tokens > c}


def score_partial_rows(reward, batch: list[dict], prompts: list, rows: list[dict], texts: list[dict[int, str] | None],
                       partial_at: Sequence[int]) -> None:
    """Fill each row's ``partial_reward_<c>`` with the reward's ``score_partial`` of ``texts[i][c]``
    (NaN where row i has no text at c) and, for the rows with texts (not None), ``partial_seconds``
    with the time the reward took per partial text of the batch."""
    from bonbench.rewards import checked_scores

    by_prompt = {item["index"]: p for item, p in zip(batch, prompts)}
    pairs = [(i, c) for i, row_texts in enumerate(texts) if row_texts for c in partial_at if c in row_texts]
    start = time.perf_counter()
    scores = checked_scores(reward, [by_prompt[rows[i]["prompt_index"]] for i, _ in pairs],
                            [texts[i][c] for i, c in pairs], partial=True) if pairs else []
    per_text = (time.perf_counter() - start) / len(pairs) if pairs else 0.0
    for row, row_texts in zip(rows, texts):
        row.update({partial_column(c): float("nan") for c in partial_at})
        row["partial_seconds"] = per_text if row_texts is not None else float("nan")
    for (i, c), score in zip(pairs, scores):
        rows[i][partial_column(c)] = score


def score_rows(reward, batch: list[dict], prompts: list, rows: list[dict], partial_at: Sequence[int] = ()):
    """``rows`` with their rewards, the reward's time per sample and a creation time, as a table
    in ``sample_columns(partial_at)``. ``prompts[i]`` is the prompt of ``batch[i]``."""
    import pandas as pd

    from bonbench.rewards import checked_scores

    by_prompt = {item["index"]: p for item, p in zip(batch, prompts)}
    start = time.perf_counter()
    scores = checked_scores(reward, [by_prompt[r["prompt_index"]] for r in rows], [r["text"] for r in rows])
    per_sample = (time.perf_counter() - start) / len(rows)
    created = pd.Timestamp.now(tz="UTC")
    for r, score in zip(rows, scores):
        r.update(reward=score, reward_seconds=per_sample, created=created)
    return pd.DataFrame(rows, columns=sample_columns(partial_at))


def _row(item, role, index, cand, seconds, ref_logprob=float("nan"), policy="") -> dict:
    return {"prompt_index": item["index"], "prompt_id": item["id"], "role": role, "policy": policy,
            "sample_index": index, "text": cand.text, "num_tokens": cand.num_tokens,
            "finish_reason": cand.finish_reason, "logprob": cand.logprob, "ref_logprob": ref_logprob,
            "self_certainty": float("nan") if cand.self_certainty is None else cand.self_certainty,
            "sample_seconds": seconds, "partial_seconds": float("nan")}


# ---------------------------------------------------------------------------------------


def sample_missing(todo: Sequence[dict], batch_prompts: int, desc: str, sample_batch: Callable[[list[dict]], object],
                   write: Callable[[object, int], None]) -> None:
    """Run ``sample_batch(batch)`` over ``todo`` in batches of ``batch_prompts`` prompts and hand
    each prompt's rows to ``write(frame, index)`` as soon as its batch is done."""
    from tqdm import tqdm

    tokens, start = 0, time.perf_counter()
    with tqdm(total=len(todo), unit="prompt", desc=desc) as bar:
        for s in range(0, len(todo), batch_prompts):
            batch = list(todo[s : s + batch_prompts])
            frame = sample_batch(batch)
            for item in batch:
                write(frame[frame["prompt_index"] == item["index"]], item["index"])
            tokens += int(frame["num_tokens"].sum())
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")


def draw_missing(cfg: SamplingOptions, store: SampleStore, pool: int, pool_todo: Sequence[dict],
                 policy_todo: Sequence[tuple[dict, Sequence[dict]]] = ()) -> None:
    """Draw what ``store`` lacks: the reference pools (``cfg.k`` references and ``pool``
    candidates) of the prompts in ``pool_todo``, then, one policy at a time, the samples of each
    ``(entry, prompts)`` of ``policy_todo`` (``entry``: the policy's ``run.json`` entry). The
    reference and the reward load once; each policy loads when its turn comes and is freed after."""
    pending = [(entry, todo) for entry, todo in policy_todo if todo]
    if not pool_todo and not pending:
        return
    reward = build_reward(cfg)  # first: a reward that cannot do what cfg asks fails before the models load
    reference = load_models(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if pool_todo:
        sample_missing(
            pool_todo, cfg.batch_prompts, "reference pool",
            lambda batch: sample_pool(reference, reward, batch, k=cfg.k, pool=pool, max_tokens=cfg.max_tokens,
                                      temperature=cfg.temperature, seed=cfg.seed, partial_at=cfg.partial_at),
            store.write)
    for entry, todo in pending:
        _draw_policy(cfg, store, reference, reward, entry, todo)  # the policy is freed on return


def _draw_policy(cfg: SamplingOptions, store: SampleStore, reference, reward, entry: dict,
                 todo: Sequence[dict]) -> None:
    models = load_policy(reference, cfg.model, entry["path"], dtype=cfg.dtype, device=cfg.device)
    slug, method = entry["slug"], store.policy_method(entry["slug"])
    sample_missing(
        todo, cfg.batch_prompts, f"policy {slug}",
        lambda batch: sample_policy(models, reward, batch, slug=slug, samples=entry["policy_samples"],
                                    max_tokens=cfg.max_tokens, seed=cfg.seed, logprob_batch=cfg.logprob_batch),
        lambda frame, index: store.write(frame, index, method))
