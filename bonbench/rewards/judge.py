"""An LLM judge over the OpenAI API: any OpenAI-compatible server and model grades each answer.

The judge reads the prompt and one answer and replies with a grade from 1 to 10; the reward is
that grade. Requests run concurrently (bounded), so N candidates cost one round trip. A reply
without a grade, or a failed request, fails the whole call with the judge's words: a silent
default grade would hide a broken judge.
"""

from __future__ import annotations

import asyncio
import re
from typing import Sequence

from bonbench.backends.base import Prompt, prompt_text
from bonbench.rewards.base import RewardError

JUDGE_TEMPLATE = """You grade answers. Read the request and the answer, then rate how well the answer \
fulfils the request: correct, faithful to any given text, concise and complete.

Request:
{prompt}

Answer:
{response}

Reply with the grade alone, an integer from 1 (useless) to 10 (excellent)."""

_GRADE = re.compile(r"\b(10|[1-9])\b")


def parse_grade(reply: str) -> float:
    match = _GRADE.search(reply or "")
    if match is None:
        raise RewardError(f"the judge gave no grade from 1 to 10: {reply[:200]!r}")
    return float(match.group(1))


class JudgeReward:
    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 max_concurrency: int = 8, timeout: float = 60.0, template: str = JUDGE_TEMPLATE):
        from openai import AsyncOpenAI

        self.name = f"judge:{model}"
        self.model = model
        self.template = template
        self.max_concurrency = max_concurrency
        self._client_args = dict(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=2)
        self._client_cls = AsyncOpenAI

    async def _grade_all(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        limit = asyncio.Semaphore(self.max_concurrency)
        async with self._client_cls(**self._client_args) as client:

            async def one(prompt: Prompt, response: str) -> float:
                async with limit:
                    reply = await client.chat.completions.create(
                        model=self.model,
                        messages=[{"role": "user", "content": self.template.format(
                            prompt=prompt_text(prompt), response=response)}],
                        temperature=0,
                        max_tokens=8,
                    )
                return parse_grade(reply.choices[0].message.content or "")

            return list(await asyncio.gather(*(one(p, r) for p, r in zip(prompts, responses))))

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        # Called from a worker thread (never the server's event loop), so a private loop is safe.
        return asyncio.run(self._grade_all(prompts, responses))
