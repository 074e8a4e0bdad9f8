"""Teacher-forced log-probabilities of given answers under a causal language model.

``sequence_logprobs`` scores token ids: for each pair (prompt, answer) it returns

    log π(answer | prompt) = Σ_t log softmax(logits_t)[answer_t]

summed over the answer's tokens only, at temperature 1 (the model's own distribution). It is
the log π / log π_ref that the KL estimates of ``bonbench measure`` and the distillation losses
need (MATH.md §3, §6). Called under ``torch.no_grad()`` it is an evaluation; called without, the
result carries gradients and serves training.

Batching: pairs are sorted by length, cut into batches of ``batch_size``, and each batch is laid
out with its prompts LEFT-padded and its answers RIGHT-padded, so every answer starts in the same
column and only the logits of the answer columns are computed (``logits_to_keep``), never the
``(batch, sequence, vocabulary)`` tensor of the whole sequence. Position ids count real tokens
only, so a pair's result does not depend on the padding it received or on its batch neighbours
(up to float rounding).
"""

from __future__ import annotations

from typing import Sequence

import torch

from bonbench.backends.base import Prompt

__all__ = ["sequence_logprobs", "answer_logprobs"]


def _layout(prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], pad_id: int):
    """Left-padded prompts next to right-padded answers.

    Returns ``(input_ids, attention_mask, answer_mask)``: the first two ``(B, Wp + Wa)``, the
    last ``(B, Wa)`` marking the real answer tokens, which sit in columns ``Wp .. Wp + Wa - 1``.
    """
    width_p = max(len(p) for p in prompt_ids)
    width_a = max(len(a) for a in answer_ids)
    batch = len(prompt_ids)
    ids = torch.full((batch, width_p + width_a), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width_p + width_a), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p, dtype=torch.long)
        ids[i, width_p : width_p + len(a)] = torch.tensor(a, dtype=torch.long)
        mask[i, width_p - len(p) : width_p + len(a)] = 1
    return ids, mask, mask[:, width_p:].bool()


def _batch_logprobs(model, prompt_ids, answer_ids, pad_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, mask, answer_mask = _layout(prompt_ids, answer_ids, pad_id)
    width_a = answer_mask.shape[1]
    ids, mask, answer_mask = ids.to(device), mask.to(device), answer_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # The logits at column c predict the token in column c + 1: the answer's Wa tokens are
    # predicted by the Wa columns ending one before the last.
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                logits_to_keep=width_a + 1)
    logits = out.logits[:, :-1, :].float()
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -width_a:, None]).squeeze(-1)
    return (token_logprobs * answer_mask).sum(-1)


def sequence_logprobs(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    answer_ids: Sequence[list[int]],
    batch_size: int = 16,
) -> torch.Tensor:
    """Per-pair ``log π(answer | prompt)``, summed over the answer's tokens (temperature 1).

    Args:
        model: a Hugging Face causal LM (a PEFT model too); its mode (eval/train) is left as is.
        tokenizer: supplies the pad id (falling back to the EOS id); pads are masked out anyway.
        prompt_ids: ``P`` lists of token ids, each non-empty (the context, not scored).
        answer_ids: ``P`` lists of token ids, scored token by token; include the EOS token where
            the answer ended with one (its probability is part of log π(answer)). An empty answer
            scores 0.
        batch_size: pairs per forward pass.

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

    # Sort by length so a batch's rows need little padding; results go back to input order.
    order = sorted((i for i in range(len(answer_ids)) if answer_ids[i]),
                   key=lambda i: (len(prompt_ids[i]) + len(answer_ids[i]), i))
    parts = [
        _batch_logprobs(model, [list(prompt_ids[i]) for i in chunk], [list(answer_ids[i]) for i in chunk], pad_id)
        for chunk in (order[s : s + batch_size] for s in range(0, len(order), batch_size))
    ]
    out = torch.zeros(len(answer_ids), device=device)
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
