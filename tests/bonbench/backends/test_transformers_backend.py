"""The in-process transformers backend: its worker thread, batching of concurrent requests,
context checks and cancellation, on the tiny random model."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from bonbench.backends.base import Backend, PromptTooLong, SamplingParams
from bonbench.backends.transformers import TransformersBackend, encode_prompt

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def backend(tiny_model_path):
    # float32: the token-for-token comparisons below are about batching, not about bfloat16 rounding
    backend = TransformersBackend.from_pretrained(tiny_model_path, "tiny", dtype="float32", max_batch_rows=16)
    yield backend
    asyncio.run(backend.close())
    assert not backend._worker.is_alive()


def test_backend_satisfies_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert backend.max_context == 2048


def test_generate_draws_n_candidates_and_counts_the_templated_prompt(backend):
    generation = asyncio.run(backend.generate(CHAT, SamplingParams(n=3, max_tokens=5, seed=0)))
    assert len(generation.candidates) == 3
    text = backend.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert generation.prompt_tokens == len(backend.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert generation.prompt_tokens == backend.count_prompt_tokens(CHAT)
    assert generation.completion_tokens == 15
    assert encode_prompt(backend.tokenizer, "plain text") == backend.tokenizer("plain text",
                                                                               add_special_tokens=False)["input_ids"]


def test_concurrent_seeded_requests_match_the_same_requests_one_at_a_time(backend):
    prompts = [CHAT, "Once upon a time", [{"role": "user", "content": "A much longer request " * 5}], "x"]
    params = [SamplingParams(n=n, max_tokens=6 + n, seed=10 + n) for n in (1, 2, 3, 4)]

    async def together():
        return await asyncio.gather(*(backend.generate(p, s) for p, s in zip(prompts, params)))

    batched = asyncio.run(together())
    for prompt, sp, generation in zip(prompts, params, batched):
        alone = asyncio.run(backend.generate(prompt, sp))
        assert [c.token_ids for c in generation.candidates] == [c.token_ids for c in alone.candidates]
        assert len(generation.candidates) == sp.n
        assert all(c.num_tokens == sp.max_tokens for c in generation.candidates)


def test_prompt_that_leaves_no_room_for_max_tokens_raises_prompt_too_long(backend):
    long_prompt = "word " * 1500
    with pytest.raises(PromptTooLong, match="context"):
        asyncio.run(backend.generate(long_prompt, SamplingParams(max_tokens=1000)))
    assert asyncio.run(backend.generate("word " * 10, SamplingParams(max_tokens=2))).candidates


def test_cancelling_a_generation_stops_its_candidates_and_frees_the_worker(backend):
    # Greedy on the tiny model never draws EOS in 2000 tokens, so each of the 16 candidates can
    # only end by running to max_tokens or by being stopped by the cancellation.
    doomed_params = SamplingParams(n=16, max_tokens=2000, temperature=0)

    async def scenario():
        doomed = asyncio.ensure_future(backend.generate("Long", doomed_params))
        await asyncio.sleep(0)  # generate() queues its job
        while not backend._queue.empty():  # the worker has taken it
            await asyncio.sleep(0.01)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        # served after the worker is done with the cancelled job, which it has counted by then
        return await backend.generate("Quick", SamplingParams(max_tokens=3, seed=0))

    before = dataclasses.replace(backend.cancelled_work)
    quick = asyncio.run(scenario())
    assert quick.candidates[0].num_tokens == 3
    stopped = backend.cancelled_work.candidates - before.candidates
    drawn = backend.cancelled_work.tokens - before.tokens
    assert stopped == doomed_params.n, "the cancelled candidates ran to their end"
    assert drawn < doomed_params.n * doomed_params.max_tokens


def test_a_chat_prompt_for_a_model_without_chat_template_is_a_value_error(backend):
    template = backend.tokenizer.chat_template
    backend.tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="chat template"):
            backend.count_prompt_tokens(CHAT)
    finally:
        backend.tokenizer.chat_template = template


def test_a_short_request_sent_while_a_long_batch_decodes_comes_back_before_it(backend):
    async def scenario():
        params = SamplingParams(n=8, max_tokens=1500, seed=0)
        long = asyncio.ensure_future(backend.generate("Write a long story", params))
        while backend.running_rows == 0:  # wait until the long batch decodes
            await asyncio.sleep(0.01)
        short = await backend.generate("Quick", SamplingParams(n=8, max_tokens=3, seed=1))
        still_running = not long.done()
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return short, still_running

    short, still_running = asyncio.run(scenario())
    assert [c.num_tokens for c in short.candidates] == [3] * 8
    assert still_running, "the short request did not wait for the long batch to end"


def test_an_empty_prompt_fails_its_own_request_and_the_worker_serves_on(backend):
    with pytest.raises(ValueError, match="no tokens"):
        asyncio.run(backend.generate("", SamplingParams(max_tokens=2)))
    assert asyncio.run(backend.generate("next", SamplingParams(max_tokens=2))).candidates[0].num_tokens == 2


def test_a_sliding_window_models_context_is_its_window(tiny_model_path):
    from transformers import AutoTokenizer

    from tests.sliding_models import SUPPORTED, WINDOW, sliding_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    backend = TransformersBackend(sliding_model(SUPPORTED[0], tokenizer), tokenizer, "sliding")
    try:
        assert backend.max_context == WINDOW < backend.model.config.max_position_embeddings
        prompt = "word " * 10
        fits = WINDOW - backend.count_prompt_tokens(prompt)
        with pytest.raises(PromptTooLong, match=f"sliding window of {WINDOW} tokens"):
            asyncio.run(backend.generate(prompt, SamplingParams(max_tokens=fits + 1)))
        assert asyncio.run(backend.generate(prompt, SamplingParams(max_tokens=fits))).candidates
    finally:
        asyncio.run(backend.close())


class CountingTokenizer:
    """The real tokenizer, counting the prompts it encodes (text or chat template)."""

    def __init__(self, tokenizer):
        self.inner, self.encoded = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.encoded += 1
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.encoded += 1
        return self.inner.apply_chat_template(*args, **kwargs)


def test_a_prompt_counted_then_generated_from_is_encoded_once(backend):
    tokenizer = CountingTokenizer(backend.tokenizer)
    counting = TransformersBackend(backend.model, tokenizer, "tiny", max_batch_rows=4)
    try:
        for prompt in (CHAT, "Once upon a time"):  # as the server does: count, check, then generate
            before = tokenizer.encoded
            tokens = counting.count_prompt_tokens(prompt)
            generation = asyncio.run(counting.generate(prompt, SamplingParams(max_tokens=2, seed=0)))
            assert tokenizer.encoded - before == 1
            assert generation.prompt_tokens == tokens == len(encode_prompt(backend.tokenizer, prompt))
            again = asyncio.run(counting.generate(prompt, SamplingParams(max_tokens=2, seed=0)))  # not counted
            assert tokenizer.encoded - before == 2
            assert [c.token_ids for c in again.candidates] == [c.token_ids for c in generation.candidates]
    finally:
        asyncio.run(counting.close())
