"""The batched sampling loop (``bonbench.backends.sampling.sample``) on the tiny random model,
checked against teacher-forced recomputation with the same model."""

from __future__ import annotations

import itertools

import pytest
import torch

from bonbench.backends.base import SamplingParams
from bonbench.backends.sampling import SampleRequest, sample
from bonbench.backends.transformers import eos_ids, load_causal_lm
from tests.lora_models import two_adapter_model


@pytest.fixture(scope="module")
def lm(tiny_model_path):
    model, tokenizer = load_causal_lm(tiny_model_path)
    return model, tokenizer, eos_ids(model, tokenizer)


def ids(lm, text: str) -> list[int]:
    return lm[1](text, add_special_tokens=False)["input_ids"]


def draw(lm, *requests: SampleRequest, eos=None):
    model, tokenizer, eos_default = lm
    return sample(model, tokenizer, list(requests), eos if eos is not None else eos_default)


def req(lm, text: str, **params) -> SampleRequest:
    return SampleRequest(ids(lm, text), SamplingParams(**params))


@torch.inference_mode()
def teacher_forced_logprobs(lm, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """(len(token_ids), V) log-softmax of the model at each generated position, in one forward pass."""
    model = lm[0]
    full = torch.tensor([prompt_ids + token_ids])
    logits = model(input_ids=full).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


def test_every_candidate_stops_at_max_tokens_with_finish_reason_length(lm):
    (candidates,) = draw(lm, req(lm, "Once upon a time", n=3, max_tokens=7, seed=0))
    assert len(candidates) == 3
    for c in candidates:
        assert c.num_tokens == len(c.token_ids) == 7 and c.finish_reason == "length"


def test_end_of_sequence_token_stops_the_row_and_is_left_out_of_the_text(lm):
    (greedy,) = draw(lm, req(lm, "Once upon a time", max_tokens=1, temperature=0))
    first = greedy[0].token_ids[0]
    (stopped,) = draw(lm, req(lm, "Once upon a time", max_tokens=10, temperature=0), eos=[first])
    c = stopped[0]
    assert c.finish_reason == "stop" and c.token_ids == [first] and c.num_tokens == 1 and c.text == ""


def test_stop_string_cuts_the_text_before_it_and_ends_the_row(lm):
    (full,) = draw(lm, req(lm, "Hello", n=4, max_tokens=40, seed=3))
    (cut,) = draw(lm, req(lm, "Hello", n=4, max_tokens=40, seed=3, stop=("e",)))
    checked = 0
    for f, c in zip(full, cut):
        assert "e" not in c.text
        if "e" in f.text:
            checked += 1
            assert c.finish_reason == "stop"
            assert c.text == f.text[: f.text.index("e")]
            assert c.token_ids == f.token_ids[: c.num_tokens], "the same seed draws the same tokens up to the stop"
            assert "e" in lm[1].decode(c.token_ids), "the row ends at the token that completed the stop string"
            assert "e" not in lm[1].decode(c.token_ids[:-1])
    assert checked >= 3, "a random model writes an 'e' within 40 tokens almost always"


def test_a_seeded_request_draws_the_same_tokens_alone_or_batched_with_others(lm):
    seeded = dict(n=3, max_tokens=12, seed=42)
    (alone,) = draw(lm, req(lm, "The quick brown fox", **seeded))
    companions = [req(lm, "A much longer prompt that pads the batch differently than the other one", n=2,
                      max_tokens=20, seed=7),
                  req(lm, "Hi", n=4, max_tokens=5), req(lm, "Greedy", n=1, max_tokens=8, temperature=0)]
    batched = draw(lm, companions[0], req(lm, "The quick brown fox", **seeded), *companions[1:])[1]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    for a, b in zip(alone, batched):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_candidates_of_one_request_are_different_draws_and_seeds_differ(lm):
    (a,) = draw(lm, req(lm, "Tell me", n=4, max_tokens=8, seed=1))
    (b,) = draw(lm, req(lm, "Tell me", n=4, max_tokens=8, seed=2))
    assert len({tuple(c.token_ids) for c in a}) == 4
    assert [c.token_ids for c in a] != [c.token_ids for c in b]


@pytest.mark.parametrize("seed", [2**62, -(2**62), 2**100])
def test_any_integer_seed_draws_reproducibly_without_failing_its_batch(lm, seed):
    first = draw(lm, req(lm, "Seeds", n=2, max_tokens=5, seed=seed), req(lm, "Companion", max_tokens=5, seed=1))
    again = draw(lm, req(lm, "Seeds", n=2, max_tokens=5, seed=seed))
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in again[0]]
    assert first[1][0].num_tokens == 5


def test_greedy_decoding_is_deterministic_and_follows_the_argmax(lm):
    prompt = ids(lm, "The capital of France is")
    (first,) = draw(lm, SampleRequest(prompt, SamplingParams(n=2, max_tokens=10, temperature=0)))
    (again,) = draw(lm, SampleRequest(prompt, SamplingParams(n=1, max_tokens=10, temperature=0, seed=5)))
    assert first[0].token_ids == first[1].token_ids == again[0].token_ids
    forced = teacher_forced_logprobs(lm, prompt, first[0].token_ids)
    assert forced.argmax(-1).tolist() == first[0].token_ids


@pytest.mark.parametrize("seed", [0, 1])
def test_candidate_logprob_is_the_sum_of_token_logprobs_and_matches_teacher_forcing(lm, seed):
    prompt = ids(lm, "In the beginning")
    (candidates,) = draw(lm, SampleRequest(prompt, SamplingParams(n=3, max_tokens=16, seed=seed, logprobs=True)))
    for c in candidates:
        assert len(c.token_logprobs) == len(c.tokens) == c.num_tokens == 16
        assert c.logprob == pytest.approx(sum(c.token_logprobs), abs=1e-6)
        forced = teacher_forced_logprobs(lm, prompt, c.token_ids)
        per_token = forced.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert per_token.tolist() == pytest.approx(c.token_logprobs, abs=1e-5)
        assert c.logprob == pytest.approx(float(per_token.sum()), abs=1e-3)


def test_logprobs_are_of_the_tempered_distribution_sampled_from(lm):
    prompt = ids(lm, "Weather report")
    (candidates,) = draw(lm, SampleRequest(prompt, SamplingParams(n=2, max_tokens=8, seed=3, temperature=0.5,
                                                                  logprobs=True)))
    model = lm[0]
    for c in candidates:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + c.token_ids])).logits[0].float()
        tempered = torch.log_softmax(logits[len(prompt) - 1 : -1] / 0.5, dim=-1)
        expected = tempered.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert expected.tolist() == pytest.approx(c.token_logprobs, abs=1e-5)


@pytest.fixture(scope="module")
def peaked_lm(tiny_model_path):
    """The tiny model with its output layer scaled up: its nearly uniform next-token distributions
    become peaked, so candidates' self-certainties differ by much more than rounding."""
    model, tokenizer = load_causal_lm(tiny_model_path)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5.0)
    return model, tokenizer, eos_ids(model, tokenizer)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 0.8)])
def test_self_certainty_is_the_mean_kl_from_uniform_of_the_models_full_distributions(peaked_lm, temperature, top_p):
    lm = peaked_lm
    prompt = ids(lm, "Once upon a time")
    (candidates,) = draw(lm, SampleRequest(prompt, SamplingParams(n=4, max_tokens=12, seed=5,
                                                                  temperature=temperature, top_p=top_p)))
    for c in candidates:
        # the model's own distributions (temperature 1, no top-p), whatever the row sampled from
        probs = teacher_forced_logprobs(lm, prompt, c.token_ids).double().exp()
        vocab = probs.shape[-1]
        kl_per_token = (1.0 / vocab * torch.log((1.0 / vocab) / probs)).sum(-1)  # Σ_v U(v) log(U(v) / p(v))
        assert c.self_certainty == pytest.approx(float(kl_per_token.mean()), abs=1e-5)
    values = sorted(c.self_certainty for c in candidates)
    assert values[-1] - values[0] > 1e-3  # the check above tells candidates apart


def test_top_p_draws_only_from_the_nucleus_and_renormalises_within_it(lm):
    prompt = ids(lm, "Numbers:")
    top_p = 0.2
    (candidates,) = draw(lm, SampleRequest(prompt, SamplingParams(n=4, max_tokens=10, seed=11, top_p=top_p,
                                                                  logprobs=True)))
    for c in candidates:
        forced = teacher_forced_logprobs(lm, prompt, c.token_ids)
        for step, token in enumerate(c.token_ids):
            probs = forced[step].exp()
            mass_above = float(probs[probs > probs[token]].sum())
            assert mass_above < top_p + 1e-4, f"token {token} lies outside the top-{top_p} nucleus"
            sorted_probs = probs.sort(descending=True).values
            nucleus_size = int((sorted_probs.cumsum(0) - sorted_probs < top_p).sum())
            nucleus_mass = float(sorted_probs[:nucleus_size].sum())
            assert c.token_logprobs[step] == pytest.approx(float(forced[step, token]) - torch.log(
                torch.tensor(nucleus_mass)).item(), abs=1e-3)
    # the nucleus is small against the vocabulary, so the restriction is real
    assert nucleus_size < 0.5 * forced.shape[-1]


def test_a_tiny_top_p_is_greedy(lm):
    (nucleus,) = draw(lm, req(lm, "Colours", n=2, max_tokens=8, seed=4, top_p=1e-9))
    (greedy,) = draw(lm, req(lm, "Colours", max_tokens=8, temperature=0))
    assert nucleus[0].token_ids == nucleus[1].token_ids == greedy[0].token_ids


def test_a_cancelled_request_stops_early_and_leaves_its_batch_companions_alone(lm):
    calls = itertools.count()
    cancel_after = 3 * 2  # is_cancelled is asked once per row per step: two rows, three steps

    doomed = req(lm, "Long story", n=2, max_tokens=200, seed=1)
    doomed.is_cancelled = lambda: next(calls) >= cancel_after
    kept = req(lm, "Short", n=2, max_tokens=30, seed=2)
    stopped, finished = draw(lm, doomed, kept)
    for c in stopped:
        assert c.finish_reason == "cancelled" and c.num_tokens <= 4
    for c in finished:
        assert c.finish_reason == "length" and c.num_tokens == 30
    (alone,) = draw(lm, req(lm, "Short", n=2, max_tokens=30, seed=2))
    assert [c.token_ids for c in finished] == [c.token_ids for c in alone]


def test_sampling_params_reject_impossible_values():
    for bad in (dict(n=0), dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# -- PEFT adapters: mixed-adapter batches and shadow scoring -------------------------------------


@pytest.fixture(scope="module")
def peft_lm(tiny_model_path):
    """The tiny model with two LoRA adapters 'a' and 'b', randomised so the three policies differ."""
    model, tokenizer = two_adapter_model(tiny_model_path)
    return model, tokenizer, eos_ids(model, tokenizer)


def test_each_request_samples_from_its_own_adapter_in_a_mixed_batch(peft_lm):
    from bonbench.backends.sampling import BASE

    model = peft_lm[0]
    params = SamplingParams(n=2, max_tokens=10, seed=5)
    prompts = [ids(peft_lm, "the cat"), ids(peft_lm, "a much longer prompt about dogs and their owners")]
    mixed = draw(peft_lm, *(SampleRequest(p, params, adapter=a) for a in ("a", "b", BASE) for p in prompts))
    alone = []
    for adapter in ("a", "b", BASE):
        if adapter == BASE:
            with model.disable_adapter():
                alone += draw(peft_lm, *(SampleRequest(p, params) for p in prompts))
        else:
            model.set_adapter(adapter)
            alone += draw(peft_lm, *(SampleRequest(p, params) for p in prompts))
    model.set_adapter("a")
    assert [[c.token_ids for c in row] for row in mixed] == [[c.token_ids for c in row] for row in alone]
    assert [c.logprob for row in mixed for c in row] == pytest.approx([c.logprob for row in alone for c in row],
                                                                       abs=1e-3)
    # the adapters really differ: each gives the same seed's draw another probability
    logprobs = sorted(mixed[k][0].logprob for k in (0, 2, 4))
    assert min(b - a for a, b in zip(logprobs, logprobs[1:])) > 1e-2


def test_score_with_reports_teacher_forced_logprobs_under_the_other_adapters(peft_lm):
    from bonbench.backends.sampling import BASE
    from bonbench.logprobs import sequence_logprobs

    model, tokenizer, _ = peft_lm
    prompt = ids(peft_lm, "once upon a time")
    requests = [SampleRequest(prompt, SamplingParams(n=3, max_tokens=12, seed=1), adapter="a", score_with=("b", BASE)),
                SampleRequest(prompt, SamplingParams(n=2, max_tokens=12, seed=2), adapter="b")]
    with_shadows, plain = draw(peft_lm, *requests)
    alone = draw(peft_lm, SampleRequest(prompt, requests[0].params, adapter="a"))[0]
    assert [c.token_ids for c in with_shadows] == [c.token_ids for c in alone]  # shadows change no draw
    answers = [c.token_ids for c in with_shadows]
    with torch.no_grad():
        model.set_adapter("b")
        under_b = sequence_logprobs(model, tokenizer, [prompt] * 3, answers)
        model.set_adapter("a")
        with model.disable_adapter():
            under_base = sequence_logprobs(model, tokenizer, [prompt] * 3, answers)
        under_a = sequence_logprobs(model, tokenizer, [prompt] * 3, answers)
    for c, b, base, a in zip(with_shadows, under_b.tolist(), under_base.tolist(), under_a.tolist()):
        assert set(c.logprob_under) == {"b", BASE}
        assert c.logprob_under["b"] == pytest.approx(b, abs=1e-3)
        assert c.logprob_under[BASE] == pytest.approx(base, abs=1e-3)
        assert c.logprob == pytest.approx(a, abs=1e-3) and abs(a - b) > 1e-2
    assert all(c.logprob_under == {} for c in plain)


def test_a_batch_naming_adapters_must_name_one_for_every_request(peft_lm):
    prompt = ids(peft_lm, "hello")
    with pytest.raises(ValueError, match="every request must name one"):
        draw(peft_lm, SampleRequest(prompt, SamplingParams(max_tokens=2), adapter="a"),
             SampleRequest(prompt, SamplingParams(max_tokens=2)))
