"""Seeds of sub-streams: the one rule that turns a seed into the seed of each part of the work.

A run has one seed, a request may carry one; a training step, a role, a prompt and a candidate each
need a random stream of their own, reproducible and unrelated to the others. ``derive_seed(seed,
*keys)`` names the stream by its path of keys (``derive_seed(run_seed, step)``, then
``derive_seed(step_seed, prompt_index)``, ...), hashed with NumPy's ``SeedSequence`` and its spawn
keys, the mechanism NumPy itself uses for independent child streams. Unlike ``seed * C + index``,
paths of different lengths never coincide (``derive_seed(0, 0, 5)`` is not ``derive_seed(0, 5)``),
and neither do neighbouring seeds' streams, so an engine that seeds the ``n`` answers of a request
``seed + j`` (vLLM) draws from streams no other request uses.
"""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """The seed of the sub-stream ``keys`` (e.g. step, prompt index, candidate index) of ``seed``.

    Args:
        seed: any integer, negative or beyond 64 bits included (a client's request seed).
        keys: non-negative integers naming the sub-stream; ``()`` names ``seed``'s own stream.

    Returns:
        An integer in ``[0, 2**63)``, which torch, NumPy and vLLM all accept; a function of ``seed``
        and ``keys`` only, the same on every machine and Python version.
    """
    if any(key < 0 for key in keys):
        raise ValueError(f"seed keys must be >= 0, got {keys}")
    entropy = 2 * seed if seed >= 0 else -2 * seed - 1  # SeedSequence takes non-negative entropy
    state = np.random.SeedSequence(entropy, spawn_key=tuple(int(key) for key in keys))
    return int(state.generate_state(1, np.uint64)[0]) >> 1
