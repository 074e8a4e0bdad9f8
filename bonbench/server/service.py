"""Best-of-N as a service: request -> N candidates -> rewards -> a selection rule's n, as OpenAI replies.

No web framework here: the app hands in validated request models and gets response models (or
stream chunks) back; every failure is a typed ``APIError``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from bonbench.backends.base import (Backend, Generation, PartialScorer, Prompt, PromptTooLong, SamplingParams,
                                    UpstreamError, check_context)
from bonbench.hardware import one_torch_thread
from bonbench.rejection import EarlyRejection, estimated_tokens_saved
from bonbench.rewards.base import RewardError, RewardModel, checked_scores, scores_partial
from bonbench.seeds import derive_seed
from bonbench.select import Argmax, Candidates, SelectionError, SelectionRule, describe, make_rule
from bonbench.server import protocol as P
from bonbench.server.errors import (
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RewardFailed,
    UpstreamFailed,
)
from bonbench.server.metrics import Metrics


@dataclass(frozen=True)
class Limits:
    default_best_of: int = 8
    max_best_of: int = 64
    default_max_tokens: int = 128
    max_tokens: int = 1024
    max_prompt_tokens: int = 4096
    max_in_flight: int = 256  # requests accepted at once (running or queued); more get a 503
    max_body_bytes: int = 8 * 2**20  # larger request bodies get a 413 before they are read (the app's job)


# No tokenizer in common use has a token this long (SmolLM2's longest is 81 characters), so a prompt
# with more characters than this many times its token limit is refused without tokenising it.
MAX_CHARS_PER_TOKEN = 256

# A request's seed seeds candidate j's stream as derive_seed(seed, j) (one key); the selection of its
# prompt p draws from derive_seed(seed, SELECTION_STREAM, p) (two keys), a stream no candidate uses.
SELECTION_STREAM = 1


def early_rejection_unavailable(backend: Backend, reward: RewardModel | None) -> str | None:
    """Why early rejection cannot run with this backend and reward (None: it can)."""
    if reward is None:
        return "there is no reward model (--reward-model none) to score partial answers"
    if not scores_partial(reward):
        return f"the reward model {reward.name!r} cannot score partial answers (it has no score_partial)"
    if not getattr(backend, "supports_early_rejection", False):
        return "only the transformers backend can pause its candidates to score them, and this server's backend cannot"
    return None


def rejection_summary(generation: Generation) -> tuple[int, float]:
    """Candidates early rejection stopped, and the tokens they would have drawn (an estimate, docs/math.md §9)."""
    cands = generation.candidates
    stopped = [c.rejected_at or 0 for c in cands]
    return sum(s > 0 for s in stopped), estimated_tokens_saved([c.num_tokens for c in cands], stopped)


@dataclass
class Selection:
    """One prompt's Best-of-N: every candidate in draw order, its reward, the chosen indices, and the
    rule that chose them with each candidate's score (``rule`` None: plain samples, nothing chosen).
    With early rejection (``plan``), rejected candidates have neither reward nor score."""

    generation: Generation
    rewards: list[float | None] | None
    chosen: list[int]
    rule: SelectionRule | None = None
    scores: list[float | None] | None = None
    plan: EarlyRejection | None = None
    rejection: tuple[int, float] | None = None  # with a plan: ``rejection_summary`` of the generation

    def info(self, best_of: int, reward_name: str | None) -> P.BestOfNInfo:
        return P.BestOfNInfo(
            best_of=best_of,
            reward_model=reward_name,
            selection=None if self.rule is None else self.rule.name,
            selection_params={} if self.rule is None else describe(self.rule),
            chosen=self.chosen,
            candidates=[
                P.CandidateInfo(
                    index=i,
                    reward=None if self.rewards is None else self.rewards[i],
                    num_tokens=c.num_tokens,
                    finish_reason=c.finish_reason,
                    logprob=c.logprob,
                    text=c.text,
                    score=None if self.scores is None else self.scores[i],
                    partial_scores=None if self.plan is None else c.partial_scores,
                    rejected_at=c.rejected_at,
                )
                for i, c in enumerate(self.generation.candidates)
            ],
            early_rejection=None if self.plan is None else self.plan.label,
        )


class BestOfNService:
    def __init__(self, backend: Backend, reward: RewardModel | None, model_name: str,
                 limits: Limits = Limits(), metrics: Metrics | None = None, selection: SelectionRule = Argmax(),
                 early_rejection: EarlyRejection | None = None):
        if early_rejection is not None and (why := early_rejection_unavailable(backend, reward)):
            raise ValueError(f"early rejection cannot run: {why}")
        self.backend = backend
        self.reward = reward
        self.selection = selection  # the rule of requests that name none
        self.early_rejection = early_rejection  # the plan of requests that do not turn it off
        self.model_name = model_name
        self.limits = limits
        self.metrics = metrics or Metrics()
        cancelled_work = getattr(backend, "cancelled_work", None)  # only backends that can count it
        if cancelled_work is not None:
            self.metrics.count_cancelled_work(cancelled_work)
        self._in_flight = 0
        # One thread scores: reward models are not re-entrant and the CPU has few cores.
        # It runs with one torch thread: a second OpenMP team beside the generation thread's slows it 2x
        # (bonbench.hardware.one_torch_thread).
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonbench-reward",
                                               initializer=one_torch_thread)
        # Tokenising a long prompt takes CPU seconds: it runs here, off the event loop, one prompt at a time.
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonbench-tokenize")

    # -- validation: every check runs before any model work ------------------------------------

    def _rule(self, req: P.ChatCompletionRequest | P.CompletionRequest) -> SelectionRule:
        """The request's selection rule: the server's, unless it names another or sets parameters."""
        if req.selection is None and req.selection_params is None:
            rule = self.selection
        else:
            name = req.selection or self.selection.name
            params = describe(self.selection) if name == self.selection.name else {}
            try:
                rule = make_rule(name, {**params, **(req.selection_params or {})})
            except SelectionError as exc:
                raise InvalidRequest(str(exc), param="selection" if req.selection else "selection_params") from exc
        if self.reward is None and rule.needs_reward and req.selection is not None:
            raise InvalidRequest(f"selection '{rule.name}' needs a reward model; this server was started with "
                                 "--reward-model none (reward-free rules: majority, self-certainty)", param="selection")
        if getattr(rule, "penalty", None) == "logprob" and (req.temperature != 1 or req.top_p != 1):
            raise InvalidRequest("penalty 'logprob' reads the reference's log-probability, which the server knows "
                                 "only for candidates sampled at temperature 1 and top_p 1", param="selection_params")
        return rule

    def _params(self, req: P.ChatCompletionRequest | P.CompletionRequest, rule: SelectionRule) -> SamplingParams:
        if req.model != self.model_name:
            raise ModelNotFound(f"The model '{req.model}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")
        lim = self.limits
        plain = self.reward is None and rule.needs_reward  # nothing to rank by: plain samples
        if req.best_of is None:
            best_of = req.n if plain else max(lim.default_best_of, req.n)
        else:
            best_of = req.best_of
        if best_of < req.n:
            raise InvalidRequest(f"best_of ({best_of}) must be at least n ({req.n})", param="best_of")
        if best_of > lim.max_best_of:
            raise InvalidRequest(f"best_of is {best_of}; this server allows at most {lim.max_best_of}",
                                 param="best_of" if req.best_of else "n")
        if plain and best_of > req.n:
            raise InvalidRequest(f"best_of > n with selection '{rule.name}' needs a reward model; this server was "
                                 "started with --reward-model none (reward-free rules: majority, self-certainty)",
                                 param="best_of")
        max_tokens = req.token_budget or lim.default_max_tokens
        if max_tokens > lim.max_tokens:
            raise InvalidRequest(f"max_tokens is {max_tokens}; this server allows at most {lim.max_tokens}",
                                 param="max_tokens")
        # Chat asks with a bool; completions with an int, where logprobs=0 still wants each token's.
        logprobs = req.logprobs if isinstance(req, P.ChatCompletionRequest) else req.logprobs is not None
        plan = self._early_rejection(req, rule)
        try:  # every field but early rejection's is checked by now
            return SamplingParams(n=best_of, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  stop=req.stop_list, seed=req.seed, logprobs=logprobs, early_rejection=plan,
                                  keep_at_least=req.n)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="early_rejection" if plan else None) from exc

    def _early_rejection(self, req: P.ChatCompletionRequest | P.CompletionRequest,
                         rule: SelectionRule) -> EarlyRejection | None:
        """The request's plan: its own, none (``false``), else the server's wherever that can run
        (candidates sampled at a temperature above 0 and ranked by the reward)."""
        asked = req.early_rejection
        if asked is False:
            return None
        if asked is None:
            default = self.early_rejection
            return default if default is not None and rule.needs_reward and req.temperature > 0 else None
        plan = asked.plan()  # its values were checked with the request
        if not rule.needs_reward:
            raise InvalidRequest(f"selection '{rule.name}' ranks no reward, and early rejection stops candidates by "
                                 "their reward on partial answers", param="early_rejection")
        if why := early_rejection_unavailable(self.backend, self.reward):
            raise InvalidRequest(f"early rejection cannot run on this server: {why}", param="early_rejection")
        return plan

    def _check_characters(self, prompt: Prompt) -> None:
        """Refuse, without tokenising, a prompt too long for any tokenizer to fit in the token limit."""
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        context = self.backend.max_context
        limit = self.limits.max_prompt_tokens if context is None else min(self.limits.max_prompt_tokens, context)
        if chars > limit * MAX_CHARS_PER_TOKEN:
            raise InvalidRequest(f"the prompt has {chars} characters: more than {limit} tokens can hold "
                                 f"(at most {limit * MAX_CHARS_PER_TOKEN})",
                                 param="prompt" if isinstance(prompt, str) else "messages",
                                 code="context_length_exceeded")

    def _check_prompt(self, prompt: Prompt, params: SamplingParams) -> None:
        try:
            tokens = self.backend.count_prompt_tokens(prompt)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        if tokens is None:
            return
        param = "prompt" if isinstance(prompt, str) else "messages"
        if tokens == 0:  # the model would have no position to continue from
            raise InvalidRequest("the prompt is empty: it has no tokens to continue", param=param)
        if tokens > self.limits.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {tokens} tokens; this server allows at most "
                                 f"{self.limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
        try:
            check_context(tokens, params.max_tokens, self.backend.max_context)
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc), param=param, code="context_length_exceeded") from exc

    # -- the Best-of-N step ------------------------------------------------------------------

    async def best_of_n(self, prompt: Prompt, params: SamplingParams, n: int, rule: SelectionRule,
                        index: int = 0) -> Selection:
        """Draw ``params.n`` candidates for the ``index``-th prompt of a request and keep ``n`` by ``rule``.

        With early rejection only the candidates that ran to their end are scored and ranked
        (docs/math.md §9); at least ``n`` of them do (``params.keep_at_least``)."""
        plan = params.early_rejection
        generation = await self._generate(prompt, params, self._partial_scorer(prompt) if plan else None)
        rejection = None if plan is None else rejection_summary(generation)
        if rejection is not None:
            self.metrics.observe_rejection(*rejection)
        if self.reward is None and rule.needs_reward:  # best_of == n, checked: plain samples
            return Selection(generation, None, list(range(n)))
        ended = [i for i, c in enumerate(generation.candidates) if c.rejected_at is None]
        finished = Generation(generation.prompt_tokens, [generation.candidates[i] for i in ended])
        rewards = await self._score(prompt, finished) if rule.needs_reward else None
        seed = None if params.seed is None else derive_seed(params.seed, SELECTION_STREAM, index)
        try:
            choice = rule.choose(_candidates(finished, rewards), n, np.random.default_rng(seed))
        except SelectionError as exc:
            raise InvalidRequest(str(exc), param="selection") from exc
        size = len(generation.candidates)
        return Selection(generation, _spread(rewards, ended, size), [ended[int(i)] for i in choice.chosen], rule,
                         _spread([float(s) for s in choice.scores], ended, size), plan, rejection)

    def _partial_scorer(self, prompt: Prompt) -> PartialScorer:
        """Scores partial answers to ``prompt`` for the backend's early rejection. The backend calls it
        from its own thread and waits; it runs on the one reward thread (reward models are not re-entrant)."""

        def score(texts: list[str]) -> list[float]:
            started = time.perf_counter()
            future = self._reward_pool.submit(checked_scores, self.reward, [prompt] * len(texts), texts, True)
            scores = future.result()
            self.metrics.reward_seconds.inc(time.perf_counter() - started)
            return scores

        return score

    async def _generate(self, prompt: Prompt, params: SamplingParams,
                        score_partial: PartialScorer | None = None) -> Generation:
        started = time.perf_counter()
        try:
            generation = await self.backend.generate(prompt, params, score_partial)
        except RewardError as exc:  # early rejection's scorer failed
            raise RewardFailed(str(exc)) from exc
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc), code="context_length_exceeded") from exc
        except UpstreamError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                raise InvalidRequest(f"the upstream server refused the request: {exc}") from exc
            raise UpstreamFailed(f"the upstream server failed: {exc}") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise GenerationFailed(f"generation failed: {exc}") from exc
        self.metrics.observe_generation(generation, time.perf_counter() - started)
        return generation

    async def _score(self, prompt: Prompt, generation: Generation) -> list[float]:
        started = time.perf_counter()
        texts = [c.text for c in generation.candidates]
        loop = asyncio.get_running_loop()
        try:
            rewards = await loop.run_in_executor(
                self._reward_pool, checked_scores, self.reward, [prompt] * len(texts), texts)
        except RewardError as exc:
            raise RewardFailed(str(exc)) from exc
        self.metrics.reward_seconds.inc(time.perf_counter() - started)
        return rewards

    async def _admit(self, prompts: list[Prompt], params: SamplingParams, n: int,
                     rule: SelectionRule) -> list[Selection]:
        for prompt in prompts:
            self._check_characters(prompt)
        if self._in_flight >= self.limits.max_in_flight:
            self.metrics.rejected.inc()
            raise Overloaded(f"the server is busy with {self._in_flight} requests; retry later")
        # Admitted before tokenising, so that a flood of long prompts meets the 503, not the tokenizer.
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            loop = asyncio.get_running_loop()
            for prompt in prompts:  # one at a time, so other requests' prompts take turns with these
                await loop.run_in_executor(self._tokenizer_pool, self._check_prompt, prompt, params)
            return list(await asyncio.gather(*(self.best_of_n(p, params, n, rule, i) for i, p in enumerate(prompts))))
        except asyncio.CancelledError:
            self.metrics.cancelled.inc()
            raise
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    # -- endpoints --------------------------------------------------------------------------

    async def chat(self, req: P.ChatCompletionRequest) -> P.ChatCompletionResponse:
        rule = self._rule(req)
        params = self._params(req, rule)
        prompt = [{"role": m.role, "content": m.content} for m in req.messages]
        (sel,) = await self._admit([prompt], params, req.n, rule)
        cands = sel.generation.candidates
        choices = [
            P.ChatChoice(
                index=k,
                message=P.AssistantMessage(content=cands[i].text),
                logprobs=_chat_logprobs(cands[i]) if req.logprobs else None,
                finish_reason=cands[i].finish_reason,
            )
            for k, i in enumerate(sel.chosen)
        ]
        return P.ChatCompletionResponse(
            model=self.model_name, choices=choices, usage=_usage([sel]),
            bon=sel.info(params.n, self._reward_name) if req.return_candidates else None,
        )

    async def complete(self, req: P.CompletionRequest) -> P.CompletionResponse:
        rule = self._rule(req)
        params = self._params(req, rule)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        selections = await self._admit(prompts, params, req.n, rule)
        choices = []
        for p, (prompt, sel) in enumerate(zip(prompts, selections)):
            for k, i in enumerate(sel.chosen):
                c = sel.generation.candidates[i]
                text = prompt + c.text if req.echo else c.text
                choices.append(P.CompletionChoice(
                    index=p * req.n + k, text=text, finish_reason=c.finish_reason,
                    logprobs=_completion_logprobs(c, len(prompt) if req.echo else 0)
                    if req.logprobs is not None else None,
                ))
        return P.CompletionResponse(
            model=self.model_name, choices=choices, usage=_usage(selections),
            bon=[s.info(params.n, self._reward_name) for s in selections] if req.return_candidates else None,
        )

    async def stream_chat(self, req: P.ChatCompletionRequest) -> AsyncIterator[dict]:
        """Chunks of a streamed chat reply: selection first, then the chosen answers' text."""
        response = await self.chat(req)
        base = {"id": response.id, "object": "chat.completion.chunk", "created": response.created,
                "model": response.model}
        for choice in response.choices:
            yield {**base, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
            for piece in _pieces(choice.message.content):
                yield {**base, "choices": [{"index": choice.index, "delta": {"content": piece},
                                            "finish_reason": None}]}
            yield {**base, "choices": [{"index": choice.index, "delta": {},
                                        "finish_reason": choice.finish_reason}]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "choices": [], "usage": response.usage.model_dump(exclude_none=True)}
        if response.bon is not None:
            yield {**base, "choices": [], "bon": response.bon.model_dump()}

    async def stream_completion(self, req: P.CompletionRequest) -> AsyncIterator[dict]:
        response = await self.complete(req)
        base = {"id": response.id, "object": "text_completion", "created": response.created,
                "model": response.model}
        for choice in response.choices:
            for piece in _pieces(choice.text):
                yield {**base, "choices": [{"index": choice.index, "text": piece, "logprobs": None,
                                            "finish_reason": None}]}
            yield {**base, "choices": [{"index": choice.index, "text": "", "logprobs": None,
                                        "finish_reason": choice.finish_reason}]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "choices": [], "usage": response.usage.model_dump(exclude_none=True)}

    @property
    def _reward_name(self) -> str | None:
        return None if self.reward is None else self.reward.name

    async def close(self) -> None:
        self._reward_pool.shutdown(wait=False, cancel_futures=True)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        await self.backend.close()


def _candidates(generation: Generation, rewards: list[float] | None) -> Candidates:
    """What a selection rule reads about a generation's candidates."""
    cands = generation.candidates

    def known(values: list[float | None]) -> np.ndarray | None:
        return None if any(v is None for v in values) else np.array(values, dtype=np.float64)

    return Candidates(texts=[c.text for c in cands], num_tokens=np.array([c.num_tokens for c in cands]),
                      rewards=None if rewards is None else np.asarray(rewards, dtype=np.float64),
                      logprobs=known([c.logprob for c in cands]),
                      self_certainty=known([c.self_certainty for c in cands]))


def _spread(values: list[float] | None, at: list[int], size: int) -> list[float | None] | None:
    """``values`` of the candidates ``at`` put back among ``size`` candidates, None for the others."""
    if values is None:
        return None
    out: list[float | None] = [None] * size
    for i, v in zip(at, values):
        out[i] = v
    return out


def _usage(selections: list[Selection]) -> P.Usage:
    prompt = sum(s.generation.prompt_tokens for s in selections)
    completion = sum(s.generation.completion_tokens for s in selections)
    usage = P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    ran = [s.rejection for s in selections if s.rejection is not None]
    if ran:
        usage.rejected_candidates = sum(k for k, _ in ran)
        usage.tokens_saved_estimate = sum(t for _, t in ran)
    return usage


def _pieces(text: str, size: int = 16) -> list[str]:
    """The chosen text in small pieces, cut at word boundaries where possible."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        space = text.rfind(" ", start + 1, end + 1) if end < len(text) else -1
        end = space if space > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _chat_logprobs(c) -> P.ChatChoiceLogprobs:
    return P.ChatChoiceLogprobs(content=[
        P.ChatLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8")))
        for t, lp in zip(c.tokens, c.token_logprobs)
    ])


def _completion_logprobs(c, start: int = 0) -> P.CompletionLogprobs:
    """The answer's tokens; ``start`` is where the answer begins in the returned text (echo)."""
    offsets, pos = [], start
    for t in c.tokens:
        offsets.append(pos)
        pos += len(t)
    return P.CompletionLogprobs(tokens=list(c.tokens), token_logprobs=list(c.token_logprobs),
                                top_logprobs=None, text_offset=offsets)
