"""Pairwise judgments over the OpenAI API, cached on disk.

One judgment: the judge reads a prompt and two answers, shown as "Response A" and "Response B", and
says which is better. ``p_first`` is the probability that the answer shown first (A) is the
better one, read in one of three ways (``JudgeSpec.read``):

* ``label``: the judge writes ``A``, ``B`` or ``tie`` (temperature 0); ``p_first`` is 1, 0 or ½.
  A reply that names neither is kept as an invalid judgment (``p_first`` None) and counted.
* ``top-logprobs``: one token at temperature 0 with ``top_logprobs=20``;
  ``p_first = σ(log p(A) − log p(B))`` over the first token's alternatives. A label missing
  from the list gets the smallest listed log-probability (an upper bound on its own).
* ``sampled-logprobs``: for servers that report the sampled tokens' log-probabilities but no
  alternatives (``bonbench serve``): ``draws`` one-token samples at temperature 1, top_p 1,
  with a seed from the cache key. Every sampled token's log-probability is exact, so a label
  drawn at least once has its exact ``log p``; a label never drawn gets ``log(1/(draws + 2))``,
  its posterior mean under a uniform prior. Neither drawn: invalid. Only ``A`` and ``B``
  count; the tie is ``p_first`` near ½.

Tokens count as a label when, stripped of spaces, they are exactly ``A`` or ``B``; the
log-probabilities of all such tokens (``A``, `` A``) are added.

Requests run concurrently, at most ``concurrency`` at once; the openai client retries
connection errors, 408, 409, 429 and 5xx with exponential backoff and jitter (honouring
``Retry-After``), ``max_retries`` times. What still fails stops the run with one sentence
(``JudgeError``); the judgments finished before it stay in the cache, so a rerun resumes.

The cache is a JSONL file, one line per judgment, keyed by a SHA-256 of the judge's identity
(model, how the preference is read, the template and sampling settings; not the URL, so an
embedded judge on a new port still hits) and of the judged text (prompt, reference, the two
answers in their order).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from bonbench.errors import UserError

log = logging.getLogger("evals.judge")

READ_MODES = ("label", "top-logprobs", "sampled-logprobs")

TEMPLATE = """Compare two responses to the same request and decide which one is better: more helpful, \
correct, faithful to any text in the request, and concise. Judge the content only, not the length \
of the responses or the order in which they appear.

[Request]
{prompt}
{reference}
[Response A]
{first}

[Response B]
{second}

Which response is better? Reply with one letter, A or B, or with the word tie if they are equally good."""

REFERENCE_BLOCK = "\n[A reference answer written by a person]\n{reference}\n"

_TIE = re.compile(r"^\W*(?:it'?s\s+)?(?:a\s+)?(?:tie|draw)\b", re.IGNORECASE)
_LETTER = re.compile(r"^\W*(?:(?:[Rr]esponse|[Aa]nswer|[Bb]etter(?: response)?)\s*:?\s*)?\(?([AB])\b")


class JudgeError(UserError, RuntimeError):
    """The judge failed or refused; the message is one sentence for the user."""


class JudgeUnreachable(JudgeError):
    """Nothing answers at the judge's URL."""


@dataclass(frozen=True)
class JudgeSpec:
    """Everything that changes a judgment, and so the cache key."""

    model: str
    read: str = "label"
    template: str = TEMPLATE
    draws: int = 32  # sampled-logprobs: one-token samples per judgment
    max_tokens: int = 16  # label: most tokens of the reply

    def __post_init__(self) -> None:
        if self.read not in READ_MODES:
            raise ValueError(f"unknown way to read the preference {self.read!r}; use one of {', '.join(READ_MODES)}")
        if self.draws < 1 or self.max_tokens < 1:
            raise ValueError("draws and max_tokens must be >= 1")
        check_template(self.template)

    def key(self, prompt: str, first: str, second: str, reference: str | None) -> str:
        identity = asdict(self)
        if self.read != "sampled-logprobs":
            identity.pop("draws")
        if self.read != "label":
            identity.pop("max_tokens")
        text = json.dumps([identity, prompt, reference, first, second], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def render(self, prompt: str, first: str, second: str, reference: str | None) -> str:
        block = REFERENCE_BLOCK.format(reference=reference) if reference else ""
        return self.template.format(prompt=prompt, first=first, second=second, reference=block)


def check_template(template: str) -> None:
    """A template must use {prompt}, {first} and {second} (and may use {reference}), nothing else."""
    try:
        text = template.format(prompt="\0p", first="\0f", second="\0s", reference="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"the judge template has a field other than {{prompt}}, {{first}}, {{second}}, "
                         f"{{reference}} (or a stray brace): {exc}") from None
    missing = [name for name, mark in (("prompt", "\0p"), ("first", "\0f"), ("second", "\0s")) if mark not in text]
    if missing:
        raise ValueError(f"the judge template lacks {', '.join('{' + m + '}' for m in missing)}")


# ---------------------------------------------------------------------------------------
# Reading a preference (pure)


def parse_label(reply: str) -> float | None:
    """``p_first`` from a written label: A → 1, B → 0, tie → ½, anything else → None."""
    if _TIE.match(reply or ""):
        return 0.5
    match = _LETTER.match(reply or "")
    if match is None:
        return None
    return 1.0 if match.group(1) == "A" else 0.0


def label_logprobs(token_logprobs: dict[str, float]) -> tuple[float | None, float | None]:
    """``(log p(A), log p(B))`` from ``{token: logprob}``; tokens ``A`` and `` A`` both count."""
    found: dict[str, list[float]] = {"A": [], "B": []}
    for token, logprob in token_logprobs.items():
        label = token.strip()
        if label in found:
            found[label].append(logprob)
    a, b = (float(_logsumexp(v)) if v else None for v in (found["A"], found["B"]))
    return a, b


def preference_from_logprobs(token_logprobs: dict[str, float], unseen_logprob: float) -> tuple[float | None,
                                                                                               float, float]:
    """``(p_first, log p(A), log p(B))``; a label absent from ``token_logprobs`` gets
    ``unseen_logprob``; both absent: ``p_first`` None."""
    a, b = label_logprobs(token_logprobs)
    if a is None and b is None:
        return None, math.nan, math.nan
    a = unseen_logprob if a is None else a
    b = unseen_logprob if b is None else b
    return 1.0 / (1.0 + math.exp(b - a)), a, b


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# ---------------------------------------------------------------------------------------
# The cache


class JudgmentCache:
    """Judgments by key in an append-only JSONL file; each line is written whole and flushed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            broken = 0
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    broken += 1
            if broken:
                log.warning("%s: %d unreadable line(s) skipped (a run stopped mid-write?); those pairs are "
                            "judged again", self.path, broken)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> dict:
        return self.entries[key]

    def add(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.entries[entry["key"]] = entry


# ---------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Comparison:
    """One judgment to make: ``first`` is shown as Response A."""

    key: str
    prompt: str
    first: str
    second: str
    reference: str | None


async def request_judgment(client, spec: JudgeSpec, item: Comparison) -> dict:
    """Ask the judge once; returns the cache entry (``p_first`` None for an invalid judgment)."""
    messages = [{"role": "user", "content": spec.render(item.prompt, item.first, item.second, item.reference)}]
    entry = {"key": item.key, "judge": spec.model, "read": spec.read, "created": time.time()}
    if spec.read == "label":
        reply = await client.chat.completions.create(model=spec.model, messages=messages, temperature=0,
                                                     max_tokens=spec.max_tokens)
        text = reply.choices[0].message.content or ""
        return {**entry, "p_first": parse_label(text), "logprob_a": math.nan, "logprob_b": math.nan, "reply": text}
    if spec.read == "top-logprobs":
        reply = await client.chat.completions.create(model=spec.model, messages=messages, temperature=0,
                                                     max_tokens=1, logprobs=True, top_logprobs=20)
        content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
        if not content or not content[0].top_logprobs:
            raise JudgeError(f"the judge {spec.model} returned no top log-probabilities; use --read label")
        tokens = {t.token: t.logprob for t in content[0].top_logprobs}
        unseen = min(tokens.values())
    else:
        reply = await client.chat.completions.create(model=spec.model, messages=messages, temperature=1, top_p=1,
                                                     max_tokens=1, n=spec.draws, logprobs=True,
                                                     seed=int(item.key[:8], 16))
        tokens = {}
        for choice in reply.choices:
            if not choice.logprobs or not choice.logprobs.content:
                raise JudgeError(f"the judge {spec.model} returned no token log-probabilities; use --read label")
            tokens[choice.logprobs.content[0].token] = choice.logprobs.content[0].logprob
        unseen = -math.log(spec.draws + 2)
    p_first, lp_a, lp_b = preference_from_logprobs(tokens, unseen)
    return {**entry, "p_first": p_first, "logprob_a": lp_a, "logprob_b": lp_b,
            "reply": json.dumps(tokens, ensure_ascii=False)}


def _failure(exc: Exception, base_url: str, max_retries: int) -> JudgeError:
    """One sentence for what the openai client raised."""
    import openai

    if isinstance(exc, openai.APIConnectionError):
        return JudgeUnreachable(f"cannot reach the judge at {base_url} ({exc.__cause__ or exc}); start it, or point "
                                f"--judge-base-url at a running OpenAI-compatible server")
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            message = body["message"]  # OpenAI's error body
        else:
            message = exc.message if body is None else json.dumps(body, ensure_ascii=False)
        message = " ".join(message.split())[:300]
        if exc.status_code == 429 or exc.status_code >= 500:
            return JudgeError(f"the judge at {base_url} kept failing with HTTP {exc.status_code} after "
                              f"{max_retries} retries: {message}")
        return JudgeError(f"the judge at {base_url} refused the request with HTTP {exc.status_code}: {message}")
    return JudgeError(f"the judge at {base_url} failed: {exc}")


async def _list_models(client, base_url: str, *, required: bool) -> list[str]:
    """The models at ``base_url``, asked once without retries: nothing answering there is a
    ``JudgeUnreachable`` at once. An HTTP error is one only if the list is ``required``."""
    import openai

    try:
        models = await client.with_options(max_retries=0).models.list()
    except openai.APIConnectionError as exc:
        raise _failure(exc, base_url, 0) from exc
    except openai.APIStatusError as exc:
        if not required:
            return []
        raise JudgeError(f"cannot list the models at {base_url} (HTTP {exc.status_code}); "
                         "name the judge with --judge-model") from exc
    return [m.id for m in models.data]


def resolve_model(base_url: str, api_key: str, timeout: float = 30.0) -> str:
    """The first model the judge at ``base_url`` serves (for a judge named by URL only)."""
    from openai import AsyncOpenAI

    async def main() -> str:
        async with AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0) as client:
            models = await _list_models(client, base_url, required=True)
        if not models:
            raise JudgeError(f"{base_url} serves no model; name the judge with --judge-model")
        return models[0]

    return asyncio.run(main())


def judge_all(base_url: str, api_key: str, spec: JudgeSpec, items: list[Comparison], cache: JudgmentCache, *,
              concurrency: int = 8, max_retries: int = 6, timeout: float = 120.0,
              on_done: Callable[[], None] = lambda: None) -> None:
    """Judge ``items`` (none of them cached), adding each judgment to ``cache`` as it arrives.

    First checks, without retries, that something answers at ``base_url``; then runs at most
    ``concurrency`` requests at once. The first failure cancels the rest and raises ``JudgeError``.
    """
    from openai import AsyncOpenAI

    async def main() -> None:
        async with AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                               max_retries=max_retries) as client:
            await _list_models(client, base_url, required=False)
            limit = asyncio.Semaphore(concurrency)

            async def one(item: Comparison) -> None:
                async with limit:
                    try:
                        entry = await request_judgment(client, spec, item)
                    except JudgeError:
                        raise
                    except Exception as exc:
                        raise _failure(exc, base_url, max_retries) from exc
                cache.add(entry)
                on_done()

            tasks = [asyncio.ensure_future(one(item)) for item in items]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
