"""Teacher-forced log-probabilities of given answers under a causal language model.

``sequence_logprobs`` scores token ids: for each pair (prompt, answer) it returns

    log π(answer | prompt) = Σ_t log softmax(logits_t)[answer_t]

summed over the answer's tokens only, at temperature 1 (the model's own distribution). It is
the log π / log π_ref that the KL estimates of ``bonbench measure`` and the distillation losses
need (docs/math.md §3, §6). Called under ``torch.no_grad()`` it is an evaluation; called without, the
result carries gradients and serves training.

Batching: pairs that share a prompt are scored together and the prompt is run once: a first pass
over the distinct prompts (unpadded, ``bonbench.backends.prefill``) fills a KV cache, which is copied to each of the prompt's
answers for a second pass over the answers (RIGHT-padded). Samplers hand over k answers per
prompt, so the prompt, usually much longer than the answers, costs one forward instead of k; with
gradients on, the gradient through the prompt's keys and values is kept (the copies are indexing,
which autograd follows). Only the logits of answer positions are computed, never the
``(batch, sequence, vocabulary)`` tensor of the whole sequence. Position ids count real tokens
only, so a pair's result does not depend on the padding it received, its batch neighbours or
how many answers its prompt has (up to float rounding).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from bonbench.backends.base import Prompt
from bonbench.backends.prefill import PromptState, forward_with_adapters, prefill

__all__ = ["sequence_logprobs", "answer_logprobs"]


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``(len(rows), longest)``, padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _batch_logprobs(model, prompts: list[list[int]], answers: list[list[int]], owner: list[int],
                    pad_id: int, known: Mapping[tuple[int, ...], PromptState] | None) -> torch.Tensor:
    """Log-probs of ``answers[j]`` given ``prompts[owner[j]]``: one pass per distinct prompt, then
    one pass over all answers on copies of their prompt's cache."""
    device = next(model.parameters()).device
    a_ids, a_mask = (t.to(device) for t in _pad(answers, pad_id))
    index = torch.tensor(owner, device=device)
    done = prefill(model, prompts, pad_id, known=known)
    first = done.logits[index, None, :]  # predicts each answer's first token
    p_mask, cache = done.mask, done.cache
    cache.batch_select_indices(index)
    lengths = p_mask.sum(-1, keepdim=True)[index]
    mask = torch.cat([p_mask[index], a_mask], dim=-1)
    if a_ids.shape[1] > 1:  # the last answer token predicts nothing that is scored
        rest = forward_with_adapters(model, None, cache=cache, input_ids=a_ids[:, :-1], attention_mask=mask[:, :-1],
                                     position_ids=lengths + torch.arange(a_ids.shape[1] - 1, device=device),
                                     use_cache=True).logits
        logits = torch.cat([first, rest], dim=1)
    else:
        logits = first
    token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, a_ids[..., None]).squeeze(-1)
    return (token_logprobs * a_mask).sum(-1)


def sequence_logprobs(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    answer_ids: Sequence[list[int]],
    batch_size: int = 16,
    states: Mapping[tuple[int, ...], PromptState] | None = None,
) -> torch.Tensor:
    """Per-pair ``log π(answer | prompt)``, summed over the answer's tokens (temperature 1).

    Args:
        model: a Hugging Face causal LM (a PEFT model too); its mode (eval/train) is left as is.
        tokenizer: supplies the pad id (falling back to the EOS id); pads are masked out anyway.
        prompt_ids: ``P`` lists of token ids, each non-empty (the context, not scored).
        answer_ids: ``P`` lists of token ids, scored token by token; include the EOS token where
            the answer ended with one (its probability is part of log π(answer)). An empty answer
            scores 0.
        batch_size: answers per forward pass.
        states: prompts already run through ``model`` as it stands (``bonbench.backends.prefill.prompt_states``,
            with gradients where these log-probs need them): read instead of run again.

    Returns:
        float32 tensor of shape ``(P,)`` on the model's device, in input order. It carries
        gradients unless called under ``torch.no_grad()`` / ``torch.inference_mode()``.
    """
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(answer_ids)} answers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first answer token is predicted from it)")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer defines neither a pad nor an EOS token to pad with")

    # Group answers by prompt; sort groups by length so a batch's rows need little padding. A
    # batch takes whole groups up to ``batch_size`` answers; results go back to input order.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(answer_ids)):
        if answer_ids[i]:
            groups.setdefault(tuple(prompt_ids[i]), []).append(i)
    split = [(p, m[s : s + batch_size]) for p, m in groups.items() for s in range(0, len(m), batch_size)]
    ordered = sorted(split, key=lambda pm: (len(pm[0]) + max(len(answer_ids[i]) for i in pm[1]), pm[1][0]))
    out = torch.zeros(len(answer_ids), device=device)
    order, parts = [], []
    while ordered:
        chunk = [ordered.pop(0)]
        while ordered and sum(len(m) for _, m in chunk) + len(ordered[0][1]) <= batch_size:
            chunk.append(ordered.pop(0))
        members = [i for _, m in chunk for i in m]
        owner = [g for g, (_, m) in enumerate(chunk) for _ in m]
        parts.append(_batch_logprobs(model, [list(p) for p, _ in chunk], [list(answer_ids[i]) for i in members],
                                     owner, pad_id, states))
        order.extend(members)
    if not parts:
        return out
    return out.index_put((torch.tensor(order, device=device),), torch.cat(parts))


def answer_logprobs(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    *,
    finished: bool = True,
    batch_size: int = 16,
) -> torch.Tensor:
    """``log π(answer | prompt)`` for text: chat prompts through the chat template (as the
    samplers do), answers tokenised without special tokens.

    Args:
        prompts: ``P`` prompts (raw text or chat messages).
        answers: ``P`` answer texts.
        finished: append the EOS token to every answer, i.e. score "this answer and then stop";
            ``False`` scores the text as a prefix that may continue.
        batch_size: pairs per forward pass.

    Returns:
        float32 tensor ``(P,)``, as ``sequence_logprobs``. Text round trips through a tokenizer
        are not always the tokens a sampler drew; to score samples exactly, pass their token ids
        to ``sequence_logprobs``.
    """
    from bonbench.backends.transformers import encode_prompt, eos_ids

    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    stop = [eos_ids(model, tokenizer)[0]] if finished else []
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + stop for a in answers]
    return sequence_logprobs(model, tokenizer, prompt_ids, answer_ids, batch_size=batch_size)
