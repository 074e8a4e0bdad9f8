"""Prompt sets. The default task is one-sentence news summarisation in XSum's schema
(``id``, ``document``, ``summary``): 170 short passages written for this project and shipped in
the package (120 train, 50 test), loaded through ``datasets`` like any other dataset, so
``--task xsum`` swaps in the real EdinburghNLP/xsum whenever the hub is reachable.
"""

from __future__ import annotations

from pathlib import Path

from bonbench.backends.base import Message
from bonbench.errors import UserError

INSTRUCTION = "Summarize the following article in one sentence."
DATA = Path(__file__).parent / "data" / "news"
TASKS = {
    "default": "the shipped news passages (offline)",
    "xsum": "EdinburghNLP/xsum from the Hugging Face hub",
}


def load_task(name: str = "default", split: str = "test", limit: int | None = None):
    """A ``datasets.Dataset`` with columns ``id``, ``document``, ``summary``.

    ``name``: ``default``, ``xsum``, or any hub dataset / local data file with those columns.
    ``split``: ``train`` or ``test`` (``validation`` also exists for XSum). ``limit`` keeps the first rows.
    """
    import datasets

    if name == "default":
        files = {"train": sorted(str(p) for p in DATA.glob("train-*.jsonl")), "test": [str(DATA / "test.jsonl")]}
        if split not in files:
            raise UserError(f"the default task has splits train and test, not {split!r}")
        ds = datasets.load_dataset("json", data_files={split: files[split]}, split=split)
    elif name == "xsum":
        ds = datasets.load_dataset("EdinburghNLP/xsum", split=split)
    elif Path(name).suffix in (".json", ".jsonl"):
        ds = datasets.load_dataset("json", data_files={split: name}, split=split)
    else:
        ds = datasets.load_dataset(name, split=split)
    missing = {"document", "summary"} - set(ds.column_names)
    if missing:
        raise UserError(f"task {name!r} lacks column(s) {sorted(missing)}; it needs XSum's schema")
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def summary_prompt(document: str) -> list[Message]:
    """The chat prompt of the default task: the instruction, a blank line, the article.

    The default reward reads the article back as the text after the first blank line.
    """
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{document.strip()}"}]
