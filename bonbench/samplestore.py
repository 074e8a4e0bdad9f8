"""A run folder on disk: samples stored per method and prompt, ``run.json``, and the result tables.

    OUT/run.json                                  settings, config, registered policies
    OUT/samples/prompt-<index>.parquet            the reference pool of a prompt (method "")
    OUT/samples/<method>/prompt-<index>.parquet   any other method's samples of it
    OUT/{samples,per_prompt,summary}.{parquet,csv}, OUT/summary.md

Every file is written to a temporary name and renamed, so an interrupted run leaves whole files
only, and a rerun samples just the prompts a method has no file for (``SampleStore.missing``).
Each stored file is checked against the prompt id it should hold when read back: a changed task
under an old folder is an error, not a silent mix. ``bonbench measure`` stores its pool under
method ``""`` and a policy under ``policy-<slug>``; other commands pick their own labels.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from bonbench.errors import UserError
from bonbench.tables import to_markdown, write_tables

SAMPLE_COLUMNS = ["prompt_index", "prompt_id", "role", "policy", "sample_index", "text", "num_tokens",
                  "finish_reason", "logprob", "ref_logprob", "self_certainty", "sample_seconds", "reward",
                  "reward_seconds", "partial_seconds", "created"]
# Columns that samples stored before they were added lack; they read back as NaN.
LATER_COLUMNS = ("self_certainty", "partial_seconds")

# The options a stored reference pool depends on: they must not change between a run and its
# resumption. Policies (and what is computed from the samples, such as the Ns) come and go.
POOL_SETTINGS = ("model", "reward_model", "judge_model", "task", "split", "k", "pool", "max_tokens", "temperature",
                 "seed", "dtype", "partial_at")

__all__ = ["POOL_SETTINGS", "SAMPLE_COLUMNS", "SampleStore", "partial_column", "pool_settings", "policy_slug", "safe_name",
           "sample_columns", "to_markdown", "write_atomic"]


def partial_column(checkpoint: int) -> str:
    """The samples table's column of the reward of each candidate's first ``checkpoint`` tokens."""
    return f"partial_reward_{checkpoint}"


def sample_columns(partial_at: Sequence[int] = ()) -> list[str]:
    """The samples table's columns for a pool scored on partial answers at ``partial_at`` tokens:
    ``SAMPLE_COLUMNS``, then one ``partial_reward_<c>`` column per checkpoint."""
    return SAMPLE_COLUMNS + [partial_column(c) for c in partial_at]


def write_atomic(frame, path: Path) -> None:
    """``frame`` as parquet at ``path``, through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def safe_name(text: str, fallback: str) -> str:
    """``text`` as one file or folder name: each run of characters other than letters, digits, ``.``
    and ``_`` becomes ``-``, with no ``-`` or ``.`` at either end; ``fallback`` if nothing is left."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or fallback


def policy_slug(path: str) -> str:
    """A folder-name label for a policy: the last two parts of its path or hub id, ``-``-joined
    (``runs/jbond/policy`` -> ``jbond-policy``)."""
    parts = [part for part in Path(path).parts if part not in ("/", ".", "..")]
    return safe_name("-".join(parts[-2:]), "policy")


def pool_settings(options: dict[str, Any], pool: int) -> dict[str, Any]:
    """The ``POOL_SETTINGS`` of a command's ``options`` (its config as a dict), with the pool size
    it resolved to."""
    values = options | {"pool": pool}
    return {key: values[key] for key in POOL_SETTINGS}


def _policy_key(path: str) -> str:
    """What identifies a policy: the resolved folder, or the name as given (a hub id)."""
    return str(Path(path).resolve()) if Path(path).exists() else path


@dataclasses.dataclass(frozen=True)
class SampleStore:
    """The run folder ``root``; ``method`` names a sample folder (``""``: ``samples/`` itself)."""

    root: Path

    # ------------------------------------------------------------------ samples per prompt

    def folder(self, method: str = "") -> Path:
        return self.root / "samples" / method if method else self.root / "samples"

    def file(self, index: int, method: str = "") -> Path:
        return self.folder(method) / f"prompt-{index:05d}.parquet"

    def missing(self, items: Iterable[dict], method: str = "") -> list[dict]:
        """The prompts of ``items`` (dicts with ``index``) that ``method`` has no file for."""
        return [item for item in items if not self.file(item["index"], method).exists()]

    def write(self, frame, index: int, method: str = "") -> None:
        write_atomic(frame, self.file(index, method))

    def read(self, item: dict, method: str = ""):
        """The stored samples of prompt ``item`` (``index``, ``id``) under ``method``, checked to
        hold that prompt."""
        import pandas as pd

        path = self.file(item["index"], method)
        frame = pd.read_parquet(path)
        if set(frame["prompt_id"]) != {item["id"]}:
            raise UserError(f"{path} holds prompt {frame['prompt_id'].iloc[0]!r}, but prompt "
                             f"{item['index']} of the task is {item['id']!r}")
        return frame

    # ------------------------------------------------------------------ run.json

    def read_run(self) -> dict | None:
        saved = self.root / "run.json"
        return json.loads(saved.read_text()) if saved.exists() else None

    def write_run(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".run.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.root / "run.json")

    def pool_size(self, requested: int, largest_n: int) -> int:
        """Candidates per prompt: ``requested`` if given (> 0), else the pool of the run being
        resumed, else ``largest_n``. A stored pool too small for Best-of-``largest_n`` is an error."""
        saved = self.read_run()
        if requested:
            return requested
        if saved is not None:
            pool = saved["settings"]["pool"]
            if pool < largest_n:
                raise UserError(f"{self.root} holds {pool} candidates per prompt, too few for Best-of-{largest_n}")
            return pool
        return largest_n

    def check_settings(self, settings: dict[str, Any], defaults: dict[str, Any], config: dict[str, Any],
                       kind: str | None = None) -> None:
        """Start ``run.json`` with ``settings`` (what the stored samples depend on) and ``config``,
        or, if it exists, refuse settings other than the stored ones. A setting the stored run
        does not record (added to the command later) is compared with its default in ``defaults``.
        ``kind`` names the command that owns the folder (``run.json``'s ``kind``; none for
        ``bonbench measure``): a folder of another command is refused."""
        saved = self.read_run()
        if saved is None:
            self.write_run(({"kind": kind} if kind else {}) | {"settings": settings, "config": config, "policies": []})
            return
        if saved.get("kind") != kind:
            owner = saved.get("kind") or "bonbench measure"
            raise UserError(f"{self.root} holds a run of {owner}, not of {kind or 'bonbench measure'}; "
                             "use a new --out")
        before = saved["settings"]
        changed = {k: (before.get(k, defaults.get(k)), v) for k, v in settings.items()
                   if before.get(k, defaults.get(k)) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise UserError(f"{self.root} holds a run with other settings ({detail}); use a new --out")

    # ------------------------------------------------------------------ policies

    def policies(self) -> list[dict]:
        """``run.json``'s policy entries (``slug``, ``path``, ``resolved``, ``policy_samples``)."""
        return (self.read_run() or {}).get("policies", [])

    @staticmethod
    def policy_method(slug: str) -> str:
        return f"policy-{slug}"

    def register_policy(self, path: str, policy_samples: int) -> dict:
        """The entry of policy ``path`` in ``run.json``, added under a slug no other policy of the
        run has if it is new. A policy is known by its resolved folder (or its name, for a hub id)
        and keeps the number of samples per prompt it was first measured with."""
        data = self.read_run()
        policies = data.setdefault("policies", [])
        key = _policy_key(path)
        for entry in policies:
            if entry["resolved"] == key or entry["path"] == path:
                if entry["policy_samples"] != policy_samples:
                    raise UserError(
                        f"{self.root} holds samples of policy {entry['path']} drawn with --policy-samples "
                        f"{entry['policy_samples']}, not {policy_samples}; use that, or delete "
                        f"{self.folder(self.policy_method(entry['slug']))} and its entry in run.json")
                return entry
        taken = {entry["slug"] for entry in policies}
        base = slug = policy_slug(path)
        count = 1
        while slug in taken or self.folder(self.policy_method(slug)).exists():
            count += 1
            slug = f"{base}-{count}"
        entry = {"slug": slug, "path": path, "resolved": key, "policy_samples": policy_samples}
        policies.append(entry)
        self.write_run(data)
        return entry

    def load_samples(self, items: Sequence[dict], policies: Sequence[dict] = (), partial_at: Sequence[int] = ()):
        """The stored samples of ``items`` that have a pool file, as one table in
        ``sample_columns(partial_at)``: per prompt its pool, then the samples of each of ``policies``
        (``run.json`` entries) it has. None if no prompt has a pool yet. Samples stored before a
        column of ``LATER_COLUMNS`` existed hold NaN in it; policy samples have no partial rewards."""
        import pandas as pd

        frames = []
        for item in items:
            if not self.file(item["index"]).exists():
                continue
            frames.append(self.read(item))
            for entry in policies:
                method = self.policy_method(entry["slug"])
                if self.file(item["index"], method).exists():
                    frames.append(self.read(item, method).assign(policy=entry["slug"]))
        if not frames:
            return None
        samples = pd.concat(frames, ignore_index=True)
        columns = sample_columns(partial_at)
        lacking = [c for c in columns if c not in samples and c not in LATER_COLUMNS]
        if lacking:
            raise UserError(f"the samples stored in {self.folder()} have no column {', '.join(lacking)}")
        return samples.reindex(columns=columns)

    # ------------------------------------------------------------------ result tables

    def write_tables(self, tables: dict[str, Any]) -> None:
        """Each DataFrame of ``tables`` as ``<name>.parquet`` and ``<name>.csv``; ``summary`` also
        as ``summary.md``."""
        write_tables(self.root, tables)
