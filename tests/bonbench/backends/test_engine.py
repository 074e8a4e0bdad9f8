"""Continuous batching (``bonbench.backends.engine.Engine``) on the tiny random model: requests join a
running batch, long prompts are prefilled in chunks, finished and cancelled rows leave, and none of
it changes a seeded request's tokens. Progress is counted in engine steps, never in seconds."""

from __future__ import annotations

import pytest
import torch

from bonbench.backends.base import PromptTooLong, SamplingParams
from bonbench.backends.engine import Engine
from bonbench.backends.sampling import SampleRequest, sample
from bonbench.backends.transformers import eos_ids, load_causal_lm
from tests.sliding_models import REFUSED, SUPPORTED, WINDOW, sliding_model


@pytest.fixture(scope="module")
def lm(tiny_model_path):
    model, tokenizer = load_causal_lm(tiny_model_path, "float32")
    return model, tokenizer, eos_ids(model, tokenizer)


def req(lm, text: str, **params) -> SampleRequest:
    return SampleRequest(lm[1](text, add_special_tokens=False)["input_ids"], SamplingParams(**params))


class Recorder:
    """Collects each request's candidates and the engine step at which they came back."""

    def __init__(self, engine: Engine):
        self.engine, self.steps, self.done, self.finished_at = engine, 0, {}, {}

    def add(self, name: str, request: SampleRequest) -> None:
        self.engine.add(request, lambda candidates: self._finish(name, candidates))

    def _finish(self, name, candidates):
        self.done[name] = candidates
        self.finished_at[name] = self.steps

    def step(self) -> None:
        self.steps += 1
        self.engine.step()

    def run(self, until: str | None = None) -> None:
        while not self.engine.idle and (until is None or until not in self.done):
            self.step()


def alone(lm, request: SampleRequest) -> list[list[int]]:
    (candidates,) = sample(lm[0], lm[1], [request], lm[2])
    return [c.token_ids for c in candidates]


def test_a_request_that_joins_a_running_batch_mid_way_draws_the_tokens_it_draws_alone(lm):
    long_prompt = "a much longer prompt, prefilled in several chunks while the others decode " * 3
    early = dict(n=3, max_tokens=40, seed=1)
    late = dict(n=2, max_tokens=12, seed=7)
    engine = Recorder(Engine(lm[0], lm[1], lm[2], max_rows=16, max_step_tokens=16 + 8))
    engine.add("early", req(lm, "The quick brown fox", **early))
    for _ in range(5):
        engine.step()
    assert engine.engine.running_rows == 3
    engine.add("late", req(lm, long_prompt, **late))
    engine.add("greedy", req(lm, "Hi", max_tokens=6, temperature=0))
    engine.run()
    assert [c.token_ids for c in engine.done["late"]] == alone(lm, req(lm, long_prompt, **late))
    assert [c.token_ids for c in engine.done["early"]] == alone(lm, req(lm, "The quick brown fox", **early))
    assert [c.token_ids for c in engine.done["greedy"]] == alone(lm, req(lm, "Hi", max_tokens=6, temperature=0))


def test_a_request_whose_prompt_was_run_before_draws_what_prefilling_it_draws(lm):
    """A trainer runs each prompt once, with gradients, and hands the engine that pass (``prefix``):
    the engine continues it, spending no prefill, and the seeded rows draw the same tokens."""
    from bonbench.backends.prefill import prompt_states

    model, tokenizer, eos = lm
    requests = [req(lm, text, n=3, max_tokens=8, seed=s) for s, text in enumerate(["A long river", "Hi"])]
    plain = sample(model, tokenizer, requests, eos)
    with torch.inference_mode():
        states = prompt_states(model, [r.prompt_ids for r in requests])
    given = [SampleRequest(r.prompt_ids, r.params, prefix={None: states[tuple(r.prompt_ids)]})
             for r in requests]
    engine = Engine(model, tokenizer, eos)
    recorder = Recorder(engine)
    for name, request in enumerate(given):
        recorder.add(name, request)
    recorder.step()  # one step: both requests join and draw their first token, no prefill to wait for
    assert all(len(row.token_ids) == 1 for row in engine._rows) and len(engine._rows) == 6
    while not engine.idle:
        recorder.step()
    for name, candidates in enumerate(plain):
        assert [c.token_ids for c in recorder.done[name]] == [c.token_ids for c in candidates]
        for mine, theirs in zip(recorder.done[name], candidates):
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
    with pytest.raises(ValueError, match="another prompt's"):
        engine.add(SampleRequest(requests[1].prompt_ids, requests[1].params, prefix={None: states[tuple(requests[0].prompt_ids)]}),
                   lambda c: None)


def test_a_short_request_arriving_while_a_long_batch_decodes_finishes_long_before_it(lm):
    engine = Recorder(Engine(lm[0], lm[1], lm[2], max_rows=16, max_step_tokens=64))
    engine.add("long", req(lm, "Write a long story", n=8, max_tokens=200, seed=0))
    for _ in range(3):
        engine.step()
    arrived = engine.steps
    engine.add("short", req(lm, "Quick", n=8, max_tokens=4, seed=1))
    engine.run(until="short")
    assert "long" not in engine.done and engine.engine.running_rows == 8
    # admitted, prefilled and decoding at the next step; four tokens take four steps
    assert engine.finished_at["short"] - arrived == 4
    engine.run()
    assert engine.finished_at["long"] == 200


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_keeps_decoding(lm):
    budget = 4 + 10  # four decoding rows, ten prompt tokens per step
    engine = Recorder(Engine(lm[0], lm[1], lm[2], max_rows=8, max_step_tokens=budget))
    engine.add("running", req(lm, "Running", n=4, max_tokens=30, seed=2))
    engine.step()
    prompt = req(lm, "word " * 50, max_tokens=3, seed=3)
    prompt.prompt_ids = prompt.prompt_ids[:45]
    engine.add("long prompt", prompt)
    rows_per_step = []
    while "long prompt" not in engine.done:
        engine.step()
        rows_per_step.append(engine.engine.running_rows)
    # five steps of ten prompt tokens each, the four running rows decoding at every one of them
    assert rows_per_step[:4] == [4, 4, 4, 4] and rows_per_step[4] == 5
    assert len(rows_per_step) == 4 + 3  # then its three tokens, one per step
    expected = alone(lm, SampleRequest(prompt.prompt_ids, prompt.params))
    assert [c.token_ids for c in engine.done["long prompt"]] == expected


def test_the_row_budget_holds_a_request_back_until_rows_free_up(lm):
    engine = Recorder(Engine(lm[0], lm[1], lm[2], max_rows=4, max_step_tokens=64))
    engine.add("first", req(lm, "First", n=3, max_tokens=5, seed=4))
    engine.add("second", req(lm, "Second", n=2, max_tokens=5, seed=5))
    most = 0
    while not engine.engine.idle:
        engine.step()
        most = max(most, engine.engine.running_rows)
    assert most == 3 and engine.finished_at["first"] < engine.finished_at["second"]
    assert [c.token_ids for c in engine.done["second"]] == alone(lm, req(lm, "Second", n=2, max_tokens=5, seed=5))


def test_cancelling_a_request_frees_its_rows_at_the_next_step(lm):
    engine = Recorder(Engine(lm[0], lm[1], lm[2], max_rows=16, max_step_tokens=64))
    cancelled = False
    doomed = req(lm, "Doomed", n=4, max_tokens=100, seed=6)
    doomed.is_cancelled = lambda: cancelled
    engine.add("doomed", doomed)
    engine.add("kept", req(lm, "Kept", n=2, max_tokens=20, seed=8))
    for _ in range(3):
        engine.step()
    assert engine.engine.running_rows == 6
    cancelled = True
    engine.step()
    assert engine.engine.running_rows == 2
    assert [c.finish_reason for c in engine.done["doomed"]] == ["cancelled"] * 4
    assert all(c.num_tokens == 4 for c in engine.done["doomed"])
    engine.run()
    assert [c.token_ids for c in engine.done["kept"]] == alone(lm, req(lm, "Kept", n=2, max_tokens=20, seed=8))


def test_a_request_cancelled_before_it_starts_never_takes_a_row(lm):
    engine = Recorder(Engine(lm[0], lm[1], lm[2], max_rows=16, max_step_tokens=64))
    gone = req(lm, "Gone", n=3, max_tokens=50)
    gone.is_cancelled = lambda: True
    engine.add("gone", gone)
    engine.step()
    assert engine.engine.idle
    assert [(c.finish_reason, c.num_tokens) for c in engine.done["gone"]] == [("cancelled", 0)] * 3


def test_budgets_that_leave_no_room_for_prefill_are_refused(lm):
    with pytest.raises(ValueError, match="must exceed max_rows"):
        Engine(lm[0], lm[1], lm[2], max_rows=64, max_step_tokens=64)


# -- sliding-window models: served exactly, up to their window -------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.mark.parametrize("kind", SUPPORTED)
def test_a_sliding_window_model_decodes_what_generate_decodes_within_its_window(tokenizer, kind):
    import torch

    model = sliding_model(kind, tokenizer)
    eos = eos_ids(model, tokenizer)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("The quick brown fox jumps over the lazy dog", "Once upon a time")]
    requests = [SampleRequest(ids, SamplingParams(n=2, max_tokens=WINDOW - len(ids), temperature=0))
                for ids in prompts]  # each fills the window exactly
    drawn = sample(model, tokenizer, requests, eos)
    for ids, candidates in zip(prompts, drawn):
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=WINDOW - len(ids), eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(ids):].tolist()
        assert [c.token_ids for c in candidates] == [expected, expected]


@pytest.mark.parametrize("kind", SUPPORTED)
def test_a_request_longer_than_the_window_is_refused_before_it_runs(tokenizer, kind):
    model = sliding_model(kind, tokenizer)
    ids = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    request = SampleRequest(ids, SamplingParams(max_tokens=WINDOW - len(ids) + 1, temperature=0))
    with pytest.raises(PromptTooLong, match=f"context of {WINDOW} tokens; this model attends within a sliding "
                                            f"window of {WINDOW} tokens"):
        sample(model, tokenizer, [request], eos_ids(model, tokenizer))


def test_the_engine_refuses_a_request_given_directly_that_would_outgrow_the_window(tokenizer):
    model = sliding_model(SUPPORTED[0], tokenizer)
    ids = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    engine = Engine(model, tokenizer, [-1], max_rows=4, max_step_tokens=64)
    engine.add(SampleRequest(ids, SamplingParams(max_tokens=WINDOW - len(ids), temperature=0)), lambda _: None)
    with pytest.raises(PromptTooLong, match=f"sliding window of {WINDOW} tokens"):
        engine.add(SampleRequest(ids, SamplingParams(max_tokens=WINDOW - len(ids) + 1, temperature=0)), lambda _: None)


@pytest.mark.parametrize("kind, why", zip(REFUSED, ["its attention caps its logits", "its attention has sinks"]))
def test_a_model_whose_attention_the_engine_cannot_compute_is_refused_saying_why(tokenizer, kind, why):
    model = sliding_model(kind, tokenizer)
    with pytest.raises(NotImplementedError, match=f"cannot be served by it: {why}"):
        Engine(model, tokenizer, eos_ids(model, tokenizer))
