"""The reward seam: a reward model scores (prompt, answer) pairs, higher is better."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from bonbench.backends.base import Prompt


class RewardError(RuntimeError):
    """The reward model failed to score a batch (it raised, returned the wrong count, or NaN)."""


@runtime_checkable
class RewardModel(Protocol):
    """Scores answers. Deterministic for a given input; batched over the whole call.

    Implementations: ``embedding`` (the embedded default), ``sequence_classifier`` (any Hugging
    Face reward model), ``judge`` (an LLM over the OpenAI API) and ``function`` (a user's
    ``module:function``).
    """

    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One float per (prompt, response) pair; ``len(prompts) == len(responses)``.

        Blocking: the server runs it in a worker thread.
        """
        ...


# Optional: a reward that can judge unfinished answers (cut after a fixed number of tokens, usually
# mid-sentence) also has ``score_partial(prompts, responses) -> list[float]``; early rejection
# (bonbench.rejection) needs it. A reward without it is never asked to score partial text.
def scores_partial(reward: RewardModel | None) -> bool:
    """Whether ``reward`` can score partial answers (has ``score_partial``)."""
    return callable(getattr(reward, "score_partial", None))


def checked_scores(reward: RewardModel, prompts: Sequence[Prompt], responses: Sequence[str],
                   partial: bool = False) -> list[float]:
    """Call ``reward.score`` (``reward.score_partial`` with ``partial``) and turn any failure or
    malformed result into a ``RewardError``."""
    try:
        score = reward.score_partial if partial else reward.score
        scores = [float(s) for s in score(prompts, responses)]
    except RewardError:
        raise
    except Exception as exc:  # a user's reward may raise anything; the request fails loudly
        raise RewardError(f"reward model {reward.name!r} failed: {type(exc).__name__}: {exc}") from exc
    if len(scores) != len(responses):
        raise RewardError(
            f"reward model {reward.name!r} returned {len(scores)} scores for {len(responses)} responses"
        )
    if any(s != s for s in scores):
        raise RewardError(f"reward model {reward.name!r} returned NaN")
    return scores
