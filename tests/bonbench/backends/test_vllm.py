"""The vLLM backend (GPU). Opt-in: runs only where ``import vllm`` works and ``BONBENCH_TEST_VLLM=1``."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest

from bonbench.backends.base import PromptTooLong, SamplingParams

def _skip_reason() -> str | None:
    if os.environ.get("BONBENCH_TEST_VLLM") != "1":
        return "vLLM backend tests are opt-in: set BONBENCH_TEST_VLLM=1 on a machine with vLLM and a GPU"
    if importlib.util.find_spec("vllm") is None:
        return "BONBENCH_TEST_VLLM=1 but vLLM is not installed: pip install 'bonbench[gpu]'"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an installed but broken vLLM (no GPU, wrong torch)
        return f"BONBENCH_TEST_VLLM=1 but 'import vllm' fails: {type(exc).__name__}: {exc}"
    return None


_SKIP = _skip_reason()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@pytest.fixture(scope="module")
def vllm_backend(tiny_model_path):
    from bonbench.backends.vllm import VLLMBackend

    backend = VLLMBackend(tiny_model_path, "tiny", dtype="float32", gpu_memory_utilization=0.3, max_model_len=512,
                          enforce_eager=True)
    yield backend
    asyncio.run(backend.close())


def test_vllm_draws_n_seeded_candidates_with_token_counts_and_logprobs(vllm_backend):
    chat = [{"role": "user", "content": "Say hello."}]
    params = SamplingParams(n=3, max_tokens=6, seed=0, logprobs=True)

    async def twice():
        return await vllm_backend.generate(chat, params), await vllm_backend.generate(chat, params)

    first, again = asyncio.run(twice())
    assert len(first.candidates) == 3 and first.prompt_tokens == vllm_backend.count_prompt_tokens(chat)
    for c in first.candidates:
        assert c.num_tokens == len(c.token_ids) == len(c.token_logprobs) <= 6
        assert c.logprob == pytest.approx(sum(c.token_logprobs), abs=1e-3)
    assert [c.token_ids for c in first.candidates] == [c.token_ids for c in again.candidates]


def test_vllm_refuses_a_prompt_beyond_its_context(vllm_backend):
    with pytest.raises(PromptTooLong):
        asyncio.run(vllm_backend.generate("word " * 600, SamplingParams(max_tokens=8)))
