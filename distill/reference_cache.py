"""Reference samples drawn once and reused by every run of a sweep (``--reference-cache DIR``).

The reference policy never trains, and a run's prompts and seeds are functions of (seed, step), so
two BOND runs that differ only in beta or N draw the very same reference samples at every step. A
sweep that points its runs at one cache folder draws them once: the first run stores each reference
draw (its prompts, n and seed) and the later ones read it back instead of sampling. Only draws of
the ``ref`` role are cached; the policy and the anchor move, so theirs never are.

A draw is known by a SHA-256 of everything its tokens depend on: the model (as named, and its
resolved folder), the dtype and precision the trunk runs in, the end-of-sequence ids, the prompts'
token ids, n, the seed, the roles it is scored under and ``max_tokens``. Change any of them and the
draw misses. What the key cannot see: a model folder rewritten in place, or another torch version
whose kernels round differently. Use a new folder then.

Entries are JSON files written atomically (``<key>.json``), so concurrent runs may share a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from bonbench.backends.base import Candidate
from distill.policy import Draw


class ReferenceCache:
    def __init__(self, folder: str | Path, model_key: dict):
        self.folder = Path(folder)
        self.model_key = model_key
        self.hits = self.misses = 0

    def key(self, prompts: Sequence[list[int]], draw: Draw, max_tokens: int) -> str:
        blob = json.dumps([self.model_key, [list(p) for p in prompts], draw.n, draw.seed,
                           sorted(draw.score_under), max_tokens], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, prompts: Sequence[list[int]], draw: Draw, max_tokens: int) -> list[list[Candidate]] | None:
        """The stored candidates of this draw per prompt, or None if it was never stored."""
        path = self.folder / f"{self.key(prompts, draw, max_tokens)}.json"
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        rows = json.loads(path.read_text())
        return [[Candidate(**c) for c in row] for row in rows]

    def put(self, prompts: Sequence[list[int]], draw: Draw, max_tokens: int, rows: list[list[Candidate]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.key(prompts, draw, max_tokens)}.json"
        with tempfile.NamedTemporaryFile("w", dir=self.folder, suffix=".tmp", delete=False) as f:
            json.dump([[asdict(c) for c in row] for row in rows], f)
        os.replace(f.name, path)
