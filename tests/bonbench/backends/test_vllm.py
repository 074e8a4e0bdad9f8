"""The vLLM serving backend. Opt-in: runs only where ``import vllm`` works and ``BONBENCH_TEST_VLLM=1``
(a GPU, or vLLM's CPU build: see tests/vllm_support.py)."""

from __future__ import annotations

import asyncio

import pytest

from bonbench.backends.base import PromptTooLong, SamplingParams
from tests.vllm_support import save_vllm_tiny_model, vllm_skip_reason

_SKIP = vllm_skip_reason()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@pytest.fixture(scope="module")
def vllm_backend(tmp_path_factory):
    from bonbench.backends.vllm import VLLMBackend

    model = save_vllm_tiny_model(tmp_path_factory.mktemp("vllm-tiny"))
    backend = VLLMBackend(model, "tiny", dtype="float32", gpu_memory_utilization=0.3, max_model_len=512,
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
