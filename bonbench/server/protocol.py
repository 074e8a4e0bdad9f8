"""Request and response models of the OpenAI-compatible API.

OpenAI's fields come first, in OpenAI's order (a request's as the openai client's ``create()``
lists them, a response's as OpenAI's server writes them); the Best-of-N extensions sit in one
marked block at the end of each model. Unknown fields are ignored and logged as a warning (as
vLLM does; OpenAI's own API refuses them), so clients that send newer fields keep working.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from bonbench.rejection import EarlyRejection

log = logging.getLogger(__name__)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    """A part of a request. Fields it does not know are dropped, and logged as ignored."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [str(k) for k in data if k not in cls.model_fields]
            if unknown:
                log.warning("%s: ignored unknown fields %s", cls.__name__, ", ".join(sorted(unknown))[:300])
        return data

    @property
    def stop_list(self) -> tuple[str, ...]:
        stop = getattr(self, "stop", None)
        if stop is None:
            return ()
        return (stop,) if isinstance(stop, str) else tuple(stop)


class StreamOptions(_Request):
    include_usage: bool = False


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        if isinstance(content, str):
            return content
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


# Constraints shared by both endpoints, stated once.
N = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Stop = Optional[Union[str, list[str]]]
TokenBudget = Annotated[Optional[int], Field(ge=1)]
BestOf = Annotated[Optional[int], Field(ge=1, description="candidates N to draw; the reply keeps the top n")]
ReturnCandidates = Annotated[bool, Field(description="add every candidate's reward and the chosen indices")]
Selection = Annotated[Optional[str], Field(description="how to choose among the candidates: argmax, soft, regularized, "
                                                       "self-certainty or majority (default: the server's --selection)")]
SelectionParams = Annotated[Optional[dict[str, Any]], Field(description="the rule's parameters, e.g. "
                                                                       "{\"temperature\": 0.5} for soft")]


class EarlyRejectionPlan(_Request):
    """Where to score the unfinished candidates and which fraction to keep (docs/math.md §9)."""

    checkpoints: list[int] = Field(description="token counts at which the running candidates are scored on "
                                               "their partial text; increasing, each >= 1")
    keep: float = Field(description="fraction of the running candidates kept at each checkpoint, in (0, 1]")

    @model_validator(mode="after")
    def _valid(self) -> "EarlyRejectionPlan":
        self.plan()  # EarlyRejection's own checks, with its messages
        return self

    def plan(self) -> EarlyRejection:
        return EarlyRejection(tuple(self.checkpoints), self.keep)


def _plan_or_off(value: Any) -> Any:
    """Whatever is wrong with ``early_rejection``, one error at ``early_rejection`` itself (not one per
    branch of the union)."""
    if value is None or value is False or isinstance(value, EarlyRejectionPlan):
        return value
    if not isinstance(value, dict):
        raise ValueError('early_rejection is {"checkpoints": [...], "keep": ...}, or false to turn it off; '
                         f"got {json.dumps(value)[:60]}")
    try:
        return EarlyRejectionPlan.model_validate(value)
    except ValidationError as exc:
        problems = [(".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        raise ValueError("; ".join(f"{where}: {what}" if where else what for where, what in problems)) from None


EarlyRejectionField = Annotated[
    Optional[Union[Literal[False], EarlyRejectionPlan]],
    BeforeValidator(_plan_or_off),
    Field(description="early rejection: stop the candidates whose partial answers score lowest at the "
                      "checkpoints, and choose among those that ran to their end; false turns the server's "
                      "--early-rejection off, null or absent keeps it"),
]


class ChatCompletionRequest(_Request):
    # OpenAI's fields, in the order of the openai client's create(): required ones, then A to Z.
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool = False
    max_completion_tokens: TokenBudget = None
    max_tokens: TokenBudget = None
    n: N = 1
    seed: Optional[int] = None
    stop: Stop = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Temperature = 1.0
    top_logprobs: Optional[int] = Field(None, ge=0, le=0, description="alternatives are not reported: 0 only")
    top_p: TopP = 1.0
    user: Optional[str] = None
    # --- Best-of-N extensions (top level or in the openai client's extra_body) ---
    best_of: BestOf = None
    return_candidates: ReturnCandidates = False
    selection: Selection = None
    selection_params: SelectionParams = None
    early_rejection: EarlyRejectionField = None

    @property
    def token_budget(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    # OpenAI's fields, in the order of the openai client's create(): required ones, then A to Z.
    model: str
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=0, description="the sampled tokens' log-probabilities; "
                                    "alternatives are not reported, so 0 only")
    max_tokens: TokenBudget = None
    n: N = 1
    seed: Optional[int] = None
    stop: Stop = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: Optional[str] = None
    # --- Best-of-N extensions (top level or in the openai client's extra_body) ---
    # OpenAI's legacy completions ranks its own best_of candidates by log-probability; here the
    # selection rule does (by default the reward model's argmax).
    best_of: BestOf = None
    return_candidates: ReturnCandidates = False
    selection: Selection = None
    selection_params: SelectionParams = None
    early_rejection: EarlyRejectionField = None

    @property
    def token_budget(self) -> Optional[int]:
        return self.max_tokens


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """Every error's body, as OpenAI's API answers it."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # every candidate's tokens: the cost of Best-of-N
    total_tokens: int
    # --- Best-of-N extension: present only when early rejection ran ---
    rejected_candidates: Optional[int] = Field(None, description="candidates stopped early by early rejection")
    tokens_saved_estimate: Optional[float] = Field(
        None, description="tokens the rejected candidates would have drawn, estimated from the mean length of "
                          "those that ran to their end (docs/math.md §9)")


class CandidateInfo(BaseModel):
    index: int
    reward: Optional[float]
    num_tokens: int
    finish_reason: str
    logprob: Optional[float]
    text: str
    score: Optional[float] = None  # what the selection rule ranked it by (None: no selection ran)
    # early rejection: its score on its partial text at each checkpoint it reached running (None: no early
    # rejection ran), and the checkpoint at which it was stopped (None: it ran to its end; then its
    # finish_reason is "rejected" and it has no reward)
    partial_scores: Optional[list[float]] = None
    rejected_at: Optional[int] = None


class BestOfNInfo(BaseModel):
    """The ``bon`` extension: what selection saw, in draw order."""

    best_of: int
    reward_model: Optional[str]
    selection: Optional[str] = None  # the rule that chose (None: no selection ran, the first n were kept)
    selection_params: dict[str, Any] = Field(default_factory=dict)
    chosen: list[int]  # candidate indices of the returned choices, best first
    candidates: list[CandidateInfo]
    early_rejection: Optional[str] = None  # the plan that ran, CHECKPOINTS:KEEP (None: none ran)


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # --- Best-of-N extension ---
    bon: Optional[BestOfNInfo] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    # --- Best-of-N extension ---
    bon: Optional[list[BestOfNInfo]] = None  # one per prompt


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "bonbench"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
