"""Teacher-forced sequence log-probabilities (bonbench/logprobs.py)."""

from __future__ import annotations

import pytest
import torch

from bonbench.backends.base import SamplingParams
from bonbench.backends.sampling import SampleRequest, sample
from bonbench.backends.transformers import encode_prompt, eos_ids, load_causal_lm
from bonbench.logprobs import answer_logprobs, sequence_logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    return load_causal_lm(tiny_model_path, "float32")


def _prompts(tokenizer, count: int) -> list[list[int]]:
    # Prompts of clearly different lengths, so batches need real padding.
    return [encode_prompt(tokenizer, [{"role": "user", "content": "word " * (1 + 7 * i)}]) for i in range(count)]


def _manual(model, prompt: list[int], answer: list[int]) -> float:
    """One forward pass per answer token, no padding, no batching."""
    total = 0.0
    with torch.no_grad():
        for t, token in enumerate(answer):
            prefix = torch.tensor([prompt + answer[:t]])
            logits = model(input_ids=prefix).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[token])
    return total


def test_matches_token_by_token_computation(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 3)
    g = torch.Generator().manual_seed(0)
    answers = [torch.randint(0, len(tokenizer), (length,), generator=g).tolist() for length in (1, 5, 9)]
    with torch.no_grad():
        got = sequence_logprobs(model, tokenizer, prompts, answers, batch_size=3)
    want = torch.tensor([_manual(model, p, a) for p, a in zip(prompts, answers)], dtype=torch.float32)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_invariant_to_padding_batching_and_order(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 6)
    g = torch.Generator().manual_seed(1)
    answers = [torch.randint(0, len(tokenizer), (length,), generator=g).tolist() for length in (2, 11, 1, 7, 4, 13)]
    with torch.no_grad():
        alone = torch.cat([sequence_logprobs(model, tokenizer, [p], [a]) for p, a in zip(prompts, answers)])
        together = sequence_logprobs(model, tokenizer, prompts, answers, batch_size=6)
        pairs_of_two = sequence_logprobs(model, tokenizer, prompts, answers, batch_size=2)
        reversed_ = sequence_logprobs(model, tokenizer, prompts[::-1], answers[::-1], batch_size=4).flip(0)
    for other in (together, pairs_of_two, reversed_):
        torch.testing.assert_close(other, alone, atol=1e-4, rtol=0)


def test_equals_sampler_logprob_at_temperature_one(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 3)
    requests = [SampleRequest(p, SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=i))
                for i, p in enumerate(prompts)]
    candidates = sample(model, tokenizer, requests, eos_ids(model, tokenizer))
    flat = [(p, c) for p, cands in zip(prompts, candidates) for c in cands]
    with torch.no_grad():
        got = sequence_logprobs(model, tokenizer, [p for p, _ in flat], [c.token_ids for _, c in flat], batch_size=4)
    sampled = torch.tensor([c.logprob for _, c in flat])
    assert (got - sampled).abs().max() < 1e-3


def test_carries_gradients_without_no_grad(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 3)
    answers = [[10, 20, 30], [40], [50, 60]]
    model.zero_grad()
    logprobs = sequence_logprobs(model, tokenizer, prompts, answers, batch_size=2)
    assert logprobs.requires_grad
    logprobs.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_empty_answer_scores_zero_and_bad_input_raises(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 2)
    with torch.no_grad():
        got = sequence_logprobs(model, tokenizer, prompts, [[], [5, 6]])
        alone = sequence_logprobs(model, tokenizer, prompts[1:], [[5, 6]])
    assert got[0] == 0 and torch.isclose(got[1], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="answers"):
        sequence_logprobs(model, tokenizer, prompts, [[1]])
    with pytest.raises(ValueError, match="at least one token"):
        sequence_logprobs(model, tokenizer, [[]], [[1]])


def test_answer_logprobs_scores_text_with_and_without_eos(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": "Summarize: a cat sat."}], "plain text prompt"]
    answers = ["A cat sat.", "more text"]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    tokens = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    eos = eos_ids(model, tokenizer)[0]
    with torch.no_grad():
        finished = answer_logprobs(model, tokenizer, prompts, answers)
        prefix = answer_logprobs(model, tokenizer, prompts, answers, finished=False)
        want_finished = sequence_logprobs(model, tokenizer, ids, [t + [eos] for t in tokens])
        want_prefix = sequence_logprobs(model, tokenizer, ids, tokens)
    torch.testing.assert_close(finished, want_finished)
    torch.testing.assert_close(prefix, want_prefix)
    assert (finished < prefix).all()  # stopping has a probability below 1


@pytest.mark.slow
def test_equals_sampler_logprob_on_the_embedded_default(default_model_path):
    model, tokenizer = load_causal_lm(default_model_path, "float32")
    prompts = _prompts(tokenizer, 2)
    requests = [SampleRequest(p, SamplingParams(n=2, max_tokens=16, seed=i)) for i, p in enumerate(prompts)]
    candidates = sample(model, tokenizer, requests, eos_ids(model, tokenizer))
    flat = [(p, c) for p, cands in zip(prompts, candidates) for c in cands]
    with torch.no_grad():
        got = sequence_logprobs(model, tokenizer, [p for p, _ in flat], [c.token_ids for _, c in flat])
    sampled = torch.tensor([c.logprob for _, c in flat])
    assert (got - sampled).abs().max() < 1e-3


def test_answers_sharing_a_prompt_score_as_if_alone(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 3)
    g = torch.Generator().manual_seed(2)
    # Prompt 0 has four answers, prompt 1 one, prompt 2 two; interleaved, one of them empty.
    owner = [0, 1, 0, 2, 0, 2, 0]
    answers = [torch.randint(0, len(tokenizer), (length,), generator=g).tolist() for length in (3, 6, 1, 9, 0, 2, 5)]
    flat = [prompts[o] for o in owner]
    with torch.no_grad():
        alone = torch.tensor([_manual(model, p, a) for p, a in zip(flat, answers)], dtype=torch.float32)
        for batch_size in (1, 3, 16):
            got = sequence_logprobs(model, tokenizer, flat, answers, batch_size=batch_size)
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=0)
    assert alone[4] == 0


def test_gradient_through_a_shared_prompt_equals_separate_passes(tiny):
    model, tokenizer = tiny
    short, long = _prompts(tokenizer, 3)[1:]
    prompts = [long, short, long, short, long]  # two prompts of different lengths, unpadded then laid together
    answers = [[11, 12, 13, 14], [21, 22], [31], [41, 42, 43], [51, 52]]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batch_size):
        model.zero_grad()
        lp = sequence_logprobs(model, tokenizer, prompts, answers, batch_size=batch_size)
        (lp * torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0])).sum().backward()
        return [p.grad.clone() for p in params]

    shared, separate = grads(3), grads(1)  # batch_size 1: each answer runs its own prompt pass
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    model.zero_grad()


def test_prompt_states_give_the_same_log_probs_and_gradients_as_running_the_prompts(tiny):
    """The gradient pass may read each prompt from one earlier pass with gradients (a trainer's sampler
    continued it too): the same log-probs, and the same gradients through the prompts' keys and values."""
    from bonbench.backends.prefill import prompt_states

    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 3)
    g = torch.Generator().manual_seed(2)
    flat = [prompts[i] for i in (0, 1, 1, 2, 0)]  # prompts shared by several answers
    answers = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (3, 6, 1, 4, 5)]
    weight = model.model.layers[0].self_attn.k_proj.weight  # its gradient comes through the prompts' keys too
    grads = []
    for use_states in (False, True):
        model.zero_grad()
        weight.requires_grad_(True)
        states = prompt_states(model, flat) if use_states else None
        lp = sequence_logprobs(model, tokenizer, flat, answers, batch_size=3, states=states)
        (lp * torch.arange(1.0, 6.0)).sum().backward()
        grads.append((lp.detach(), weight.grad.clone()))
        weight.requires_grad_(False)
    model.zero_grad()
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=0)
    assert grads[0][1].abs().sum() > 0
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)
