"""Write the local tasks' data (``qa.jsonl`` and its few-shot turns, ``mc.jsonl``, ``if.jsonl``) from
the fact tables below.

    python -m evals.tasks.make_data          # rewrites the three files beside this module

The questions are chosen so that a 135M-parameter instruction model gets some right and some wrong:
one-digit arithmetic, capitals of well-known countries, opposites, counts everyone knows, colours,
sequences and irregular plurals. The output is deterministic (a fixed seed), and a test checks that
the committed files are exactly what this script writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 12

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo",
    "Canada": "Ottawa", "Australia": "Canberra", "Greece": "Athens", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Austria": "Vienna", "Poland": "Warsaw",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul", "Turkey": "Ankara",
    "Belgium": "Brussels", "Denmark": "Copenhagen", "Finland": "Helsinki", "Cuba": "Havana",
}

OPPOSITES = {
    "hot": ["cold"], "big": ["small", "little"], "up": ["down"], "day": ["night"], "black": ["white"],
    "fast": ["slow"], "happy": ["sad", "unhappy"], "open": ["closed", "shut"], "wet": ["dry"],
    "light": ["dark", "heavy"], "left": ["right"], "full": ["empty"], "early": ["late"], "push": ["pull"],
    "rich": ["poor"], "tall": ["short"], "win": ["lose"], "yes": ["no"], "in": ["out"], "old": ["new", "young"],
}

# (question, answers): counts everyone learns early.
COUNTS = [
    ("How many legs does a spider have?", 8), ("How many legs does a dog have?", 4),
    ("How many days are in a week?", 7), ("How many months are in a year?", 12),
    ("How many sides does a triangle have?", 3), ("How many sides does a square have?", 4),
    ("How many sides does a hexagon have?", 6), ("How many hours are in a day?", 24),
    ("How many minutes are in an hour?", 60), ("How many continents are there?", 7),
    ("How many wheels does a bicycle have?", 2), ("How many legs does an insect have?", 6),
    ("How many planets are in the Solar System?", 8), ("How many seconds are in a minute?", 60),
    ("How many letters are in the English alphabet?", 26), ("How many fingers are on one hand?", 5),
]

COLOURS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
           "blood": "red", "coal": "black", "a ripe tomato": "red", "an orange": "orange"}

NEXT = [
    ("What day comes after Monday?", "Tuesday"), ("What day comes after Friday?", "Saturday"),
    ("What month comes after January?", "February"), ("What month comes after June?", "July"),
    ("What letter comes after A?", "B"), ("What letter comes after M?", "N"),
    ("What season comes after winter?", "spring"), ("What season comes after summer?", "autumn"),
]

PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "goose": "geese", "person": "people"}

YOUNG = {"cat": ["kitten"], "dog": ["puppy", "pup"], "cow": ["calf"], "sheep": ["lamb"], "horse": ["foal"],
         "duck": ["duckling"]}


TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _number_answers(value: int) -> list[str]:
    """The digits first, then the number in words (both spellings of a compound: 'twenty-four')."""
    if value < len(NUMBER_WORDS):
        return [str(value), NUMBER_WORDS[value]]
    tens, ones = divmod(value, 10)
    if ones == 0:
        return [str(value), TENS[tens]]
    return [str(value), f"{TENS[tens]}-{NUMBER_WORDS[ones]}", f"{TENS[tens]} {NUMBER_WORDS[ones]}"]


def qa_rows(rng: random.Random) -> list[dict]:
    """Short-answer questions with every accepted answer (the first is the canonical one)."""
    rows: list[tuple[str, str, list[str]]] = []
    digits = range(1, 10)
    for a, b in rng.sample([(a, b) for a in digits for b in digits], 15):
        rows.append(("arithmetic", f"What is {a} + {b}?", _number_answers(a + b)))
    for a, b in rng.sample([(a, b) for a in range(2, 13) for b in range(1, a)], 10):
        rows.append(("arithmetic", f"What is {a} - {b}?", _number_answers(a - b)))
    for a, b in rng.sample([(a, b) for a in range(2, 6) for b in range(2, 6)], 10):
        rows.append(("arithmetic", f"What is {a} times {b}?", _number_answers(a * b)))
    rows += [("capitals", f"What is the capital of {country}?", [city]) for country, city in CAPITALS.items()]
    rows += [("opposites", f"What is the opposite of {word}?", answers) for word, answers in OPPOSITES.items()]
    rows += [("counts", question, _number_answers(value)) for question, value in COUNTS]
    rows += [("colours", f"What colour is {thing}?", [colour]) for thing, colour in COLOURS.items()]
    rows += [("sequences", question, [answer]) for question, answer in NEXT]
    rows += [("plurals", f"What is the plural of {word}?", [plural]) for word, plural in PLURALS.items()]
    rows += [("animals", f"What is a baby {animal} called?", answers) for animal, answers in YOUNG.items()]
    rng.shuffle(rows)  # so that lm-eval's --limit takes a mix of categories
    return [{"id": f"qa-{i:03d}", "category": c, "question": q, "answers": a} for i, (c, q, a) in enumerate(rows)]


# Shown before each question as earlier chat turns (lm-eval's few-shot as multi-turn): a 135M model
# answers in full sentences without them, and exact match then fails on answers it knows.
QA_FEWSHOT = [("What is the capital of Peru?", "Lima"), ("What is 2 + 2?", "4"),
              ("What is the opposite of good?", "bad")]


def qa_fewshot_rows() -> list[dict]:
    return [{"id": f"qa-shot-{i}", "category": "fewshot", "question": q, "answers": [a]}
            for i, (q, a) in enumerate(QA_FEWSHOT)]


def _choices(rng: random.Random, answer: str, pool: list[str], k: int = 4) -> tuple[list[str], int]:
    distractors = rng.sample(sorted(set(pool) - {answer}), k - 1)
    choices = distractors + [answer]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def mc_rows(rng: random.Random) -> list[dict]:
    """Four-way multiple choice over the same facts: the label is the index of the right choice."""
    items: list[tuple[str, str, str, list[str]]] = []
    cities = list(CAPITALS.values())
    items += [("capitals", f"What is the capital of {c}?", city, cities) for c, city in CAPITALS.items()]
    firsts = [answers[0] for answers in OPPOSITES.values()]
    items += [("opposites", f"What is the opposite of {w}?", a[0], firsts) for w, a in OPPOSITES.items()]
    numbers = sorted({str(v) for _, v in COUNTS} | {"5", "9", "10"})
    items += [("counts", q, str(v), numbers) for q, v in COUNTS]
    colours = sorted(set(COLOURS.values()) | {"purple", "pink"})
    items += [("colours", f"What colour is {t}?", c, colours) for t, c in COLOURS.items()]
    plurals = sorted(set(PLURALS.values()) | {"mouses", "childs", "foots", "tooths"})
    items += [("plurals", f"What is the plural of {w}?", p, plurals) for w, p in PLURALS.items()]
    young = sorted({a[0] for a in YOUNG.values()})
    items += [("animals", f"What is a baby {animal} called?", a[0], young) for animal, a in YOUNG.items()]
    rng.shuffle(items)
    rows = []
    for i, (category, question, answer, pool) in enumerate(items):
        choices, label = _choices(rng, answer, pool)
        rows.append({"id": f"mc-{i:03d}", "category": category, "question": question,
                     "choices": choices, "label": label})
    return rows


TOPICS = ["the ocean", "cats", "the moon", "coffee", "winter", "music", "trees", "a city at night",
          "friendship", "the sun", "rain", "books", "bread", "mountains", "a train journey"]

# (template, instruction ids, kwargs per instruction): the checkers live in evals/tasks/utils.py.
INSTRUCTIONS = [
    ("Describe {topic} in exactly three words.", ["word_count"], [{"words": 3}]),
    ("Write one sentence about {topic}, using only lowercase letters.", ["lowercase"], [{}]),
    ("Ask a question about {topic}. Your answer must end with a question mark.", ["ends_with"], [{"end": "?"}]),
    ("Write a sentence about {topic} without using any commas.", ["no_commas"], [{}]),
    ("Write about {topic} in at most ten words.", ["max_words"], [{"words": 10}]),
    ("Write a sentence about {topic} that starts with the word 'Today'.", ["starts_with"], [{"word": "today"}]),
    ("Write a sentence about {topic} that uses the word 'blue'.", ["includes_word"], [{"word": "blue"}]),
    ("Write about {topic} in capital letters only.", ["uppercase"], [{}]),
    ("Describe {topic} in exactly five words, all lowercase.", ["word_count", "lowercase"],
     [{"words": 5}, {}]),
    ("Ask a question about {topic} in at most eight words. End with a question mark.",
     ["max_words", "ends_with"], [{"words": 8}, {"end": "?"}]),
]


def if_rows(rng: random.Random) -> list[dict]:
    """Each instruction template over six topics: 60 prompts with their instruction ids and kwargs."""
    prompts = [(template.format(topic=topic), ids, kwargs)
               for template, ids, kwargs in INSTRUCTIONS for topic in rng.sample(TOPICS, 6)]
    rng.shuffle(prompts)
    return [{"id": f"if-{i:03d}", "prompt": p, "instruction_ids": ids, "kwargs": kw}
            for i, (p, ids, kw) in enumerate(prompts)]


def render() -> dict[str, str]:
    """File name -> JSONL text, exactly as committed."""
    rng = random.Random(SEED)
    tables = {"qa.jsonl": qa_rows(rng), "qa_fewshot.jsonl": qa_fewshot_rows(), "mc.jsonl": mc_rows(rng),
              "if.jsonl": if_rows(rng)}
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            for name, rows in tables.items()}


def main() -> None:
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name} ({text.count(chr(10))} rows)")


if __name__ == "__main__":
    main()
