"""The generation seam: what every backend takes and returns.

A backend turns one prompt into ``n`` sampled candidates. It never scores or ranks them;
that is the reward model's and the service's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TypedDict, Union, runtime_checkable

if TYPE_CHECKING:
    from bonbench.rejection import EarlyRejection


class Message(TypedDict):
    role: str
    content: str


# A chat prompt is a list of messages (the chat template is applied by the backend);
# a completion prompt is raw text, used as it is.
Prompt = Union[str, Sequence[Message]]


def is_chat(prompt: Prompt) -> bool:
    return not isinstance(prompt, str)


def prompt_text(prompt: Prompt) -> str:
    """The text a reward model judges an answer against: the raw prompt, or the last user turn."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message["role"] == "user":
            return message["content"]
    return prompt[-1]["content"] if prompt else ""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding.

    ``early_rejection``: score the unfinished candidates at its checkpoints and stop all but the best
    (``bonbench.rejection``; only a backend with ``supports_early_rejection`` runs it, with a
    ``score_partial`` given to ``generate``); at least ``keep_at_least`` go on past every checkpoint.
    """

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # keep each token's log-probability (sums are always kept)
    early_rejection: EarlyRejection | None = None
    keep_at_least: int = 1

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.keep_at_least <= self.n:
            raise ValueError(f"keep_at_least must be in [1, n={self.n}], got {self.keep_at_least}")
        if self.early_rejection is not None and self.temperature == 0:
            raise ValueError("early rejection ranks different candidates; at temperature 0 every candidate is "
                             "the same greedy answer")


@dataclass
class Candidate:
    """One sampled answer.

    ``logprob`` is the sum over its tokens of the log-probability under the distribution the
    token was actually drawn from (after temperature and top-p); ``None`` where the backend does
    not report it. With temperature 1 and top_p 1 that is log pi(y | x) of the policy.
    """

    text: str
    num_tokens: int
    # "stop" (EOS or a stop string), "length" (max_tokens), "cancelled", or "rejected" (early rejection)
    finish_reason: str
    logprob: float | None = None
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # filled when SamplingParams.logprobs
    token_logprobs: list[float] = field(default_factory=list)  # filled when SamplingParams.logprobs
    # log-probability of token_ids (temperature 1) under other adapters of the same model, by name:
    # filled by the in-process sampler for a SampleRequest with ``score_with``
    logprob_under: dict[str, float] = field(default_factory=dict)
    # mean over its tokens of KL(uniform || p_t) = -log V - mean_v log p_t(v), p_t the model's next-token
    # distribution at temperature 1: the self-certainty of bonbench.select; None where the backend
    # does not see whole distributions (vllm, an upstream)
    self_certainty: float | None = None
    # early rejection: its score on its partial text at each checkpoint it reached running, and the
    # checkpoint at which it was stopped (None: it ran to its end)
    partial_scores: list[float] = field(default_factory=list)
    rejected_at: int | None = None


# Scores the partial texts of one request's running candidates (the caller binds the prompt).
PartialScorer = Callable[[list[str]], list[float]]


@dataclass
class Generation:
    """The candidates of one prompt, in the order they were drawn."""

    prompt_tokens: int
    candidates: list[Candidate]

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.candidates)


@dataclass
class CancelledWork:
    """Work a backend threw away for requests cancelled before their answer (the client left).

    A backend that can tell exposes one as ``cancelled_work`` and adds to it as it stops the
    candidates; the server reports it in /metrics. Only the backend's own thread writes it.
    """

    candidates: int = 0  # candidates stopped before their end (or never started)
    tokens: int = 0  # tokens those candidates had drawn when they stopped

    def add(self, candidates: Sequence[Candidate] = (), never_started: int = 0) -> None:
        """Count the candidates a cancellation cut (``finish_reason == "cancelled"``) and those
        it stopped before they drew a token."""
        cut = [c for c in candidates if c.finish_reason == "cancelled"]
        self.candidates += len(cut) + never_started
        self.tokens += sum(c.num_tokens for c in cut)


class PromptTooLong(ValueError):
    """The prompt leaves no room for generation within the model's context."""


def check_context(prompt_tokens: int, max_tokens: int, context: int | None, hint: str = "") -> None:
    """Raise ``PromptTooLong`` unless the prompt and ``max_tokens`` new tokens fit in ``context``.

    ``context`` is the model's (or engine's) length in tokens; ``None`` means unknown: no check.
    ``hint`` (what to do about it) ends the message.
    """
    if context is not None and prompt_tokens + max_tokens > context:
        raise PromptTooLong(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: more than "
                            f"the model's context of {context} tokens" + (f"; {hint}" if hint else ""))


def refuse_early_rejection(params: SamplingParams, backend: str) -> None:
    """Raise a ``ValueError`` if ``params`` ask for early rejection, which ``backend`` cannot run."""
    if params.early_rejection is not None:
        raise ValueError(f"the {backend} backend cannot run early rejection (it does not pause its candidates to "
                         "score them); only the transformers backend can")


class UpstreamError(RuntimeError):
    """An upstream server failed or refused; ``status`` is its HTTP status (None: unreachable)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@runtime_checkable
class Backend(Protocol):
    """Samples candidates from a language model.

    Implementations: ``transformers`` (in-process), ``vllm`` (in-process, GPU) and
    ``openai`` (an upstream OpenAI-compatible server). ``generate`` may be called concurrently
    from many coroutines; a backend batches what it can. One that can count what cancelled
    requests cost also has a ``cancelled_work: CancelledWork`` attribute (optional).

    Early rejection (``params.early_rejection``) is optional too: a backend that runs it has
    ``supports_early_rejection = True`` and calls the ``score_partial`` given to ``generate`` from
    its own thread, blocking, at each checkpoint; the others refuse such params with a ``ValueError``
    (``refuse_early_rejection``).
    """

    model_name: str

    def count_prompt_tokens(self, prompt: Prompt) -> int | None:
        """Tokens the prompt takes after templating, or ``None`` if the backend cannot tell
        (an upstream server). Must be cheap: the server calls it before queueing a request."""
        ...

    @property
    def max_context(self) -> int | None:
        """The model's context length in tokens, or ``None`` if unknown."""
        ...

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       score_partial: PartialScorer | None = None) -> Generation:
        """Draw ``params.n`` candidates for ``prompt``. Raises ``PromptTooLong`` if the prompt does
        not fit, and frees its work if the awaiting task is cancelled. ``score_partial`` scores
        partial texts for ``params.early_rejection`` (required with it, ignored without)."""
        ...

    async def close(self) -> None:
        """Release threads, engines and connections."""
        ...
