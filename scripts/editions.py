"""The instructor's kit: student edition, nbgrader's course layout, and an autograder.

The notebooks in ``notebooks/`` are the instructor edition. Their exercises are marked the way nbgrader
marks them (cell metadata ``nbgrader``, schema version 3), so instructors can also run nbgrader itself on
the ``source/`` folder this command writes:

* an *answer* cell (nbgrader's "autograded answer": ``solution: true``, ``grade: false``, a ``grade_id``)
  holds the solution between a ``### BEGIN SOLUTION`` line and a ``### END SOLUTION`` line;
* a *test* cell (nbgrader's "autograder tests": ``grade: true``, ``solution: false``, ``locked: true``,
  a ``grade_id`` and ``points``) calls the exercise's check. Lines between ``### BEGIN HIDDEN TESTS`` and
  ``### END HIDDEN TESTS`` are left out of the student edition and put back for grading; there the test
  calls ``check_...(...).assert_passed()``, which raises with the checker's feedback unless it passed;
* manually graded answers (``solution`` and ``grade``), read-only cells (``locked``) and tasks (``task``,
  with ``### BEGIN MARK SCHEME`` regions) follow nbgrader too.

A marked exercise in a lesson looks like this (the answer cell, then the test cell)::

    def my_fsp(a, b):
        ### BEGIN SOLUTION
        return torch.einsum("nihw,njhw->nij", a, b) / (a.shape[2] * a.shape[3])
        ### END SOLUTION

    check_fsp_matrix(my_fsp)
    ### BEGIN HIDDEN TESTS
    check_fsp_matrix(my_fsp).assert_passed()
    ### END HIDDEN TESTS

Commands (run from anywhere; paths default to this repository)::

    python scripts/editions.py publish                 # notebooks/student/: what students open (committed)
    python scripts/editions.py generate [NOTEBOOK ...] [--out build/editions] [--zip]
    python scripts/editions.py check [NOTEBOOK ...]
    python scripts/editions.py grade SUBMISSION.ipynb [...] [--source INSTRUCTOR.ipynb] [--preset quick]
                                     [--timeout 900] [--json grades.json] [--graded DIR]

``generate`` checks every notebook's marking (default: ``notebooks/*.ipynb``), then writes into ``--out``:

* ``student/<notebook>.ipynb``: the student edition of every notebook: solutions replaced by stubs, hidden
  tests and mark schemes removed, outputs and saved widget state cleared, all other metadata kept, and
  nbgrader's locks and checksums added as ``nbgrader generate_assignment`` adds them. A solution region
  inside a function body becomes ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` (nbgrader's stub),
  so the function raises when called and its check says "not done yet". A region at the top level of a
  cell becomes ``# YOUR CODE HERE`` alone: a top-level ``raise`` would stop "Run all" there. Such a region
  may only re-bind names bound before it (``MY_THRESHOLD = None`` above the region), so the student
  edition runs top to bottom with every stub unfilled;
* ``source/<lesson>/<notebook>.ipynb`` and ``release/<lesson>/<notebook>.ipynb``: nbgrader's course layout,
  one assignment per marked notebook, named after it (``01_hinton_kd``), plus ``nbgrader_config.py``;
* with ``--zip``, ``zips/<lesson>.zip`` holding ``<lesson>/<notebook>.ipynb`` (the student edition).

Marking mistakes stop ``generate`` (and ``check``) with an error that names the notebook, the cell and the
fix, before anything is written: unbalanced or nested markers, a solution region outside an answer cell,
hidden tests outside a test cell, a cell without ``grade_id`` or ``points``, a duplicate ``grade_id``,
metadata of another schema version, a test cell that cannot fail, a stub that would not run, a cell
that shows a line of a solution (a worked answer in Markdown would give it away).

``grade`` grades submitted notebooks with nbgrader itself (``pip install -e ".[instructor]"``): for each
submission it makes a course folder in a temporary folder, with the instructor's version (default: the
notebook of the same name in ``notebooks/``) as the assignment's source, runs ``nbgrader generate_assignment``
and ``nbgrader autograde`` there (``KDBOOK_PRESET=--preset``, ``--timeout`` seconds per cell), and reads the
grades off the autograded notebook with nbgrader's ``determine_grade``: zero for a test cell that shows an
error or writes to stderr (a failed check raises with its feedback), a number it returns as partial credit,
full points otherwise. Manually graded cells are listed for the rubric. It prints one table per notebook
(grade id, points, max points, feedback), writes them to ``--json``, and the autograded notebooks to
``--graded``. The exit status is 0 when every notebook could be graded, whatever the scores.

The student edition is nbgrader's too: its own preprocessors, in ``generate_assignment``'s order, with one
change (``scripts/nbgrader_stubs.py``: a solution at the top level of a cell gets a comment, not a
``raise``, so that "Run all" runs the unfilled edition to the end). What this script adds to nbgrader: the
checks of the marking, the flat ``student/`` copies and the zips. In ``--out``, nbgrader runs as usual
(``nbgrader generate_assignment 01_hinton_kd``, ``nbgrader autograde 01_hinton_kd``) with ``KDBOOK_PRESET``
set: the ``nbgrader_config.py`` written there gives each cell 900 s (nbgrader's default is 30 s) and uses the
same stubs.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import nbformat
from nbformat import NotebookNode
from nbgrader.preprocessors import (
    CheckCellMetadata,
    ClearHiddenTests,
    ClearMarkScheme,
    ClearOutput,
    ComputeChecksums,
    LockCells,
)
from nbgrader.utils import determine_grade

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbgrader_stubs import TOP_LEVEL_STUB, RunnableClearSolutions

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_OUT = ROOT / "build" / "editions"
PUBLISHED = NOTEBOOKS / "student"
"""The committed student editions: what Colab, Binder and the book's launch buttons open."""
DEFAULT_TIMEOUT_S = 900
OWNED_FOLDERS = ("student", "source", "release", "zips")
STAMP = ".kdbook-editions"

SCHEMA_VERSION = 3
METADATA_KEYS = {
    "schema_version",
    "grade",
    "locked",
    "solution",
    "task",
    "grade_id",
    "points",
    "checksum",
    "cell_type",
}
GRADE_ID = re.compile(r"^[a-zA-Z0-9_\-]+$")
REGIONS: dict[str, tuple[str, str]] = {
    "solution": ("BEGIN SOLUTION", "END SOLUTION"),
    "hidden tests": ("BEGIN HIDDEN TESTS", "END HIDDEN TESTS"),
    "mark scheme": ("BEGIN MARK SCHEME", "END MARK SCHEME"),
}
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's stub for Python


class MarkingError(ValueError):
    """A notebook's nbgrader marking is broken; the message lists every problem and its fix."""


# ----------------------------------------------------------------------------------- cell roles (as nbgrader)


def grader_metadata(cell: NotebookNode) -> dict[str, Any]:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_grade(cell: NotebookNode) -> bool:
    return bool(grader_metadata(cell).get("grade", False))


def is_solution(cell: NotebookNode) -> bool:
    return bool(grader_metadata(cell).get("solution", False))


def is_task(cell: NotebookNode) -> bool:
    return bool(grader_metadata(cell).get("task", False))


def is_locked(cell: NotebookNode) -> bool:
    """nbgrader's rule: grade cells that are not solutions are locked; else the ``locked`` flag."""
    if "nbgrader" not in cell.get("metadata", {}) or is_solution(cell):
        return False
    return is_grade(cell) or bool(grader_metadata(cell).get("locked", False))


def has_grade_id(cell: NotebookNode) -> bool:
    return is_grade(cell) or is_solution(cell) or is_locked(cell) or is_task(cell)


def is_marked(notebook: NotebookNode) -> bool:
    """Whether any cell carries nbgrader metadata with a role (an assignment to publish)."""
    return any(has_grade_id(cell) for cell in notebook.cells)


# ----------------------------------------------------------------------------------------- marker regions


@dataclass(frozen=True)
class Region:
    """Lines ``begin`` (the BEGIN marker) to ``end`` (the END marker) of a cell's source, both included."""

    begin: int
    end: int
    indent: str


def find_regions(source: str, kind: str) -> list[Region]:
    """The ``kind`` regions of ``source`` (lines split on ``\\n`` as nbgrader does); ValueError if unbalanced."""
    begin_marker, end_marker = REGIONS[kind]
    regions, start = [], None
    for number, line in enumerate(source.split("\n")):
        if begin_marker in line:
            if start is not None:
                raise ValueError(
                    f"a second '{begin_marker}' on line {number + 1} before '{end_marker}' (nested)"
                )
            start = number
        elif end_marker in line:
            if start is None:
                raise ValueError(f"'{end_marker}' on line {number + 1} without a '{begin_marker}' before it")
            regions.append(Region(start, number, re.match(r"\s*", source.split("\n")[start]).group(0)))
            start = None
    if start is not None:
        raise ValueError(f"'{begin_marker}' on line {start + 1} has no '{end_marker}'")
    return regions


def remove_regions(source: str, kind: str) -> str:
    lines = source.split("\n")
    dropped = {n for region in find_regions(source, kind) for n in range(region.begin, region.end + 1)}
    return "\n".join(line for n, line in enumerate(lines) if n not in dropped)


def replace_solutions(source: str, stub_for: Mapping[int, Sequence[str]]) -> str:
    """Replace each solution region by ``stub_for[region.begin]``, indented like its BEGIN line."""
    lines, result, position = source.split("\n"), [], 0
    for region in find_regions(source, "solution"):
        result += lines[position : region.begin]
        result += [region.indent + line if line else line for line in stub_for[region.begin]]
        position = region.end + 1
    return "\n".join(result + lines[position:])


def _python(source: str) -> ast.Module:
    """Parse a code cell, IPython magics (``%pip``, ``!ls``) turned into Python first."""
    from IPython.core.inputtransformer2 import TransformerManager

    return ast.parse(TransformerManager().transform_cell(source))


def _bound_names(statements: Sequence[ast.stmt]) -> set[str]:
    """Names that top-level ``statements`` bind (assignments, defs, imports, loop targets, ...)."""
    names: set[str] = set()
    for statement in statements:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(statement.name)
            continue
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
            continue
        names |= _stored_names(statement)
    return names


_OWN_SCOPE = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)


def _stored_names(node: ast.AST) -> set[str]:
    """Names that ``node`` stores in the enclosing scope: comprehension and lambda variables stay inside
    their own scope (only an ``:=`` in a comprehension reaches out)."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return {node.id}
    if isinstance(node, _OWN_SCOPE):
        return {n.target.id for n in ast.walk(node) if isinstance(n, ast.NamedExpr)}
    return set().union(*(_stored_names(child) for child in ast.iter_child_nodes(node)))


def _inside_function(tree: ast.Module, line: int) -> bool:
    """Whether 1-based ``line`` lies in the body of a function defined in ``tree``."""
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body[0].lineno <= line <= (node.end_lineno or node.lineno)
        for node in ast.walk(tree)
    )


def solution_stubs(
    source: str, names_before: set[str], filled: str | None = None
) -> tuple[dict[int, Sequence[str]], list[str]]:
    """The stub for each solution region of a code cell, and the problems that would stop it running.

    Inside a function body: nbgrader's ``raise NotImplementedError()`` stub. At the top level of the
    cell: a comment only, and the region may bind only names bound before it (``names_before`` holds the
    names earlier cells bind). ``filled`` replaces every region instead (a given answer, for tests).
    """
    regions = find_regions(source, "solution")
    if filled is not None:
        return {region.begin: filled.split("\n") for region in regions}, []
    try:
        tree = _python(source)
    except SyntaxError as error:
        return {}, [f"the cell is not valid Python ({error.msg}, line {error.lineno})"]
    lines, stubs, problems = source.split("\n"), {}, []
    for region in regions:
        body = lines[region.begin + 1 : region.end]
        code_lines = [
            n
            for n, line in enumerate(body, start=region.begin + 2)
            if line.strip() and not line.strip().startswith("#")
        ]
        first_line = code_lines[0] if code_lines else region.begin + 1
        if _inside_function(tree, first_line):
            stubs[region.begin] = CODE_STUB
            continue
        stubs[region.begin] = (TOP_LEVEL_STUB,)
        if region.indent:
            problems.append(
                f"the solution region on line {region.begin + 1} is indented but not in a function body: its "
                "stub would leave an empty block. Put the region inside a function, or at the top level"
            )
            continue
        try:
            before = _python("\n".join(lines[: region.begin]))
            inside = _python(textwrap.dedent("\n".join(body)))
        except SyntaxError:
            problems.append(f"the solution region on line {region.begin + 1} must hold whole statements")
            continue
        unbound = sorted(_bound_names(inside.body) - _bound_names(before.body) - names_before)
        if unbound:
            problems.append(
                f"the top-level solution region on line {region.begin + 1} binds {', '.join(unbound)}, which the "
                f"student edition would leave undefined: set a starting value before the region (e.g. "
                f"`{unbound[0]} = None`) or put the region inside a function body"
            )
    return stubs, problems


# ------------------------------------------------------------------------------------------------ checking


def marking_problems(notebook: NotebookNode) -> list[str]:
    """Every problem with a notebook's nbgrader marking, each naming the cell and the fix."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    names_before: set[str] = set()
    for index, cell in enumerate(notebook.cells):
        meta = cell.get("metadata", {}).get("nbgrader")
        where = f"cell {index} ({cell.cell_type})"
        regions: dict[str, list[Region]] = {}
        unbalanced = False
        for kind in REGIONS:
            try:
                regions[kind] = find_regions(cell.source, kind)
            except ValueError as error:
                problems.append(f"{where}: unbalanced {kind} markers: {error}")
                regions[kind], unbalanced = [], True
        if meta is None:
            for kind, role in (
                ("solution", "an answer"),
                ("hidden tests", "a test"),
                ("mark scheme", "a task"),
            ):
                if regions[kind]:
                    problems.append(
                        f"{where}: a {kind} region in a cell without nbgrader metadata: make it {role} cell"
                    )
            if cell.cell_type == "code":
                names_before |= _names_or_nothing(cell.source)
            continue
        grade_id = meta.get("grade_id")
        if grade_id:
            where += f" '{grade_id}'"
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            problems.append(f"{where}: nbgrader schema_version must be {SCHEMA_VERSION}, got {version!r}")
        for flag in ("grade", "solution", "locked"):
            if not isinstance(meta.get(flag), bool):
                problems.append(
                    f"{where}: nbgrader metadata needs '{flag}': true or false, got {meta.get(flag)!r}"
                )
        if "task" in meta and not isinstance(meta["task"], bool):
            problems.append(f"{where}: 'task' must be true or false, got {meta['task']!r}")
        unknown = sorted(set(meta) - METADATA_KEYS)
        if unknown:
            problems.append(
                f"{where}: unknown nbgrader metadata keys {unknown} (schema 3 allows {sorted(METADATA_KEYS)})"
            )
        if has_grade_id(cell):
            if not isinstance(grade_id, str) or not GRADE_ID.match(grade_id):
                problems.append(
                    f"{where}: needs a grade_id of letters, digits, '-' and '_' (e.g. 'hinton-kd-loss'), "
                    f"got {grade_id!r}"
                )
            elif grade_id in seen:
                problems.append(f"{where}: grade_id {grade_id!r} is already used by cell {seen[grade_id]}")
            else:
                seen[grade_id] = index
        if is_grade(cell) or is_task(cell):
            points = meta.get("points")
            if isinstance(points, bool) or not isinstance(points, (int, float)) or points < 0:
                problems.append(f"{where}: a graded cell needs 'points', a number >= 0, got {points!r}")
        if is_task(cell) and cell.cell_type != "markdown":
            problems.append(f"{where}: a task cell must be markdown")
        if cell.cell_type == "markdown" and not is_task(cell) and is_grade(cell) != is_solution(cell):
            problems.append(
                f"{where}: a graded markdown cell must be both 'grade' and 'solution' (a written answer)"
            )
        if regions["solution"] and not is_solution(cell):
            problems.append(
                f"{where}: a solution region in a cell that is not a solution cell: set 'solution': true"
            )
        if regions["hidden tests"] and not is_grade(cell):
            problems.append(
                f"{where}: hidden tests in a cell that is not graded: set 'grade': true and 'points'"
            )
        if regions["mark scheme"] and not is_task(cell):
            problems.append(f"{where}: a mark scheme region in a cell that is not a task: set 'task': true")
        if (
            cell.cell_type == "code"
            and is_grade(cell)
            and not is_solution(cell)
            and "assert" not in cell.source
        ):
            problems.append(
                f"{where}: this test cell can never lose points: end its hidden tests with "
                "`check_...(...).assert_passed()` (or another assert)"
            )
        if cell.cell_type == "code" and is_solution(cell) and not unbalanced:
            if not regions["solution"]:
                problems.append(
                    f"{where}: mark the solution between '### BEGIN SOLUTION' and '### END SOLUTION' lines: a "
                    "whole-cell stub would stop the student edition from running top to bottom"
                )
            _, stub_problems = solution_stubs(cell.source, names_before)
            problems += [f"{where}: {problem}" for problem in stub_problems]
        if cell.cell_type == "code":
            names_before |= _names_or_nothing(cell.source)
    return problems + _shown_solutions(notebook)


#: A solution line at least this long that another cell shows gives the answer away.
SHOWN_LINE_MIN_CHARS = 20


def _shown_solutions(notebook: NotebookNode) -> list[str]:
    """Cells that show a line of a solution in the student edition (e.g. a worked answer in Markdown)."""
    visible, solutions = {}, {}
    for index, cell in enumerate(notebook.cells):
        try:
            regions = find_regions(cell.source, "solution")
            text = cell.source
            for kind in REGIONS:
                text = remove_regions(text, kind)
        except ValueError:
            continue  # reported with the cell
        visible[index] = text
        lines = cell.source.split("\n")
        solutions[index] = [
            line.strip()
            for region in regions
            for line in lines[region.begin + 1 : region.end]
            if len(line.strip()) >= SHOWN_LINE_MIN_CHARS and not line.strip().startswith("#")
        ]
    problems = []
    for owner, solution in solutions.items():
        for index, text in visible.items():
            shown = next((line for line in solution if line in text), None)
            if shown is not None:
                problems.append(
                    f"cell {index} ({notebook.cells[index].cell_type}) shows {shown!r}, a line of the solution "
                    f"in cell {owner}: the student edition would give the answer away. Remove it from cell {index}"
                )
    return problems


def _names_or_nothing(source: str) -> set[str]:
    try:
        return _bound_names(_python(source).body)
    except SyntaxError:
        return set()


def check_marking(notebook: NotebookNode, name: str) -> None:
    """Raise :class:`MarkingError` listing every marking problem of ``notebook`` (called ``name``)."""
    problems = marking_problems(notebook)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise MarkingError(f"{name}: the nbgrader marking has {len(problems)} problem(s):\n{listed}")


# ------------------------------------------------------------------------------------------------ editions


def clear_outputs(notebook: NotebookNode) -> NotebookNode:
    """nbgrader's ClearOutput, and the saved widget state (an output too)."""
    notebook, _ = ClearOutput().preprocess(notebook, {})
    notebook.metadata.pop("widgets", None)
    return notebook


def committed_form(notebook: NotebookNode) -> NotebookNode:
    """A notebook as it is committed: outputs cleared, and its ``language_info`` what this environment's
    kernel reports, which is what JupyterLab writes into the file on opening. A notebook without it would be
    marked modified as soon as it is opened (and rewritten by autosave before any cell runs)."""
    from ipykernel.ipkernel import IPythonKernel

    notebook = clear_outputs(notebook)
    notebook.metadata["language_info"] = nbformat.from_dict(copy.deepcopy(IPythonKernel.language_info))
    return notebook


def instructor_edition(notebook: NotebookNode, name: str = "notebook") -> NotebookNode:
    """The instructor's notebook as nbgrader's ``source/`` holds it: checked, outputs cleared."""
    check_marking(notebook, name)
    return clear_outputs(copy.deepcopy(notebook))


def student_edition(
    notebook: NotebookNode, name: str = "notebook", filled: Mapping[str, str] | None = None
) -> NotebookNode:
    """What ``nbgrader generate_assignment`` releases, made by nbgrader's own preprocessors in its order
    (solutions stubbed by :class:`RunnableClearSolutions`, hidden tests and mark schemes removed, outputs
    cleared, cells locked, checksums computed), with the saved widget state cleared too.

    ``filled`` maps an answer cell's ``grade_id`` to code that replaces its stub (indented like it): a
    student's answer, e.g. a known wrong one for a test.
    """
    check_marking(notebook, name)
    student = copy.deepcopy(notebook)
    student.metadata.pop("celltoolbar", None)
    resources: dict[str, Any] = {"language": "python"}
    for step in (LockCells, RunnableClearSolutions, ClearOutput, CheckCellMetadata, ComputeChecksums,
                 ClearHiddenTests, ClearMarkScheme, ComputeChecksums, CheckCellMetadata):  # fmt: skip
        student, resources = step().preprocess(student, resources)
    student.metadata.pop("widgets", None)
    if filled:
        _fill(student, dict(filled), name)
    return student


def _fill(student: NotebookNode, answers: dict[str, str], name: str) -> None:
    """Put ``answers`` (grade id -> code) in place of the stubs of their answer cells."""
    stub_lines = (TOP_LEVEL_STUB, "raise NotImplementedError()")
    for cell in student.cells:
        answer = answers.pop(grader_metadata(cell).get("grade_id", ""), None)
        if answer is None or not is_solution(cell):
            continue
        if cell.cell_type != "code":
            cell.source = answer
            continue
        lines, result = cell.source.split("\n"), []
        for line in lines:
            if line.strip() == TOP_LEVEL_STUB:
                indent = line[: len(line) - len(line.lstrip())]
                result += [
                    indent + answer_line if answer_line else answer_line for answer_line in answer.split("\n")
                ]
            elif line.strip() not in stub_lines:
                result.append(line)
        cell.source = "\n".join(result)
    if answers:
        raise KeyError(f"{name}: no answer cell has grade_id {sorted(answers)}")


def with_answers(notebook: NotebookNode, answers: Mapping[str, str], name: str = "notebook") -> NotebookNode:
    """The instructor edition with the solution regions of some answer cells replaced by ``answers`` (grade id
    -> code), hidden tests kept: what ``nbgrader autograde`` executes for a submission with those answers
    (it copies the hidden tests back into every locked cell)."""
    check_marking(notebook, name)
    graded = clear_outputs(copy.deepcopy(notebook))
    remaining = dict(answers)
    for cell in graded.cells:
        answer = remaining.pop(grader_metadata(cell).get("grade_id", ""), None)
        if answer is not None:
            cell.source = replace_solutions(
                cell.source,
                {region.begin: answer.split("\n") for region in find_regions(cell.source, "solution")},
            )
    if remaining:
        raise KeyError(f"{name}: no answer cell has grade_id {sorted(remaining)}")
    return graded


# ------------------------------------------------------------------------------------------------ layout


NBGRADER_CONFIG = """\
\"\"\"nbgrader settings for this course folder, written by kdbook's scripts/editions.py.\"\"\"

import sys
from pathlib import Path

from nbgrader.converters import GenerateAssignment
from nbgrader.preprocessors import ClearSolutions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbgrader_stubs import RunnableClearSolutions  # noqa: E402 (kdbook's runnable stubs, copied here)

c = get_config()  # noqa: F821 (nbgrader provides it)

# The lessons train small networks: give each cell as long as scripts/execute_notebooks.py does
# (nbgrader's default is 30 s). Export KDBOOK_PRESET (quick, lab, paper) before autograding.
c.Execute.timeout = {timeout}
c.GenerateAssignment.preprocessors = [
    RunnableClearSolutions if step is ClearSolutions else step
    for step in GenerateAssignment.class_traits()["preprocessors"].default()
]
"""


def prepare_output(out: Path) -> None:
    """Make ``out`` ready: refuse a non-empty folder this command did not make, clear the ones it did."""
    if out.exists() and any(out.iterdir()) and not (out / STAMP).is_file():
        raise FileExistsError(
            f"{out} is not empty and was not written by scripts/editions.py: choose another --out or empty it"
        )
    out.mkdir(parents=True, exist_ok=True)
    for folder in OWNED_FOLDERS:
        shutil.rmtree(out / folder, ignore_errors=True)
    (out / STAMP).write_text(
        "written by scripts/editions.py; generate replaces student/ source/ release/ zips/\n"
    )


def generate(
    paths: Sequence[Path], out: Path, *, zips: bool = False, timeout: int = DEFAULT_TIMEOUT_S
) -> list[Path]:
    """Write the student edition, nbgrader's source/ and release/ layout (and zips) for ``paths``.

    Every notebook is checked before anything is written; returns the files written.
    """
    notebooks = {path: read_notebook(path) for path in paths}
    failures = []
    for path, notebook in notebooks.items():
        try:
            check_marking(notebook, path.name)
        except MarkingError as error:
            failures.append(str(error))
    if failures:
        raise MarkingError("\n".join(failures))
    prepare_output(out)
    written: list[Path] = []

    def write(notebook: NotebookNode, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
        written.append(target)

    for path, notebook in notebooks.items():
        student = student_edition(notebook, path.name)
        write(student, out / "student" / path.name)
        if not is_marked(notebook):
            continue
        assignment = path.stem
        write(instructor_edition(notebook, path.name), out / "source" / assignment / path.name)
        write(student, out / "release" / assignment / path.name)
        if zips:
            archive = out / "zips" / f"{assignment}.zip"
            archive.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
                bundle.write(out / "student" / path.name, f"{assignment}/{path.name}")
            written.append(archive)
    config = out / "nbgrader_config.py"
    config.write_text(NBGRADER_CONFIG.format(timeout=timeout))
    shutil.copy(Path(__file__).with_name("nbgrader_stubs.py"), out / "nbgrader_stubs.py")
    written += [config, out / "nbgrader_stubs.py"]
    return written


def publish(paths: Sequence[Path], folder: Path = PUBLISHED) -> list[Path]:
    """Write the student edition of every notebook into ``folder`` (``notebooks/student/``), the copies that
    Colab, Binder and the book's launch buttons open, and remove copies of notebooks that no longer exist.
    The instructor's notebooks in ``notebooks/`` stay nbgrader's source; both are written in
    :func:`committed_form`."""
    notebooks = {path: read_notebook(path) for path in paths}
    for path, notebook in notebooks.items():
        check_marking(notebook, path.name)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path, notebook in notebooks.items():
        nbformat.write(committed_form(copy.deepcopy(notebook)), path)
        target = folder / path.name
        nbformat.write(committed_form(student_edition(notebook, path.name)), target)
        written.append(target)
    names = {path.name for path in paths}
    for stale in folder.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()
    return written


def read_notebook(path: Path) -> NotebookNode:
    """A notebook file, or a :class:`MarkingError` that names the file and what is wrong with it."""
    try:
        return nbformat.read(path, as_version=4)
    except (OSError, ValueError, nbformat.reader.NotJSONError, nbformat.ValidationError) as error:
        raise MarkingError(
            f"{path}: cannot read it as a notebook ({type(error).__name__}: {error}). Restore it from the "
            "repository (git checkout -- <file>) or export it again from Jupyter."
        ) from error


# ------------------------------------------------------------------------------------------------ grading


@dataclass(frozen=True)
class CellGrade:
    """One graded cell: ``points`` is None while a person still has to grade it."""

    grade_id: str
    kind: str  # "autograded", "manual" or "task"
    points: float | None
    max_points: float
    feedback: str
    cell_index: int | None


@dataclass
class Grading:
    """The grades of one notebook, and the notebook as executed for grading."""

    notebook: str
    cells: list[CellGrade]
    graded: NotebookNode = field(repr=False)

    @property
    def points(self) -> float:
        return sum(cell.points or 0.0 for cell in self.cells)

    @property
    def max_points(self) -> float:
        return sum(cell.max_points for cell in self.cells)

    def by_id(self) -> dict[str, CellGrade]:
        return {cell.grade_id: cell for cell in self.cells}

    def table(self, width: int = 100) -> str:
        """A plain-text table: grade id, points, max points, feedback (cut to ``width`` characters)."""
        id_width = max([len("grade id"), *(len(cell.grade_id) for cell in self.cells)])
        lines = [f"{self.notebook}", f"{'grade id'.ljust(id_width)}  points     max  feedback"]
        for cell in self.cells:
            points = "manual" if cell.points is None else f"{cell.points:g}"
            feedback = " ".join(cell.feedback.split())
            feedback = feedback if len(feedback) <= width else feedback[: width - 1] + "\u2026"
            lines.append(f"{cell.grade_id.ljust(id_width)}  {points:>6}  {cell.max_points:>6g}  {feedback}")
        manual = sum(cell.points is None for cell in self.cells)
        note = f"  ({manual} cell(s) to grade by hand)" if manual else ""
        lines.append(f"{'total'.ljust(id_width)}  {self.points:>6g}  {self.max_points:>6g}{note}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "notebook": self.notebook,
            "points": self.points,
            "max_points": self.max_points,
            "cells": [dataclasses.asdict(cell) for cell in self.cells],
        }


def _feedback(cell: NotebookNode) -> str:
    """What a graded cell showed: the check's failure (an AssertionError carries its feedback), another
    error, text on stderr, or what it displayed."""
    for output in cell.get("outputs", []):
        if output.output_type == "error":
            if output.ename == "AssertionError" and output.evalue:
                return output.evalue
            return f"{output.ename}: {output.evalue}" if output.evalue else output.ename
        if output.output_type == "stream" and output.name == "stderr":
            return f"wrote to stderr: {output.text.strip()}"
    shown = []
    for output in cell.get("outputs", []):
        if output.output_type in ("display_data", "execute_result"):
            text = output.get("data", {}).get("text/plain", "")
            shown.append("".join(text) if isinstance(text, list) else str(text))
    return "\n".join(shown).strip() or "passed"


def grade_executed(notebook: NotebookNode, name: str = "notebook") -> Grading:
    """The grades of an executed notebook that holds its hidden tests (the instructor edition, or what
    ``nbgrader autograde`` executed), cell by cell with nbgrader's own ``determine_grade``. A test cell the
    kernel never reached scores zero."""
    cells = []
    for index, cell in enumerate(notebook.cells):
        if not (is_grade(cell) or is_task(cell)):
            continue
        grade_id, max_points = grader_metadata(cell)["grade_id"], float(grader_metadata(cell)["points"])
        if is_task(cell) and not is_grade(cell):
            cells.append(
                CellGrade(grade_id, "task", None, max_points, "to grade by hand with the rubric", index)
            )
            continue
        if cell.cell_type == "code" and not is_solution(cell) and cell.get("execution_count") is None:
            cells.append(CellGrade(grade_id, "autograded", 0.0, max_points, "not run (the kernel stopped before it)",
                                   index))  # fmt: skip
            continue
        points, _ = determine_grade(cell)
        kind = "autograded" if cell.cell_type == "code" and not is_solution(cell) else "manual"
        feedback = _feedback(cell) if kind == "autograded" else "to grade by hand with the rubric"
        cells.append(
            CellGrade(grade_id, kind, None if points is None else float(points), max_points, feedback, index)
        )
    return Grading(name, cells, notebook)


def grade(
    submission: Path, instructor: Path, *, preset: str = "quick", timeout: int = DEFAULT_TIMEOUT_S
) -> Grading:
    """Grade a submitted notebook with nbgrader itself: a course folder is made in a temporary folder (the
    instructor's notebook as the assignment's source), ``nbgrader generate_assignment`` and ``nbgrader
    autograde`` run there (``KDBOOK_PRESET=preset``, ``timeout`` s per cell), and the grades are read from
    the notebook nbgrader autograded."""
    bin_folder = Path(sys.executable).parent
    if not (bin_folder / "nbgrader").is_file():
        raise FileNotFoundError(
            f"nbgrader is not installed next to {sys.executable}: pip install -e '.[instructor]'"
        )
    read_notebook(submission)  # a damaged submission is named before nbgrader starts
    assignment, student = instructor.stem, "student"
    with tempfile.TemporaryDirectory(prefix="kdbook-grade-") as folder:
        course = Path(folder)
        generate([instructor], course, timeout=timeout)
        submitted = course / "submitted" / student / assignment / instructor.name
        submitted.parent.mkdir(parents=True)
        shutil.copy(submission, submitted)
        env = {
            **os.environ,
            "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}",
            "KDBOOK_PRESET": preset,
        }
        for command in (
            ["generate_assignment", assignment, "--force"],
            ["autograde", assignment, "--create"],
        ):
            done = subprocess.run([str(bin_folder / "nbgrader"), *command], cwd=course, env=env, capture_output=True,
                                  text=True, check=False)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"nbgrader {' '.join(command)} failed:\n{done.stderr[-3000:]}")
        autograded = nbformat.read(
            course / "autograded" / student / assignment / instructor.name, as_version=4
        )
    return grade_executed(autograded, submission.name)


def load_executor() -> ModuleType:
    """scripts/execute_notebooks.py, for its kernel set-up (``kernel_for_this_python``)."""
    path = Path(__file__).with_name("execute_notebooks.py")
    name = "kdbook_execute_notebooks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ------------------------------------------------------------------------------------------------ command


def _notebooks(paths: Sequence[Path]) -> list[Path]:
    chosen = [path.resolve() for path in paths] or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [str(path) for path in chosen if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"not found: {', '.join(missing)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="write the student edition and nbgrader's course layout")
    make.add_argument(
        "notebooks", nargs="*", type=Path, help="instructor notebooks (default: notebooks/*.ipynb)"
    )
    make.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    make.add_argument(
        "--zip", action="store_true", help="also write zips/<lesson>.zip of the student edition"
    )
    make.add_argument(
        "--timeout", type=int, default=DEFAULT_TIMEOUT_S, help="seconds per cell in nbgrader_config.py"
    )
    commands.add_parser(
        "publish",
        help="write the student editions into notebooks/student/ and every notebook in the form it is committed in",
    )
    check = commands.add_parser("check", help="check the nbgrader marking only")
    check.add_argument(
        "notebooks", nargs="*", type=Path, help="instructor notebooks (default: notebooks/*.ipynb)"
    )
    mark = commands.add_parser("grade", help="autograde submitted notebooks as nbgrader autograde does")
    mark.add_argument("submissions", nargs="+", type=Path, help="submitted notebooks")
    mark.add_argument(
        "--source", type=Path, help="the instructor's notebook (default: notebooks/<same name>)"
    )
    mark.add_argument(
        "--preset", default=os.environ.get("KDBOOK_PRESET", "quick"), help="KDBOOK_PRESET value"
    )
    mark.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, help="seconds allowed per cell")
    mark.add_argument("--json", type=Path, help="write the grades of every submission to this JSON file")
    mark.add_argument("--graded", type=Path, help="folder for the executed, graded notebooks")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            for path in _notebooks(args.notebooks):
                notebook = read_notebook(path)
                check_marking(notebook, path.name)
                cells = [c for c in notebook.cells if has_grade_id(c)]
                points = sum(
                    float(grader_metadata(c).get("points", 0)) for c in cells if is_grade(c) or is_task(c)
                )
                print(f"{path.name}: {len(cells)} marked cell(s), {points:g} point(s)")
            return 0
        if args.command == "publish":
            for path in publish(_notebooks([])):
                print(path.relative_to(ROOT))
            return 0
        if args.command == "generate":
            paths = _notebooks(args.notebooks)
            written = generate(paths, args.out.resolve(), zips=args.zip, timeout=args.timeout)
            for path in written:
                print(path.relative_to(args.out.resolve()))
            for path in paths:
                if not is_marked(read_notebook(path)):
                    print(f"note: {path.name} has no nbgrader cells: copied to student/ as it is")
            print(f"{len(written)} file(s) in {args.out}")
            return 0
        results = []
        for submission in args.submissions:
            source = args.source or NOTEBOOKS / submission.name
            if not source.is_file():
                raise FileNotFoundError(
                    f"no instructor version for {submission.name} at {source}: pass --source"
                )
            grading = grade(submission, source.resolve(), preset=args.preset, timeout=args.timeout)
            print(grading.table(), end="\n\n")
            results.append(grading.to_json())
            if args.graded:
                args.graded.mkdir(parents=True, exist_ok=True)
                nbformat.write(grading.graded, args.graded / submission.name)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0
    except (MarkingError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
