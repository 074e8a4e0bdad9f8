"""What the local tasks' YAML files call (``!function utils.…``): the loader of the JSONL beside
this file, exact match for short answers, and the instruction-following checkers.

lm-eval imports this file by its path, so it imports nothing from the project.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_local(splits: dict[str, str], **_metadata):
    """The YAML's ``dataset_kwargs: {splits: {split: file.jsonl}}``, read from this folder, as a DatasetDict.

    lm-eval passes the task's metadata as keyword arguments too; they are not needed here.
    """
    import datasets

    def rows(file: str) -> list[dict]:
        return [json.loads(line) for line in (HERE / file).read_text().splitlines() if line.strip()]

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows(file)) for split, file in splits.items()})


# ---------------------------------------------------------------------------------------
# Short-answer QA: exact match after SQuAD-style normalisation


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, without punctuation, articles and repeated whitespace (SQuAD's normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The answer is read from the first non-empty line; a chat model's later lines explain it."""
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def qa_exact_match(response: str, answers: list[str]) -> bool:
    """Whether the response's first line, normalised, is one of the accepted answers, normalised."""
    return normalize_answer(first_line(response)) in {normalize_answer(a) for a in answers}


def process_qa(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(qa_exact_match(results[0], doc["answers"]))}


# ---------------------------------------------------------------------------------------
# Instruction following: each instruction id is a checker of (response, **kwargs) -> bool


def split_words(text: str) -> list[str]:
    """Whitespace-separated pieces with at least one letter or digit (a lone dash is no word)."""
    return [w for w in text.split() if any(ch.isalnum() for ch in w)]


def _bare(word: str) -> str:
    return word.strip(string.punctuation).lower()


def check_word_count(response: str, words: int) -> bool:
    return len(split_words(response)) == words


def check_max_words(response: str, words: int) -> bool:
    return 0 < len(split_words(response)) <= words


def check_lowercase(response: str) -> bool:
    return any(ch.isalpha() for ch in response) and response == response.lower()


def check_uppercase(response: str) -> bool:
    return any(ch.isalpha() for ch in response) and response == response.upper()


def check_ends_with(response: str, end: str) -> bool:
    return response.rstrip().endswith(end)


def check_no_commas(response: str) -> bool:
    return bool(response.strip()) and "," not in response


def check_starts_with(response: str, word: str) -> bool:
    found = split_words(response)
    return bool(found) and _bare(found[0]) == word.lower()


def check_includes_word(response: str, word: str) -> bool:
    return word.lower() in {_bare(w) for w in split_words(response)}


CHECKERS = {
    "word_count": check_word_count,
    "max_words": check_max_words,
    "lowercase": check_lowercase,
    "uppercase": check_uppercase,
    "ends_with": check_ends_with,
    "no_commas": check_no_commas,
    "starts_with": check_starts_with,
    "includes_word": check_includes_word,
}


def follows(response: str, instruction_ids: list[str], kwargs: list[dict]) -> list[bool]:
    """One verdict per instruction; an unknown instruction id is an error, not a silent False."""
    unknown = [i for i in instruction_ids if i not in CHECKERS]
    if unknown:
        raise KeyError(f"unknown instruction id(s) {unknown}; known: {sorted(CHECKERS)}")
    text = response.strip()
    # Arrow stores each row's kwargs as one struct with every key of the column, absent ones as None.
    kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
    return [CHECKERS[i](text, **kw) for i, kw in zip(instruction_ids, kwargs, strict=True)]


def process_if(doc: dict, results: list[str]) -> dict:
    verdicts = follows(results[0], doc["instruction_ids"], doc["kwargs"])
    return {"prompt_level_acc": float(all(verdicts)), "inst_level_acc": verdicts}


def mean_of_all(items: list[list[bool]]) -> float:
    """Instruction-level accuracy: every instruction of every prompt counts once."""
    flat = [v for verdicts in items for v in verdicts]
    return sum(flat) / len(flat)
