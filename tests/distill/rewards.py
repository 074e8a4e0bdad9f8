"""Continuous ``module:function`` rewards for trainer tests: a tiny random model's answers are
noise, which the default reward clips to one value, and tied rewards give zero advantages."""

import hashlib
import json
import os
from pathlib import Path

SCORED_DIR = "BONBENCH_TEST_SCORED_DIR"  # where distinct_characters_by_rank notes what it scored


def distinct_characters(prompts, responses):
    return [len(set(r)) + 0.01 * len(r) for r in responses]


def distinct_characters_by_rank(prompts, responses):
    """``distinct_characters``, noting a digest of each prompt it scores in
    ``$BONBENCH_TEST_SCORED_DIR/rank-$RANK``: which process of a distributed run scored which prompts."""
    with open(Path(os.environ[SCORED_DIR]) / f"rank-{os.environ.get('RANK', '0')}", "a") as f:
        f.writelines(hashlib.sha1(json.dumps(p).encode()).hexdigest() + "\n" for p in prompts)
    return distinct_characters(prompts, responses)
