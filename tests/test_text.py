"""The course's text: it stands alone, states only what its run computed, and fits the book's column.

* No reference to documents a student does not have (design notes, "spec" sections, ambiguity codes) in the
  notebooks, the package's docstrings, the book's pages or the README.
* No measured-looking number typed into a notebook's Markdown (a percentage, a mean +- std, a correlation,
  a measured time), except in a table labelled as a paper's and in the short list of definitions below:
  results are written by code from the run.
* Every notebook code line fits the book's column (100 characters).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
BOOK_PAGES = sorted(path for path in (REPO / "kdbook").rglob("*.md") if "_build" not in path.parts)
PACKAGE = sorted((REPO / "kdbook_utils").rglob("*.py"))

INTERNAL = re.compile(
    r"spec\s*§|\bthe spec\b|\bspec'?s\b|spec section|ambiguity (register|[CM]\d)|\bthe proposal\b|\bTF base\b"
    r"|source proposal|student proposal|papers\.md",
    re.IGNORECASE,
)
INTERNAL_CODES = re.compile(r"\bREC\b|\[(SRC|INF|CODE)\]|\b[CM](10|[1-9])\b(?=[,)\]:/]| \(|$)")
CODE_NAMES = re.compile(r"`[^`]*`")

MEASURED = [
    re.compile(r"\d[\d.,]*\s?%"),  # a percentage
    re.compile(r"\d\s*(±|\+-|\+/-)\s*\d"),  # mean +- std
    re.compile(r"(rho|correlation|Spearman)\D{0,20}[-+−]?\d?\.\d", re.IGNORECASE),
    re.compile(r"\b\d+(\.\d+)?\s?(s|seconds|minutes|min)\b(?! of)"),  # a measured time
    re.compile(r"\b\d+\.\d+\s?(points|x)\b"),  # a gain or a ratio
]
DEFINITIONS = {
    "top-1 %",
    "3 % of the data",  # Hinton et al.'s speech experiment, a fact of the paper
    "95 % confidence interval",
    "95 % interval",
    "about 75 minutes",
    "about 80 minutes",
    "about 20 minutes",
    "about 15",
    "about 20.",
    "10 minutes",
    "15 minutes",
}


def markdown_cells(path: Path) -> list[tuple[int, str]]:
    notebook = nbformat.read(path, as_version=4)
    return [(index, cell.source) for index, cell in enumerate(notebook.cells) if cell.cell_type == "markdown"]


def paper_table_lines(text: str) -> set[int]:
    """Lines of Markdown tables whose header or caption names the paper (their numbers are the paper's)."""
    lines = text.splitlines()
    keep: set[int] = set()
    start = None
    for number, line in enumerate([*lines, ""]):
        if line.lstrip().startswith("|"):
            start = number if start is None else start
            continue
        if start is not None:
            header = lines[start] + " " + (lines[start - 1] if start else "")
            if re.search(r"paper", header, re.IGNORECASE):
                keep.update(range(start, number))
            start = None
    return keep


def typed_numbers(text: str) -> list[str]:
    found = []
    skip = paper_table_lines(text)
    for number, line in enumerate(text.splitlines()):
        if number in skip:
            continue
        cleaned = CODE_NAMES.sub("", line)
        cleaned = re.sub(r"\$[^$]*\$", "", cleaned)  # mathematics: symbols, not measurements
        for definition in DEFINITIONS:
            cleaned = re.sub(re.escape(definition), "", cleaned, flags=re.IGNORECASE)
        for pattern in MEASURED:
            match = pattern.search(cleaned)
            if match:
                found.append(f"line {number + 1}: {line.strip()[:120]!r} ({match.group(0)!r})")
                break
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_measured_number_is_typed_into_markdown(path: Path) -> None:
    problems = [
        f"cell {index}, {problem}" for index, text in markdown_cells(path) for problem in typed_numbers(text)
    ]
    assert not problems, (
        "write these with code from the run (or label the table as the paper's):\n" + "\n".join(problems)
    )


def test_the_typed_number_check_catches_what_it_should() -> None:
    assert typed_numbers("LSL reached 93.7 ± 1.3 % against 92.6 %.")
    assert typed_numbers("the rank correlation was -0.65")
    assert typed_numbers("The notebook runs in 88 s.")
    assert not typed_numbers("Choose T = 4 and alpha = 0.1; the 95 % interval must lie above zero.")
    table = "| method | paper: PPMI |\n|---|---|\n| LSL | 41.0 % |"
    assert not typed_numbers(table)
    assert typed_numbers("| method | ours |\n|---|---|\n| LSL | 41.0 % |")


def _text_files() -> list[Path]:
    return [*NOTEBOOKS, *BOOK_PAGES, *PACKAGE, REPO / "README.md"]


@pytest.mark.parametrize("path", _text_files(), ids=[str(p.relative_to(REPO)) for p in _text_files()])
def test_no_reference_to_documents_outside_the_repository(path: Path) -> None:
    text = path.read_text()
    hits = [f"line {number}: {line.strip()[:120]}" for number, line in enumerate(text.splitlines(), 1)
            if INTERNAL.search(line) or INTERNAL_CODES.search(line)]  # fmt: skip
    assert not hits, (
        "the course must stand alone; say it in the book's own words or its appendix:\n" + "\n".join(hits)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_code_fits_the_books_column(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    long = [f"cell {index}: {line[:60]}..." for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for line in cell.source.splitlines() if len(line) > 100]  # fmt: skip
    assert not long, "code lines over 100 characters are clipped in the book:\n" + "\n".join(long)


@pytest.mark.parametrize("path", NOTEBOOKS[1:], ids=[p.stem for p in NOTEBOOKS[1:]])
def test_every_lesson_links_to_the_reconstruction_appendix_and_says_what_you_should_see(path: Path) -> None:
    text = "\n".join(source for _, source in markdown_cells(path))
    assert "appendix/reconstruction.md#" in text
    assert "What you should see" in text
    assert "Learning objectives" in text and "**Time.**" in text
    assert "Differences from the paper" in text
