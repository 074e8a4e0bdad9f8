"""A user's own reward as a Python callable named ``module:function``.

The function takes ``(prompts, responses)`` (prompts are strings or chat message lists) and
returns one number per response, e.g.::

    def brevity(prompts, responses):
        return [-len(r.split()) for r in responses]

and is served with ``--reward-model mypackage.rewards:brevity``. A function that can also judge
unfinished answers (for early rejection, ``bonbench.rejection``) carries that scorer, with the same
signature, as its ``score_partial`` attribute::

    brevity.score_partial = lambda prompts, responses: [-len(r.split()) for r in responses]
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
        self.name = spec
        self._fn: Callable[[Sequence[Prompt], Sequence[str]], Sequence[float]] = fn
        partial = getattr(fn, "score_partial", None)
        if callable(partial):  # only then does the reward have score_partial (rewards.base.scores_partial)
            self.score_partial = lambda prompts, responses: list(partial(prompts, responses))

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return list(self._fn(prompts, responses))


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
