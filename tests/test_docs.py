"""Every reference the documentation makes, and every reference made to it, resolves.

- each ``tests/<path>.py::<name>`` in ``docs/*.md`` names a test function that exists;
- each citation of the math page by section in the code (``docs/math.md §N``, ``§N.M``, and the
  older ``MATH.md §N`` form, which means the same page) names a heading of ``docs/math.md``, and
  each bare ``§N`` inside ``docs/*.md`` does too (the paper's sections are written "Section 4.3");
- each ``docs/<name>.md`` path named in the code, the tests or a README exists.

The checks are pure functions of text, so the tests at the bottom feed them broken references and
see that they are caught.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MATH_PAGE = DOCS / "math.md"
CODE_DIRS = ("bonbench", "distill", "evals", "benchmarks", "tests")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt"}
# The topic each top-level section keeps: code cites these numbers, so they must not drift.
SECTION_TOPICS = {
    "1": "best-of-n distribution",
    "2": "kl-regularised rl",
    "3": "bond objectives",
    "4": "j-bond",
    "5": "baselines",
    "6": "measure",
    "7": "test bed",
    "9": "early rejection",
}

_NUMBER = r"\d+(?:\.\d+)?"
HEADING = re.compile(rf"^#{{2,4}}\s+({_NUMBER})\.?\s+(.*)$", re.MULTILINE)
# The page's name (new or old, maybe in backticks), "§", then numbers: "§N", "§N.M", a range "§A-B",
# a list "§A, §B"; a word ends the list ("§N step M" cites N only). Examples in the tests below.
CITATION = re.compile(
    rf"(?:docs/math|MATH)\.md`*\s*§\s*({_NUMBER}(?:\s*(?:[-–]\s*§?|,\s*§)\s*{_NUMBER})*)"
)
BARE_SECTION = re.compile(rf"§\s*({_NUMBER}(?:\s*(?:[-–]\s*§?|,\s*§)\s*{_NUMBER})*)")
TEST_REF = re.compile(r"\b(tests/[\w/.-]+\.py)(?:::(\w+(?:::\w+)?)(?:\[[^\]\s]*\])?)?")
DOC_PATH = re.compile(r"\bdocs/[\w./-]+?\.md\b")


# ----------------------------------------------------------------------------- the checks


def section_numbers(group: str) -> list[str]:
    """``"2-3"`` -> ``["2", "3"]``; ``"3, §5"`` -> ``["3", "5"]``; ``"1.2"`` -> ``["1.2"]``."""
    numbers: list[str] = []
    for part in re.split(r",\s*§", group):
        ends = [e.strip() for e in re.split(r"[-–]\s*§?", part)]
        if len(ends) == 2 and all(e.isdigit() for e in ends):
            numbers += [str(i) for i in range(int(ends[0]), int(ends[1]) + 1)]
        else:
            numbers += ends
    return numbers


def headings(markdown: str) -> dict[str, str]:
    """Section number -> heading text, for ``## 1. Title`` and ``### 1.2 Title`` headings."""
    return {number: title.strip() for number, title in HEADING.findall(markdown)}


def cited_sections(text: str, pattern: re.Pattern = CITATION) -> list[str]:
    return [n for group in pattern.findall(text) for n in section_numbers(group)]


def unknown_sections(text: str, known: set[str], pattern: re.Pattern = CITATION) -> list[str]:
    return sorted({f"§{n}" for n in cited_sections(text, pattern) if n not in known})


@lru_cache(maxsize=None)
def defined_tests(path: Path) -> frozenset[str]:
    """``name`` and ``Class::name`` of every test function defined in a test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    names = set()
    for node in tree.body:
        if isinstance(node, functions) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, functions) and item.name.startswith("test"))
    return frozenset(names)


def unresolved_test_refs(text: str, root: Path = ROOT) -> list[str]:
    problems = []
    for path, name in TEST_REF.findall(text):
        file = root / path
        if not file.is_file():
            problems.append(f"{path}: no such file")
        elif name and name not in defined_tests(file):
            problems.append(f"{path}::{name}: no such test function")
    return problems


def missing_doc_paths(text: str, root: Path = ROOT) -> list[str]:
    return sorted({p for p in DOC_PATH.findall(text) if not (root / p).is_file()})


# ----------------------------------------------------------------------------- the files


def _code_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in CODE_DIRS:
        if (ROOT / folder).is_dir():
            files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    return files


def _doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@lru_cache(maxsize=None)
def math_headings() -> dict[str, str]:
    return headings(_read(MATH_PAGE))


# ----------------------------------------------------------------------------- the repository


def test_math_page_keeps_the_numbered_sections_the_code_cites():
    found = math_headings()
    for number, topic in SECTION_TOPICS.items():
        assert number in found, f"docs/math.md lost its section {number} ({topic}); code cites it by number"
        assert topic in found[number].lower(), (
            f"docs/math.md §{number} is '{found[number]}', but the code cites §{number} for {topic!r}")
    numbers = [number for number, _ in HEADING.findall(_read(MATH_PAGE))]
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not twice, f"section numbers used twice in docs/math.md: {twice}"


def test_every_test_named_in_the_docs_exists():
    refs = 0
    problems = []
    for page in _doc_pages():
        text = _read(page)
        refs += len(TEST_REF.findall(text))
        problems += [f"{_relative(page)}: {p}" for p in unresolved_test_refs(text)]
    assert refs >= 30, f"only {refs} test references in docs/: every formula of docs/math.md names its test"
    assert not problems, "\n".join(problems)


def test_every_citation_of_the_math_page_names_one_of_its_sections():
    known = set(math_headings())
    citations = 0
    problems = []
    for file in _code_files():
        text = _read(file)
        citations += len(cited_sections(text))
        problems += [f"{_relative(file)}: {s}" for s in unknown_sections(text, known)]
    assert citations >= 20, f"found only {citations} citations of the math page in the code"
    assert not problems, "cited sections that docs/math.md does not have:\n" + "\n".join(problems)


def test_every_section_sign_inside_the_docs_names_a_section_of_the_math_page():
    known = set(math_headings())
    problems = []
    for page in _doc_pages():
        problems += [f"{_relative(page)}: {s}" for s in unknown_sections(_read(page), known, BARE_SECTION)]
    assert not problems, ("sections of docs/math.md that do not exist (write the paper's as 'Section N'):\n"
                          + "\n".join(problems))


def test_every_docs_page_named_anywhere_exists():
    problems = []
    for file in _code_files() + _doc_pages():
        problems += [f"{_relative(file)}: {p}" for p in missing_doc_paths(_read(file))]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- the checks catch breakage

# Spelled in pieces so that this file's own text holds no citation for the checks above to find.
_OLD, _NEW = "MATH" + ".md", "docs/" + "math.md"


@pytest.mark.parametrize(
    "text, numbers",
    [
        (f"see {_OLD} §2-3 for", ["2", "3"]),
        (f"({_OLD} §3, §5).", ["3", "5"]),
        (f"({_OLD} §4 step 3; paper Eq. 17)", ["4"]),
        (f"``{_OLD}`` §1)", ["1"]),
        (f"{_NEW} §2.1 and {_NEW} §7", ["2.1", "7"]),
        (f"sections refer to ``{_OLD}``.", []),
    ],
)
def test_citations_are_read_in_every_form_the_code_uses(text, numbers):
    assert cited_sections(text) == numbers


def test_a_citation_of_a_missing_section_is_caught_in_both_forms():
    known = {"1", "2", "2.1"}
    assert unknown_sections(f"{_OLD} §1 and {_NEW} §2.1", known) == []
    assert unknown_sections(f"{_OLD} §9", known) == ["§9"]
    assert unknown_sections(f"{_NEW} §2.4", known) == ["§2.4"]
    assert unknown_sections(f"{_OLD} §1-3", known) == ["§3"]


def test_headings_are_read_at_both_levels():
    page = "# Title\n\n## 1. The first\n\ntext\n\n### 1.2 A part\n\n## 12. Later\n"
    assert headings(page) == {"1": "The first", "1.2": "A part", "12": "Later"}


def test_a_reference_to_a_missing_test_or_file_is_caught(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "def test_here():\n    pass\n\n\nclass TestGroup:\n    def test_inner(self):\n        pass\n\n\n"
        "def helper():\n    pass\n"
    )
    good = "tests/test_x.py::test_here, tests/test_x.py::TestGroup::test_inner, tests/test_x.py::test_here[a-b]"
    assert unresolved_test_refs(good, tmp_path) == []
    gone = unresolved_test_refs("`tests/test_x.py::test_gone`", tmp_path)
    assert gone == ["tests/test_x.py::test_gone: no such test function"]
    not_a_test = unresolved_test_refs("tests/test_x.py::helper", tmp_path)
    assert not_a_test == ["tests/test_x.py::helper: no such test function"]
    assert unresolved_test_refs("tests/test_y.py::test_here", tmp_path) == ["tests/test_y.py: no such file"]


def test_a_missing_docs_page_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "math.md").write_text("# math\n")
    gone = "docs/" + "gone.md"
    assert missing_doc_paths(f"see {_NEW} and {gone}, or docs/*.md", tmp_path) == [gone]
