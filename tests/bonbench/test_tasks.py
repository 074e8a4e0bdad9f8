"""The shipped default task (bonbench/data/news) and its loader (bonbench/tasks.py)."""

from __future__ import annotations

import re

import pytest

from bonbench.errors import UserError
from bonbench.rewards.embedding import source_of
from bonbench.tasks import INSTRUCTION, load_task, summary_prompt

_SENTENCE_BREAK = re.compile(r"[.!?][\"'”’)]*\s+(?=[\"'“‘(]?[A-Z0-9])")


@pytest.fixture(scope="module")
def splits():
    return {split: load_task("default", split) for split in ("train", "test")}


def _words(text: str) -> int:
    return len(text.split())


def test_split_sizes(splits):
    assert len(splits["train"]) == 120
    assert len(splits["test"]) == 50


def test_schema_is_xsums(splits):
    for ds in splits.values():
        assert set(ds.column_names) == {"id", "document", "summary"}
        for row in ds:
            assert all(isinstance(row[c], str) and row[c].strip() == row[c] and row[c] for c in ds.column_names)


def test_ids_are_unique_within_and_across_splits(splits):
    train, test = list(splits["train"]["id"]), list(splits["test"]["id"])
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert not set(splits["train"]["document"]) & set(splits["test"]["document"])


def test_passages_are_short_and_summaries_fit_the_reward(splits):
    # Summaries sit in the default reward's unpenalised length band (10..35 words) and are one
    # sentence ending in punctuation, as the reward asks of an answer; passages are short news items.
    for ds in splits.values():
        for row in ds:
            assert 50 <= _words(row["document"]) <= 250, row["id"]
            assert 10 <= _words(row["summary"]) <= 35, row["id"]
            assert not _SENTENCE_BREAK.search(row["summary"]), row["id"]
            assert row["summary"][-1] in ".!?\"'”’", row["id"]
            assert "\n\n" not in row["document"], row["id"]


def test_limit_keeps_the_first_rows_in_order(splits):
    head = load_task("default", "test", limit=5)
    assert list(head["id"]) == list(splits["test"]["id"][:5])
    assert len(load_task("default", "test", limit=500)) == 50


def test_unknown_split_is_an_error():
    with pytest.raises(UserError, match="splits train and test"):
        load_task("default", "validation")


def test_summary_prompt_puts_the_article_after_a_blank_line(splits):
    document = splits["test"][0]["document"]
    prompt = summary_prompt("  " + document + "\n")
    assert prompt == [{"role": "user", "content": f"{INSTRUCTION}\n\n{document}"}]
    assert source_of(prompt) == document  # what the default reward reads back as the source
