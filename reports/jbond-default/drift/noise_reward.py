"""A reward that carries no information: a fresh uniform draw for every answer, whatever it says.

Under it, Best-of-2 of the anchor picks one of two anchor samples at random, so its law is the
anchor's own, and J-BOND's target is the anchor itself. Any KL to the reference that a J-BOND run
gains under this reward is drift from gradient noise, not progress towards Best-of-N:

    PYTHONPATH=reports/jbond-default/drift python -m distill.jbond --reward-model noise_reward:uniform ...

(the command that was run, and what it measured: this folder's README).
"""

from __future__ import annotations

import random

_draws = random.Random(0)  # a fixed seed: the run's sequence of rewards repeats


def uniform(prompts, responses) -> list[float]:
    return [_draws.random() for _ in responses]
