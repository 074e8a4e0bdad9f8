"""A user's own reward as a Python callable named ``module:function``.

The function takes ``(prompts, responses)`` (prompts are strings or chat message lists) and
returns one number per response, e.g.::

    def brevity(prompts, responses):
        return [-len(r.split()) for r in responses]

and is served with ``--reward-model mypackage.rewards:brevity``.

Early rejection scores unfinished answers too: give the callable a ``score_partial`` attribute with
the same signature (``brevity.score_partial = partial_brevity``, or a method of a callable object)
and the reward has ``score_partial`` (``bonbench.rewards.base.scores_partial``); without one the
server refuses early rejection with this reward.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

from bonbench.backends.base import Prompt
from bonbench.errors import UserError


class FunctionReward:
    def __init__(self, spec: str):
        module_name, _, attr = spec.partition(":")
        fn = _import_module(module_name, spec)
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise UserError(f"reward {spec!r}: the module {module_name!r} has no attribute {attr!r}.")
        if not callable(fn):
            raise UserError(f"reward {spec!r}: {attr!r} is not callable (it is a {type(fn).__name__}).")
        partial = getattr(fn, "score_partial", None)
        if partial is not None and not callable(partial):
            raise UserError(f"reward {spec!r}: its score_partial is not callable (it is a {type(partial).__name__}).")
        self.name = spec
        self._fn: Callable[[Sequence[Prompt], Sequence[str]], Sequence[float]] = fn
        if partial is not None:
            self._partial = partial
            self.score_partial = self._score_partial  # only then: scores_partial() reads its presence

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return list(self._fn(prompts, responses))

    def _score_partial(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return list(self._partial(prompts, responses))


def _import_module(module_name: str, spec: str):
    """The user's module; failing to import it is a ``UserError`` that keeps the cause for debugging."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):  # it, or its package
            raise UserError(f"reward {spec!r}: there is no module {module_name!r} to import; run from the folder "
                            "that holds it, add that folder to PYTHONPATH, or pip install it.") from exc
        raise UserError(f"reward {spec!r}: importing {module_name!r} failed: {exc}.") from exc
    except Exception as exc:  # the user's module raised while importing: report it, keep the traceback
        raise UserError(f"reward {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc} "
                        "(--log-level debug shows the traceback).") from exc
