"""``derive_seed``: one rule for the seed of every sub-stream (step, role, prompt, candidate)."""

from __future__ import annotations

import pytest

from bonbench.seeds import derive_seed


def test_derived_seeds_are_reproducible_in_range_and_distinct_across_paths_and_neighbouring_seeds():
    paths = [(seed, *keys) for seed in (-1, 0, 1, 2, 2**70)
             for keys in [(), (0,), (1,), (5,), (0, 0), (0, 1), (1, 0), (0, 5), (0, 0, 5)]]
    seeds = [derive_seed(*path) for path in paths]
    assert len(set(seeds)) == len(paths)  # seed * C + key would give (0, 0, 5) == (0, 5) == (0, 0)+5 ...
    assert all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(*path) for path in paths]
    # vLLM seeds the n answers of a request seed + j: neighbouring prompts' windows must not overlap.
    starts = sorted(derive_seed(3, i) for i in range(2000))
    assert min(b - a for a, b in zip(starts, starts[1:])) > 1024
    with pytest.raises(ValueError, match=">= 0"):
        derive_seed(0, -1)
