"""Collect scored samples: load the reference and a policy, draw answers per prompt, score and time them.

The rows produced here are those of the samples table (``bonbench.samplestore.SAMPLE_COLUMNS``):
one per answer, with its tokens, the sampler's log-probability, its share of the batch's wall time
and its reward. Each prompt's answers are drawn with a seed that depends only on the run's seed,
the prompt's index and the role (reference pool or policy), never on the other prompts of the
batch, so a resumed or grown run draws what a fresh one would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bonbench.models import DEFAULT_POLICY, ModelNotFound
from bonbench.samplestore import SAMPLE_COLUMNS
from bonbench.seeds import derive_seed

POOL, POLICY = 0, 1  # the roles that seed a prompt's draws

__all__ = ["LoadedLM", "Models", "check_model_source", "load_models", "sample_missing", "sample_policy",
           "sample_pool", "score_rows"]


# ---------------------------------------------------------------------------------------
# Models


def check_model_source(option: str, name: str) -> None:
    """Refuse a model name that is neither a folder on disk nor a Hugging Face hub id, before any
    model work: a path that does not exist would otherwise end in an error about hub repo ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name == DEFAULT_POLICY or Path(name).exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFound(f"{option} {name}: no such folder (give a model folder, a LoRA adapter folder "
                            "or a Hugging Face hub id such as org/name)") from None


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

    ref_path = resolve_policy(model)
    ref_model, tokenizer = load_causal_lm(ref_path, dtype, device)
    models = Models(LoadedLM(ref_model, tokenizer, eos_ids(ref_model, tokenizer)))
    if policy:
        pol_model, pol_tokenizer = load_causal_lm(resolve_policy(policy), dtype, device, adapter_base=ref_path)
        if pol_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"--policy {policy} and --model {model} have different vocabularies: "
                             "log π − log π_ref needs the same tokens under both")
        models.policy = LoadedLM(pol_model, pol_tokenizer, eos_ids(pol_model, pol_tokenizer))
    return models


# ---------------------------------------------------------------------------------------
# Sampling and scoring one batch of prompts


def _encode(tokenizer, prompt, max_tokens: int, model) -> list[int]:
    from bonbench.backends.base import check_context
    from bonbench.backends.transformers import encode_prompt

    ids = encode_prompt(tokenizer, prompt)
    check_context(len(ids), max_tokens, getattr(model.config, "max_position_embeddings", None),
                  hint="lower --max-tokens")
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
                temperature: float, seed: int):
    """Sample and score the reference pool of a batch of prompts: ``k`` answers of role
    ``reference`` and then ``pool`` of role ``candidate``, all in one draw of ``k + pool``.

    ``batch``: dicts with ``index``, ``id``, ``document``. Returns the batch's samples table.
    """
    from bonbench.tasks import summary_prompt

    ref = models.reference
    prompts = [summary_prompt(item["document"]) for item in batch]
    ids = [_encode(ref.tokenizer, p, max_tokens, ref.model) for p in prompts]
    cands, secs = _draw(ref, ids, batch, n=k + pool, max_tokens=max_tokens, temperature=temperature,
                        seed=seed, role=POOL)
    rows = []
    for item, prompt_cands, prompt_secs in zip(batch, cands, secs):
        for j, (c, s) in enumerate(zip(prompt_cands, prompt_secs)):
            role, index = ("reference", j) if j < k else ("candidate", j - k)
            rows.append(_row(item, role, index, c, s))
    return score_rows(reward, batch, prompts, rows)


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
        raise ValueError("the policy's tokenizer encodes the prompts differently from the reference's")
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


def score_rows(reward, batch: list[dict], prompts: list, rows: list[dict]):
    """``rows`` with their rewards, the reward's time per sample and a creation time, as a table
    in ``SAMPLE_COLUMNS``. ``prompts[i]`` is the prompt of ``batch[i]``."""
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
