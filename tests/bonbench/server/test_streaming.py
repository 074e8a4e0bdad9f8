"""Streamed replies through the official ``openai`` client: the deltas spell the same chosen
answers as the non-streamed reply for the same seed."""

from __future__ import annotations

from collections import defaultdict

from .conftest import TINY_NAME

MESSAGES = [{"role": "user", "content": "Summarize the following article in one sentence.\n\n"
                                        "A new library opened in the town centre on Monday."}]


def test_streamed_chat_deltas_concatenate_to_the_non_streamed_choices(tiny_server):
    client = tiny_server.client()
    kw = dict(model=TINY_NAME, messages=MESSAGES, max_tokens=24, n=2, seed=77)
    plain = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    texts, roles, finish = defaultdict(str), {}, {}
    usage_chunks = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.model == TINY_NAME
        if chunk.usage is not None:
            usage_chunks.append(chunk)
            assert chunk.choices == []
            continue
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert dict(texts) == {c.index: c.message.content for c in plain.choices}
    assert roles == {0: "assistant", 1: "assistant"}
    assert finish == {c.index: c.finish_reason for c in plain.choices}
    assert len(usage_chunks) == 1, "include_usage sends exactly one usage chunk"
    assert usage_chunks[0].usage.model_dump() == plain.usage.model_dump()


def test_streamed_completion_text_concatenates_to_the_non_streamed_text(tiny_server):
    client = tiny_server.client()
    kw = dict(model=TINY_NAME, prompt=["It was a dark", "The answer is"], max_tokens=20, seed=9)
    plain = client.completions.create(**kw)
    texts, finish, usage = defaultdict(str), {}, []
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert dict(texts) == {c.index: c.text for c in plain.choices}
    assert finish == {c.index: c.finish_reason for c in plain.choices}
    assert [u.model_dump() for u in usage] == [plain.usage.model_dump()]


def test_stream_without_include_usage_sends_no_usage_chunk(tiny_server):
    chunks = list(tiny_server.client().chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=4,
                                                               seed=1, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streamed_request_with_an_error_answers_with_a_status_not_a_broken_stream(tiny_server):
    import openai
    import pytest

    with pytest.raises(openai.NotFoundError) as info:
        list(tiny_server.client().chat.completions.create(model="no-such-model", messages=MESSAGES, stream=True))
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"
