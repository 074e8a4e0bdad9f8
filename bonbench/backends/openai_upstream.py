"""Candidates from an upstream OpenAI-compatible server (``vllm serve``, another bonbench, ...).

bonbench asks the upstream for all ``n`` candidates in one request (so a vLLM upstream shares the
prompt's prefill among them) and only scores and selects. Token log-probabilities are requested
so that each candidate's token count and log-probability are known; an upstream that does not
return them gives ``logprob=None`` and counts tokens from its ``usage`` (split evenly, and said so
in the log).
"""

from __future__ import annotations

import logging

from bonbench.backends.base import (Candidate, Generation, PartialScorer, Prompt, SamplingParams, UpstreamError,
                                    is_chat, refuse_early_rejection)

log = logging.getLogger(__name__)


class OpenAIUpstreamBackend:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, max_connections: int = 256):
        import httpx
        from openai import AsyncOpenAI

        self.base_url = base_url
        self._api_key = api_key or "EMPTY"
        self._client = AsyncOpenAI(
            base_url=base_url, api_key=self._api_key, timeout=timeout, max_retries=0,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=max_connections), timeout=timeout),
        )
        self.model_name = model or ""

    async def resolve_model(self) -> str:
        """The upstream's first served model, when none was named.

        Uses a client of its own: the server calls this on a short-lived event loop before it
        starts, and a pooled connection opened there would fail on the server's loop."""
        from openai import AsyncOpenAI

        if not self.model_name:
            try:
                async with AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=30.0,
                                       max_retries=0) as client:
                    models = await client.models.list()
            except Exception as exc:
                raise UpstreamError(f"cannot list models at {self.base_url}: {exc}") from exc
            if not models.data:
                raise UpstreamError(f"{self.base_url} serves no model")
            self.model_name = models.data[0].id
        return self.model_name

    @property
    def max_context(self) -> int | None:
        return None  # the upstream checks its own context

    def count_prompt_tokens(self, prompt: Prompt) -> int | None:
        return None

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       score_partial: PartialScorer | None = None) -> Generation:
        import openai

        refuse_early_rejection(params, "upstream (--upstream)")
        common = dict(model=self.model_name, n=params.n, max_tokens=params.max_tokens,
                      temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                      stop=list(params.stop) or None)
        try:
            if is_chat(prompt):
                reply = await self._client.chat.completions.create(messages=list(prompt), logprobs=True, **common)
            else:
                reply = await self._client.completions.create(prompt=prompt, logprobs=0, **common)
        except openai.APIStatusError as exc:
            raise UpstreamError(_upstream_message(exc), status=exc.status_code) from exc
        except openai.APIError as exc:
            raise UpstreamError(f"{self.base_url} unreachable: {exc}") from exc
        choices = sorted(reply.choices, key=lambda c: c.index)
        if len(choices) != params.n:
            raise UpstreamError(f"asked {self.base_url} for {params.n} candidates, got {len(choices)}")
        candidates = [_candidate(c, chat=is_chat(prompt), keep=params.logprobs) for c in choices]
        if any(c.num_tokens < 0 for c in candidates) and reply.usage is not None:
            share = reply.usage.completion_tokens // len(candidates)
            log.warning("upstream gave no token log-probabilities: token counts split evenly from usage")
            for c in candidates:
                c.num_tokens = share
        prompt_tokens = reply.usage.prompt_tokens if reply.usage is not None else 0
        return Generation(prompt_tokens=prompt_tokens, candidates=candidates)

    async def close(self) -> None:
        await self._client.close()


def _upstream_message(exc) -> str:
    try:
        return exc.body["message"] if isinstance(exc.body, dict) and "message" in exc.body else str(exc)
    except Exception:
        return str(exc)


def _candidate(choice, *, chat: bool, keep: bool) -> Candidate:
    if chat:
        text = choice.message.content or ""
        entries = choice.logprobs.content if choice.logprobs and choice.logprobs.content else None
        tokens = [e.token for e in entries] if entries else None
        logprobs = [e.logprob for e in entries] if entries else None
    else:
        text = choice.text
        lp = choice.logprobs
        tokens = list(lp.tokens) if lp and lp.tokens else None
        logprobs = [x for x in lp.token_logprobs if x is not None] if lp and lp.token_logprobs else None
    return Candidate(
        text=text,
        num_tokens=len(tokens) if tokens is not None else -1,
        finish_reason=choice.finish_reason or "stop",
        logprob=float(sum(logprobs)) if logprobs is not None else None,
        tokens=tokens if (keep and tokens) else [],
        token_logprobs=logprobs if (keep and logprobs) else [],
    )
