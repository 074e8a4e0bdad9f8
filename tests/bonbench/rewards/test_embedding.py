"""The embedded default reward (MiniLM relevance minus gaming penalties) on the default task:
the reference summary must beat every cheap way of scoring high, on every passage checked."""

from __future__ import annotations

import re

import pytest

from bonbench.rewards.embedding import (
    EmbeddingReward,
    longest_shared_run,
    penalty_terms,
    source_of,
    unsupported_entities,
    whole_words,
)
from bonbench.rewards.base import scores_partial
from bonbench.tasks import load_task, summary_prompt

PASSAGES = 10
FILLER = " This is a story that many people have been talking about."


@pytest.fixture(scope="module")
def reward() -> EmbeddingReward:
    return EmbeddingReward()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return list(load_task(split="test", limit=PASSAGES))


def lead_sentence(document: str) -> str:
    return re.split(r"(?<=[.!?])\s+", document.strip())[0]


def truncated(summary: str) -> str:
    words = summary.split()
    return " ".join(words[: int(len(words) * 0.6)])


def with_invented_facts(summary: str) -> str:
    """One sentence still, now with a name, a place and a number that the passage never mentions."""
    return f"{summary.rstrip('.')}, Mayor Tobias Quince told 4,217 residents of Harrowgate."


def impostors(rows: list[dict], i: int) -> dict[str, str]:
    row = rows[i]
    return {
        "copied passage": row["document"],
        "copied lead sentence": lead_sentence(row["document"]),
        "truncated reference": truncated(row["summary"]),
        "empty answer": "",
        "rambling answer": row["summary"] + FILLER * 4,
        "another passage's summary": rows[(i + 1) % len(rows)]["summary"],
        "invented numbers and names": with_invented_facts(row["summary"]),
    }


def test_reference_summary_beats_every_gamed_answer_on_every_passage(reward, rows):
    failures = []
    for i, row in enumerate(rows):
        prompt = summary_prompt(row["document"])
        others = impostors(rows, i)
        scores = reward.score([prompt] * (1 + len(others)), [row["summary"], *others.values()])
        reference = scores[0]
        for (name, answer), score in zip(others.items(), scores[1:]):
            if not score < reference:
                failures.append(f"{row['id']}: {name} scored {score:.3f} >= reference {reference:.3f}")
    assert not failures, "\n".join(failures)


def test_scores_are_deterministic_and_the_same_batched_or_one_by_one(reward, rows):
    prompts, answers = [], []
    for i, row in enumerate(rows[:3]):
        for answer in [row["summary"], *impostors(rows, i).values()]:
            prompts.append(summary_prompt(row["document"]))
            answers.append(answer)
    batched = reward.score(prompts, answers)
    assert reward.score(prompts, answers) == batched
    one_by_one = [reward.score([p], [a])[0] for p, a in zip(prompts, answers)]
    assert one_by_one == pytest.approx(batched, abs=1e-5)
    reward.batch_size = 3
    try:
        small_batches = reward.score(prompts, answers)
    finally:
        reward.batch_size = 64
    assert small_batches == pytest.approx(batched, abs=1e-5)


def test_empty_answer_scores_minus_one_and_every_other_answer_stays_above_it(reward, rows):
    row = rows[0]
    scores = reward.score([summary_prompt(row["document"])] * 3, ["", "   ", "x"])
    assert scores[:2] == [-1.0, -1.0]
    assert -1.0 < scores[2] <= 1.0


def test_source_is_the_text_after_the_first_blank_line_of_the_last_user_turn():
    prompt = [{"role": "system", "content": "be brief"},
              {"role": "user", "content": "Summarize.\n\nThe article.\n\nSecond paragraph."}]
    assert source_of(prompt) == "The article.\n\nSecond paragraph."
    assert source_of("no blank line here") == "no blank line here"


def test_longest_shared_run_counts_consecutive_words_in_both():
    assert longest_shared_run("a b c d x".split(), "z a b c d y".split()) == 4
    assert longest_shared_run("a x b".split(), "a b".split()) == 1
    assert longest_shared_run([], "a".split()) == 0


def test_unsupported_entities_is_the_share_of_names_and_numbers_absent_from_the_source():
    source = "Mayor Ana Berg opened 3 new parks in Lund."
    assert unsupported_entities("The mayor opened 3 parks in Lund.", source) == 0.0
    assert unsupported_entities("The mayor opened 7 parks in Oslo.", source) == 1.0
    assert unsupported_entities("Berg opened 3 parks in Oslo.", source) == pytest.approx(0.5)  # first word skipped


def test_penalty_terms_by_hand():
    source = "one two three four five six seven eight nine ten eleven twelve"
    terms = penalty_terms("One two three four five six seven eight nine.", source)
    assert terms["copying"] == pytest.approx(0.6 * 3 / 12)  # a 9-word run: 3 past the free 6
    assert terms["length"] == pytest.approx(0.02 * 1)  # 9 words: one short of 10
    assert terms["truncation"] == 0.0 and terms["sentences"] == 0.0 and terms["repetition"] == 0.0
    terms = penalty_terms("It rained. It rained. It rained", source)
    assert terms["truncation"] == 0.25 and terms["sentences"] == pytest.approx(0.3)
    assert terms["repetition"] == pytest.approx(0.5 * 2 / 4)  # 4 word trigrams, 2 of them repeats


def test_whole_words_drops_a_last_word_the_cut_may_have_split():
    assert whole_words("The council voted to clo") == "The council voted to"
    assert whole_words("The council voted to ") == "The council voted to"
    assert whole_words("The council voted.") == "The council voted."
    assert whole_words("Council") == "Council"


def test_partial_answers_pay_no_short_or_truncated_term_and_keep_the_others():
    source = "The council of Springfield voted on Monday to close the old library after 40 years."
    whole, partial = penalty_terms("The council voted", source), penalty_terms("The council voted", source, True)
    assert whole["truncation"] == 0.25 and partial["truncation"] == 0.0
    assert whole["length"] > 0 and partial["length"] == 0.0
    rambling = " ".join(["word"] * 40)
    assert penalty_terms(rambling, source, partial=True)["length"] == pytest.approx(0.02 * 5)
    invented = penalty_terms("The Mayor Quince said", source, partial=True)
    assert invented["hallucination"] > 0


def test_score_partial_ranks_a_prefix_of_the_reference_above_prefixes_of_gamed_answers(reward, rows):
    assert scores_partial(reward)

    def cut(text: str, words: int) -> str:
        return " ".join(text.split()[:words]) + "x"  # a split last word, as a cut after k tokens leaves

    for i, row in enumerate(rows[:6]):
        prompt = summary_prompt(row["document"])
        other = rows[(i + 1) % len(rows)]["summary"]
        good, elsewhere, copied = reward.score_partial(
            [prompt] * 3, [cut(row["summary"], 14), cut(other, 14), cut(row["document"], 20)])
        assert good > elsewhere and good > copied, i
        # the prefix is not punished for being unfinished: it scores above the same text as a whole answer
        assert good > reward.score([prompt], [whole_words(cut(row["summary"], 14))])[0]
