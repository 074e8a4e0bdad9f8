"""A user's own reward as a Python callable named ``module:function``.

The function takes ``(prompts, responses)`` (prompts are strings or chat message lists) and
returns one number per response, e.g.::

    def brevity(prompts, responses):
        return [-len(r.split()) for r in responses]

and is served with ``--reward-model mypackage.rewards:brevity``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

from bonbench.backends.base import Prompt


class FunctionReward:
    def __init__(self, spec: str):
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r} for reward {spec!r}: {exc}") from exc
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ValueError(f"{module_name!r} has no attribute {attr!r} (reward {spec!r})")
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is not callable")
        self.name = spec
        self._fn: Callable[[Sequence[Prompt], Sequence[str]], Sequence[float]] = fn

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return list(self._fn(prompts, responses))
