"""In-process generation with vLLM's ``AsyncLLMEngine`` (GPU; ``pip install 'bonbench[gpu]'``).

One vLLM request carries all ``n`` candidates of a prompt, so they share its prefill and its KV
blocks; vLLM's continuous batching runs concurrent requests together. A request cancelled by the
server (client gone) is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import uuid

from bonbench.backends.base import (Candidate, Generation, PartialScorer, Prompt, SamplingParams, check_context,
                                    refuse_early_rejection)


class VLLMBackend:
    def __init__(self, model: str, model_name: str | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, **engine_kw):
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise ImportError("--backend vllm needs vLLM: pip install 'bonbench[gpu]'") from exc
        args = AsyncEngineArgs(model=model, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                               max_model_len=max_model_len, **engine_kw)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.model_name = model_name or model
        self._model_path = model
        self._tokenizer = None
        # vLLM picks the context when none is given; report it, so the service refuses long prompts itself
        config = getattr(self.engine, "model_config", None)
        self._max_context = max_model_len or getattr(config, "max_model_len", None)

    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        return self._tokenizer

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        from bonbench.backends.transformers import encode_prompt

        return encode_prompt(self._tok(), prompt)

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(self._prompt_ids(prompt))

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       score_partial: PartialScorer | None = None) -> Generation:
        refuse_early_rejection(params, "vllm")
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = self._prompt_ids(prompt)
        check_context(len(ids), params.max_tokens, self._max_context or None)
        sp = VSamplingParams(n=params.n, max_tokens=params.max_tokens, temperature=params.temperature,
                             top_p=params.top_p, stop=list(params.stop) or None, seed=params.seed, logprobs=0,
                             # one output holding all n candidates: streamed outputs of an n > 1 request
                             # each carry only the candidate that moved, so the last one lacks the others
                             output_kind=RequestOutputKind.FINAL_ONLY)
        request_id = uuid.uuid4().hex
        final = None
        try:
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=ids), sp, request_id):
                final = output
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            raise
        candidates = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            token_lps = [next(iter(d.values())).logprob for d in (o.logprobs or [])]
            candidates.append(Candidate(
                text=o.text, num_tokens=len(o.token_ids), finish_reason=o.finish_reason or "stop",
                logprob=o.cumulative_logprob, token_ids=list(o.token_ids),
                tokens=[self._tok().decode([t]) for t in o.token_ids] if params.logprobs else [],
                token_logprobs=token_lps if params.logprobs else [],
            ))
        return Generation(prompt_tokens=len(ids), candidates=candidates)

    async def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
