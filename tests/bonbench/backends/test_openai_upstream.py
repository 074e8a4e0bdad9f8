"""The upstream backend against a real OpenAI-compatible server: bonbench's own plain server (tiny
random model, no reward) as a child process on a loopback port."""

from __future__ import annotations

import asyncio

import pytest

from bonbench.backends.base import SamplingParams, UpstreamError
from bonbench.backends.openai_upstream import OpenAIUpstreamBackend
from bonbench.server.launch import child_env, free_port, launch_server

CHAT = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def upstream(tiny_model_path, tmp_path_factory):
    """Base URL of a plain single-sample server (max_tokens at most 32)."""
    args = ["--model", tiny_model_path, "--served-model-name", "tiny", "--reward-model", "none", "--n", "1",
            "--max-tokens", "32", "--default-max-tokens", "8", "--threads", "1", "--log-level", "warning"]
    log_path = tmp_path_factory.mktemp("upstream") / "server.log"
    with launch_server(args, log_path=log_path, startup_timeout=180, env=child_env(HF_HUB_OFFLINE="1")) as server:
        yield server.base_url


def run(base_url: str, scenario, model: str | None = "tiny"):
    """Run ``scenario(backend)`` on a fresh backend inside one event loop, then close it."""

    async def main():
        backend = OpenAIUpstreamBackend(base_url, model)
        try:
            return await scenario(backend)
        finally:
            await backend.close()

    return asyncio.run(main())


def test_resolve_model_names_the_upstreams_model_and_generation_then_works_on_another_loop(upstream):
    backend = OpenAIUpstreamBackend(upstream)
    # the server resolves the name on a short-lived loop of its own, then serves on uvicorn's
    assert asyncio.run(backend.resolve_model()) == "tiny"

    async def serve():
        try:
            return await backend.generate("Hello", SamplingParams(n=2, max_tokens=3, seed=0))
        finally:
            await backend.close()

    generation = asyncio.run(serve())
    assert [c.num_tokens for c in generation.candidates] == [3, 3]


def test_chat_candidates_carry_token_counts_and_logprobs_from_the_upstream(upstream):
    generation = run(upstream, lambda b: b.generate(CHAT, SamplingParams(n=3, max_tokens=5, seed=1, logprobs=True)))
    assert len(generation.candidates) == 3 and generation.prompt_tokens > 0
    for c in generation.candidates:
        assert c.num_tokens == 5 and len(c.tokens) == len(c.token_logprobs) == 5
        assert c.logprob == pytest.approx(sum(c.token_logprobs)) and c.logprob < 0
        assert c.finish_reason == "length"
    assert generation.completion_tokens == 15


def test_completion_candidates_carry_token_counts_and_logprobs_from_the_upstream(upstream):
    generation = run(upstream, lambda b: b.generate("Once upon", SamplingParams(n=2, max_tokens=4, seed=2)))
    for c in generation.candidates:
        assert c.num_tokens == 4 and isinstance(c.logprob, float)
        assert c.tokens == [] and c.token_logprobs == [], "per-token lists only when asked for"


def test_seed_and_stop_pass_through_to_the_upstream(upstream):
    params = SamplingParams(n=2, max_tokens=20, seed=5, stop=("e",))
    first = run(upstream, lambda b: b.generate("Say", params))
    again = run(upstream, lambda b: b.generate("Say", params))
    assert [c.text for c in first.candidates] == [c.text for c in again.candidates]
    assert all("e" not in c.text and c.finish_reason == "stop" for c in first.candidates)


def test_upstream_refusal_raises_upstream_error_with_its_status_and_message(upstream):
    with pytest.raises(UpstreamError, match="at most 32") as info:
        run(upstream, lambda b: b.generate("Hi", SamplingParams(max_tokens=100)))
    assert info.value.status == 400
    with pytest.raises(UpstreamError) as info:
        run(upstream, lambda b: b.generate("Hi", SamplingParams(max_tokens=2)), model="other-model")
    assert info.value.status == 404


def test_unreachable_upstream_raises_upstream_error_without_status():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UpstreamError, match="unreachable") as info:
        run(dead, lambda b: b.generate("Hi", SamplingParams(max_tokens=2)))
    assert info.value.status is None
    with pytest.raises(UpstreamError, match="cannot list models"):
        asyncio.run(OpenAIUpstreamBackend(dead).resolve_model())


def test_upstream_backend_leaves_prompt_checks_to_the_upstream():
    backend = OpenAIUpstreamBackend("http://127.0.0.1:9/v1", "m")
    assert backend.count_prompt_tokens("anything") is None and backend.max_context is None


def test_early_rejection_is_refused_before_anything_is_sent():
    from bonbench.rejection import EarlyRejection

    async def scenario(backend):
        assert not getattr(backend, "supports_early_rejection", False)
        params = SamplingParams(n=4, early_rejection=EarlyRejection((4,), 0.5))
        with pytest.raises(ValueError, match="cannot run early rejection"):
            await backend.generate("Hello", params, score_partial=lambda texts: [0.0] * len(texts))

    run(f"http://127.0.0.1:{free_port()}/v1", scenario)  # nobody listens there: nothing may be sent
