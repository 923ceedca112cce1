"""The instructor's kit (scripts/editions.py): nbgrader marking, the student edition made by nbgrader's own
preprocessors, the course layout, grading with nbgrader, and the real exercise checks of
kdbook_utils.exercises.

Three editions of a notebook are executed once each and graded with nbgrader's ``determine_grade``: the
instructor edition gets full marks; the unfilled student edition (with its hidden tests put back, as
nbgrader's autograde does) gets zero on every exercise and fails nowhere else; every exercise filled in with
a mistake its checker knows loses its marks, with the checker's feedback. A small synthetic notebook makes
this take seconds. For the real notebooks (tests marked ``notebook``) the instructor and wrong-answer
editions run in ``$KDBOOK_EDITIONS_PRESET`` (default ``smoke``), and the student edition is the one the
notebook tests already executed in ``quick`` for the book.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
GRADING_TIMEOUT_S = 120  # per cell, for the synthetic notebooks


def load_script(name: str) -> ModuleType:
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kdbook_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


editions = load_script("editions")
MarkingError = editions.MarkingError


# ------------------------------------------------------------------------------------ a synthetic lesson


def nbgrader(
    grade_id: str,
    *,
    grade: bool = False,
    solution: bool = False,
    locked: bool = False,
    points: float | None = None,
    task: bool = False,
) -> dict[str, Any]:
    meta = {
        "schema_version": 3,
        "grade": grade,
        "solution": solution,
        "locked": locked,
        "task": task,
        "grade_id": grade_id,
    }
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


KD_LOSS_SOLUTION = """\
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2"""


def answer_cell(grade_id: str, source: str) -> nbformat.NotebookNode:
    return new_code_cell(source, metadata=nbgrader(grade_id, solution=True))


def checking_cell(grade_id: str, check: str, points: float) -> nbformat.NotebookNode:
    source = f"{check}\n### BEGIN HIDDEN TESTS\n{check}.assert_passed()\n### END HIDDEN TESTS"
    return new_code_cell(source, metadata=nbgrader(grade_id, grade=True, locked=True, points=points))


def synthetic_lesson() -> nbformat.NotebookNode:
    """A lesson in miniature with two of lesson 1's exercises: a function to write (2 points), a function
    to write at the top level of a cell (1 point), a written answer for the rubric, a read-only cell, and
    cells after the exercises."""
    cells = [
        new_markdown_cell("# A lesson in miniature"),
        new_code_cell(
            "import torch\nfrom torch.nn import functional as F\n"
            "from kdbook_utils.exercises.hinton import check_high_temperature_limit, check_kd_loss"
        ),
        new_code_cell("TEMPERATURE = 4.0  # the lesson's setting", metadata=nbgrader("settings", locked=True)),
        new_markdown_cell("## Exercise 1: write the KD loss"),
        answer_cell(
            "kd-loss-answer",
            "def my_kd_loss(student_logits, teacher_logits, temperature):\n"
            f"    ### BEGIN SOLUTION\n{KD_LOSS_SOLUTION}\n    ### END SOLUTION",
        ),
        checking_cell("hinton-kd-loss", "check_kd_loss(my_kd_loss)", 2),
        new_markdown_cell("## Exercise 2: derive the limit at a very high temperature"),
        answer_cell(
            "high-temperature-answer",
            "my_limit = None  # a function of (student_logits, teacher_logits)\n"
            f"### BEGIN SOLUTION\nmy_limit = {LIMIT_SOLUTION}\n### END SOLUTION",
        ),
        checking_cell("hinton-high-temperature", "check_high_temperature_limit(my_limit)", 1),
        new_markdown_cell(
            "### BEGIN SOLUTION\nAt high T the soft targets carry the teacher's logit differences.\n### END SOLUTION",
            metadata=nbgrader("why-high-temperature", grade=True, solution=True, points=1),
        ),
        new_code_cell("probabilities = torch.randn(4, 10).softmax(dim=1)\nprint('after the exercises:', probabilities.shape)"),
    ]  # fmt: skip
    for number, cell in enumerate(cells):
        cell.id = f"cell-{number}"  # fixed ids, so that two copies compare equal
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


LIMIT_SOLUTION = (
    "lambda z, v: ((z - z.mean(1, keepdim=True)) - (v - v.mean(1, keepdim=True))).pow(2).sum(1).mean()"
    " / (2 * z.shape[1])"
)
KD_LOSS_WITHOUT_T_SQUARED = """\
log_q = F.log_softmax(student_logits / temperature, dim=1)
p = F.softmax(teacher_logits / temperature, dim=1)
return F.kl_div(log_q, p, reduction="batchmean")"""

#: For each answer cell: a mistake its checker knows, the test cell that grades it, and the feedback.
WRONG_ANSWERS: dict[str, tuple[str, str, str]] = {
    "kd-loss-answer": (KD_LOSS_WITHOUT_T_SQUARED, "hinton-kd-loss", "You forgot the factor T^2"),
    "high-temperature-answer": ("my_limit = lambda z, v: (z - v).pow(2).sum(1).mean() / (2 * z.shape[1])",
                                "hinton-high-temperature", "centre each image's logits"),
}  # fmt: skip


# ------------------------------------------------------------------------------- the student edition (fast)


def sources(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells]


def test_the_student_edition_stubs_solutions_and_drops_hidden_tests() -> None:
    instructor = synthetic_lesson()
    student = editions.student_edition(instructor)
    answer, test, prediction, written = student.cells[4], student.cells[5], student.cells[7], student.cells[9]
    assert answer.source == (
        "def my_kd_loss(student_logits, teacher_logits, temperature):\n"
        "    # YOUR CODE HERE\n    raise NotImplementedError()"
    ), "inside a function: nbgrader's stub"
    assert prediction.source.endswith("(student_logits, teacher_logits)\n# YOUR CODE HERE"), (
        "top level: no raise"
    )
    assert test.source == "check_kd_loss(my_kd_loss)"
    assert written.source == "YOUR ANSWER HERE"
    joined = "\n".join(sources(student))
    for leaked in ("BEGIN", "END", "assert_passed", "pow(2)", "reduction=", "logit differences"):
        assert leaked not in joined, f"{leaked!r} leaked into the student edition"
    assert sources(instructor)[4].count("BEGIN SOLUTION") == 1, "the instructor's notebook is not modified"
    # Cells without a role are untouched, and every cell keeps its metadata and id.
    assert [sources(student)[i] for i in (0, 1, 10)] == [sources(instructor)[i] for i in (0, 1, 10)]
    assert [cell.id for cell in student.cells] == [cell.id for cell in instructor.cells]


def test_the_student_edition_locks_cells_and_adds_nbgraders_checksums() -> None:
    student = editions.student_edition(synthetic_lesson())
    answer, test, settings = student.cells[4], student.cells[5], student.cells[2]
    assert answer.metadata["deletable"] is False and "editable" not in answer.metadata
    assert test.metadata["deletable"] is False and test.metadata["editable"] is False
    assert settings.metadata["editable"] is False
    meta = test.metadata["nbgrader"]
    assert meta["cell_type"] == "code" and meta["points"] == 2
    # nbgrader's checksum: md5 of source, cell type, the grade/solution/locked flags, the id and the points.
    expected = hashlib.md5(f"{test.source}codeTrueFalseTruehinton-kd-loss2.0".encode()).hexdigest()
    assert meta["checksum"] == expected


def test_the_student_edition_clears_outputs_and_widget_state() -> None:
    instructor = synthetic_lesson()
    instructor.cells[1].outputs = [new_output("stream", name="stdout", text="hello")]
    instructor.cells[1].execution_count = 3
    instructor.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    student = editions.student_edition(instructor)
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert "widgets" not in student.metadata
    assert student.metadata["kernelspec"] == instructor.metadata["kernelspec"]
    nbformat.validate(student)


def test_nbgraders_own_stub_differs_only_at_the_top_level() -> None:
    from nbgrader.preprocessors import ClearSolutions

    instructor = synthetic_lesson()
    stock, resources = copy.deepcopy(instructor), {"language": "python"}
    stock, _ = ClearSolutions().preprocess(stock, resources)
    ours = editions.student_edition(instructor)
    differ = [i for i, (a, b) in enumerate(zip(stock.cells, ours.cells)) if a.source != b.source]
    assert 7 in differ and stock.cells[7].source.endswith("raise NotImplementedError()")
    assert stock.cells[4].source == ours.cells[4].source, "inside a function both stubs are nbgrader's"


def test_filling_an_answer_replaces_its_stub_at_the_stubs_indent() -> None:
    filled = editions.student_edition(synthetic_lesson(), filled={"kd-loss-answer": "x = 1\nreturn x"})
    assert (
        filled.cells[4].source
        == "def my_kd_loss(student_logits, teacher_logits, temperature):\n    x = 1\n    return x"
    )
    top = editions.student_edition(synthetic_lesson(), filled={"high-temperature-answer": "my_limit = abs"})
    assert top.cells[7].source.endswith("(student_logits, teacher_logits)\nmy_limit = abs")
    with pytest.raises(KeyError, match="no-such-cell"):
        editions.student_edition(synthetic_lesson(), filled={"no-such-cell": "pass"})


def test_with_answers_keeps_the_hidden_tests_as_nbgraders_autograde_runs_them() -> None:
    graded = editions.with_answers(synthetic_lesson(), {"kd-loss-answer": "return 0"})
    assert (
        graded.cells[4].source == "def my_kd_loss(student_logits, teacher_logits, temperature):\n    return 0"
    )
    assert "assert_passed" in graded.cells[5].source
    with pytest.raises(KeyError, match="nothing-here"):
        editions.with_answers(synthetic_lesson(), {"nothing-here": "x = 1"})


def test_a_damaged_notebook_is_named_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "03_lesson.ipynb"
    damaged.write_text('{"cells": [')  # cut short
    assert editions.main(["check", str(damaged)]) == 1
    message = capsys.readouterr().err
    assert str(damaged) in message and "git checkout" in message


# ---------------------------------------------------------------------------------- refusing bad marking


def broken(change: str) -> nbformat.NotebookNode:
    notebook = synthetic_lesson()
    answer, test, prediction = notebook.cells[4], notebook.cells[5], notebook.cells[7]
    if change == "no END SOLUTION":
        answer.source = answer.source.replace("    ### END SOLUTION", "")
    elif change == "END before BEGIN":
        answer.source = answer.source.replace("### BEGIN SOLUTION", "# solution")
    elif change == "nested BEGIN":
        answer.source = answer.source.replace("    log_q", "    ### BEGIN SOLUTION\n    log_q")
    elif change == "unbalanced hidden tests":
        test.source = test.source.replace("### END HIDDEN TESTS", "")
    elif change == "no grade_id":
        del test.metadata["nbgrader"]["grade_id"]
    elif change == "bad grade_id":
        test.metadata["nbgrader"]["grade_id"] = "kd loss!"
    elif change == "no points":
        del test.metadata["nbgrader"]["points"]
    elif change == "negative points":
        test.metadata["nbgrader"]["points"] = -1
    elif change == "duplicate grade_id":
        prediction.metadata["nbgrader"]["grade_id"] = "kd-loss-answer"
    elif change == "old schema":
        test.metadata["nbgrader"]["schema_version"] = 2
    elif change == "solution outside an answer cell":
        notebook.cells[1].source += "\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION"
    elif change == "hidden tests outside a test cell":
        notebook.cells[10].metadata = nbgrader("extra", locked=True)
        notebook.cells[10].source += "\n### BEGIN HIDDEN TESTS\nassert True\n### END HIDDEN TESTS"
    elif change == "a test that cannot fail":
        test.source = "check_kd_loss(my_kd_loss)"
    elif change == "a top-level answer without a default":
        prediction.source = prediction.source.replace("my_limit = None  ", "# ")
    elif change == "an indented region outside a function":
        prediction.source = "if True:\n    ### BEGIN SOLUTION\n    x = 1\n    ### END SOLUTION"
    elif change == "a whole-cell solution":
        answer.source = "def my_kd_loss(s, t, T):\n    return s"
    elif change == "a solution shown in another cell":
        notebook.cells[3].source += "\n\n```python\np = F.softmax(teacher_logits / temperature, dim=1)\n```"
    return notebook


BROKEN = {
    "no END SOLUTION": "'BEGIN SOLUTION' on line 2 has no 'END SOLUTION'",
    "END before BEGIN": "'END SOLUTION' on line 6 without a 'BEGIN SOLUTION'",
    "nested BEGIN": "nested",
    "unbalanced hidden tests": "unbalanced hidden tests markers",
    "no grade_id": "needs a grade_id",
    "bad grade_id": "needs a grade_id of letters, digits",
    "no points": "needs 'points'",
    "negative points": "needs 'points', a number >= 0, got -1",
    "duplicate grade_id": "'kd-loss-answer' is already used by cell 4",
    "old schema": "schema_version must be 3, got 2",
    "solution outside an answer cell": "a solution region in a cell without nbgrader metadata",
    "hidden tests outside a test cell": "hidden tests in a cell that is not graded",
    "a test that cannot fail": "can never lose points",
    "a top-level answer without a default": "binds my_limit",
    "an indented region outside a function": "indented but not in a function body",
    "a whole-cell solution": "mark the solution between",
    "a solution shown in another cell": "cell 3 (markdown) shows 'p = F.softmax(teacher_logits / temperature, dim=1)'",
}


def test_comprehension_variables_stay_in_their_scope_but_a_walrus_reaches_out() -> None:
    region = "answer = None\n### BEGIN SOLUTION\n{}\n### END SOLUTION"
    scoped = "answer = [t for t, s in pairs] + list(map(lambda k: k + 1, range(3)))"
    assert editions.solution_stubs(region.format(scoped), {"pairs"})[1] == []
    leaking = "answer = [best := t for t in pairs]"
    assert "binds best" in editions.solution_stubs(region.format(leaking), {"pairs"})[1][0]


@pytest.mark.parametrize("change", list(BROKEN))
def test_bad_marking_is_refused_with_the_cell_and_the_fix(change: str) -> None:
    with pytest.raises(MarkingError, match="lesson.ipynb: the nbgrader marking") as refused:
        editions.student_edition(broken(change), "lesson.ipynb")
    assert BROKEN[change] in str(refused.value)
    assert "cell " in str(refused.value)


def test_generate_refuses_before_writing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "01_good.ipynb", tmp_path / "02_bad.ipynb"
    nbformat.write(synthetic_lesson(), good)
    nbformat.write(broken("no points"), bad)
    out = tmp_path / "editions"
    assert editions.main(["generate", str(good), str(bad), "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert "02_bad.ipynb" in message and "01_good.ipynb" not in message and "needs 'points'" in message
    assert not out.exists()
    assert editions.main(["check", str(bad)]) == 1
    assert editions.main(["check", str(good)]) == 0
    assert "6 marked cell(s), 4 point(s)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- the layout


def test_generate_writes_the_student_edition_nbgraders_layout_and_zips(tmp_path: Path) -> None:
    lesson, plain = tmp_path / "in" / "01_lesson.ipynb", tmp_path / "in" / "00_start.ipynb"
    lesson.parent.mkdir()
    nbformat.write(synthetic_lesson(), lesson)
    nbformat.write(new_notebook(cells=[new_code_cell("print('no exercises here')")]), plain)
    out = tmp_path / "editions"
    assert editions.main(["generate", str(plain), str(lesson), "--out", str(out), "--zip"]) == 0
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert files == [
        ".kdbook-editions", "nbgrader_config.py", "nbgrader_stubs.py", "release/01_lesson/01_lesson.ipynb",
        "source/01_lesson/01_lesson.ipynb", "student/00_start.ipynb", "student/01_lesson.ipynb",
        "zips/01_lesson.zip",
    ]  # fmt: skip
    student = nbformat.read(out / "student" / "01_lesson.ipynb", as_version=4)
    assert student == editions.student_edition(synthetic_lesson())
    assert nbformat.read(out / "release" / "01_lesson" / "01_lesson.ipynb", as_version=4) == student
    source = nbformat.read(out / "source" / "01_lesson" / "01_lesson.ipynb", as_version=4)
    assert "### BEGIN HIDDEN TESTS" in source.cells[5].source
    with zipfile.ZipFile(out / "zips" / "01_lesson.zip") as bundle:
        assert bundle.namelist() == ["01_lesson/01_lesson.ipynb"]
        assert nbformat.reads(bundle.read("01_lesson/01_lesson.ipynb").decode(), as_version=4) == student
    compile((out / "nbgrader_config.py").read_text(), "nbgrader_config.py", "exec")
    # A second run replaces what the first wrote; a folder it did not write is refused.
    lesson.unlink()
    assert editions.main(["generate", str(plain), "--out", str(out)]) == 0
    assert not (out / "release").exists() and (out / "student" / "00_start.ipynb").is_file()
    foreign = tmp_path / "somebody-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert editions.main(["generate", str(plain), "--out", str(foreign)]) == 1
    assert sorted(path.name for path in foreign.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------- grading (no kernel)


def graded_cell(outputs: list[Any], *, executed: bool = True, points: float = 2) -> nbformat.NotebookNode:
    cell = checking_cell("t", "check()", points)
    cell.outputs = outputs
    cell.execution_count = 1 if executed else None
    return cell


@pytest.mark.parametrize(
    ("outputs", "executed", "points", "feedback"),
    [
        ([new_output("display_data", data={"text/plain": "Correct. Fine."})], True, 2, "Correct. Fine."),
        ([], True, 2, "passed"),
        ([new_output("error", ename="AssertionError", evalue="Not yet. Swap them.", traceback=[])], True, 0,
         "Not yet. Swap them."),
        ([new_output("error", ename="NameError", evalue="name 'f' is not defined", traceback=[])], True, 0,
         "NameError: name 'f' is not defined"),
        ([new_output("stream", name="stderr", text="UserWarning: careful\n")], True, 0, "wrote to stderr: UserWarning: careful"),
        ([new_output("execute_result", data={"text/plain": "1.5"}, execution_count=1)], True, 1.5, "1.5"),
        ([], False, 0, "not run (the kernel stopped before it)"),
    ],
)  # fmt: skip
def test_an_executed_notebook_is_graded_with_nbgraders_determine_grade(
    outputs: list[Any], executed: bool, points: float, feedback: str
) -> None:
    notebook = new_notebook(cells=[graded_cell(outputs, executed=executed)])
    (cell,) = editions.grade_executed(notebook).cells
    assert (cell.points, cell.max_points, cell.feedback) == (points, 2.0, feedback)


# ------------------------------------------------------------------------------ grading in a fresh kernel


@pytest.fixture(scope="module")
def course_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for every kernel of this module (teachers trained once, as in a student's session)."""
    patch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("kdbook-cache")
    patch.setenv("KDBOOK_CACHE", str(folder))
    try:
        yield folder
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def kernel_name(course_cache: Path) -> Iterator[str]:
    with editions.load_executor().kernel_for_this_python("quick") as name:
        yield name


def execute(notebook: nbformat.NotebookNode, kernel: str, folder: Path, name: str) -> nbformat.NotebookNode:
    path = folder / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return editions.load_executor().execute_notebook(
        path, kernel_name=kernel, timeout=GRADING_TIMEOUT_S, cwd=folder, allow_errors=True
    )


def as_autograded(
    instructor: nbformat.NotebookNode, submission: nbformat.NotebookNode
) -> nbformat.NotebookNode:
    """What nbgrader's autograde executes for ``submission``: the instructor's locked cells (the hidden
    tests among them) put back."""
    graded = copy.deepcopy(submission)
    originals = {editions.grader_metadata(c).get("grade_id"): c for c in instructor.cells}
    for cell in graded.cells:
        original = originals.get(editions.grader_metadata(cell).get("grade_id"))
        if original is not None and editions.is_locked(original):
            cell.source = original.source
    return graded


@pytest.fixture(scope="module")
def gradings(kernel_name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic lesson executed once per edition and graded: the instructor edition, the unfilled
    student edition with its hidden tests put back, and every exercise filled in with a known mistake."""
    instructor = synthetic_lesson()
    folder = tmp_path_factory.mktemp("grading")
    answers = {answer: code for answer, (code, _, _) in WRONG_ANSWERS.items()}
    runs = {
        "instructor": execute(instructor, kernel_name, folder, "instructor"),
        "student": execute(as_autograded(instructor, editions.student_edition(instructor)), kernel_name, folder,
                           "student"),
        "wrong": execute(editions.with_answers(instructor, answers), kernel_name, folder, "wrong"),
    }  # fmt: skip
    return {name: editions.grade_executed(run, name) for name, run in runs.items()}


def exercise_ids(notebook: nbformat.NotebookNode) -> list[str]:
    return [
        editions.grader_metadata(cell)["grade_id"]
        for cell in notebook.cells
        if editions.is_grade(cell) and cell.cell_type == "code" and not editions.is_solution(cell)
    ]


def errors_outside_test_cells(graded: nbformat.NotebookNode) -> list[str]:
    return [
        f"cell {index}: {output.ename}: {output.evalue}"
        for index, cell in enumerate(graded.cells)
        if cell.cell_type == "code" and not editions.is_grade(cell)
        for output in cell.outputs
        if output.output_type == "error"
    ]


def test_the_instructor_edition_gets_full_marks(gradings: dict[str, Any]) -> None:
    grading = gradings["instructor"]
    autograded = [cell for cell in grading.cells if cell.kind == "autograded"]
    assert [(cell.grade_id, cell.points, cell.max_points) for cell in autograded] == [
        ("hinton-kd-loss", 2.0, 2.0),
        ("hinton-high-temperature", 1.0, 1.0),
    ]
    assert all(cell.feedback.startswith("Correct.") for cell in autograded), grading.table()
    (written,) = [cell for cell in grading.cells if cell.kind == "manual"]
    assert (written.grade_id, written.points, written.max_points) == ("why-high-temperature", None, 1.0)
    assert errors_outside_test_cells(grading.graded) == []
    assert "total" in grading.table() and "(1 cell(s) to grade by hand)" in grading.table()


def test_the_student_edition_gets_zero_marks_and_fails_nowhere_else(gradings: dict[str, Any]) -> None:
    grading = gradings["student"]
    assert grading.points == 0 and grading.max_points == 4, grading.table()
    for cell in grading.cells:
        if cell.kind == "autograded":
            assert cell.feedback.startswith("Not done yet."), (cell.grade_id, cell.feedback)
    assert errors_outside_test_cells(grading.graded) == []
    assert "after the exercises: torch.Size([4, 10])" in json.dumps(grading.graded.cells[-1].outputs)


@pytest.mark.parametrize("answer", list(WRONG_ANSWERS))
def test_a_known_wrong_answer_loses_its_marks_with_the_checkers_feedback(
    gradings: dict[str, Any], answer: str
) -> None:
    _, test_id, feedback = WRONG_ANSWERS[answer]
    grading = gradings["wrong"].by_id()
    assert grading[test_id].points == 0 and grading[test_id].max_points > 0
    assert grading[test_id].feedback.startswith("Not yet.") and feedback in grading[test_id].feedback
    assert errors_outside_test_cells(gradings["wrong"].graded) == []


def test_the_student_edition_runs_top_to_bottom_unfilled(kernel_name: str, tmp_path: Path) -> None:
    """Run as a student would (no hidden tests): no error anywhere, and each check says "not done yet"."""
    executed = execute(editions.student_edition(synthetic_lesson()), kernel_name, tmp_path, "lesson")
    assert errors_outside_test_cells(executed) == [] and not [
        o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    for grade_id in exercise_ids(executed):
        (cell,) = [c for c in executed.cells if editions.grader_metadata(c).get("grade_id") == grade_id]
        (shown,) = [output for output in cell.outputs if output.output_type == "execute_result"]
        assert shown.data["text/plain"].startswith("Not done yet."), grade_id
        assert "Not done yet." in shown.data["text/html"]


# ---------------------------------------------------------------------------- grading with nbgrader itself


def nbgrader_or_skip() -> ModuleType:
    return pytest.importorskip(
        "nbgrader", reason="nbgrader is not installed (pip install -e '.[instructor]')"
    )


def test_nbgrader_accepts_our_metadata() -> None:
    nbgrader_or_skip()
    from nbgrader.nbgraderformat import MetadataValidator

    MetadataValidator().validate_nb(editions.student_edition(synthetic_lesson()))
    MetadataValidator().validate_nb(synthetic_lesson())


@pytest.mark.timeout(300)
def test_the_grade_command_grades_with_nbgrader_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """nbgrader generate_assignment and autograde, run by the grade command: its release is our student
    edition, and a submission with a right and a wrong answer gets the marks and the checker's feedback."""
    nbgrader_or_skip()
    if not (Path(sys.executable).parent / "nbgrader").is_file():
        pytest.skip("the nbgrader command is not installed next to this Python")
    instructor, submission = tmp_path / "lesson.ipynb", tmp_path / "submitted" / "lesson.ipynb"
    submission.parent.mkdir()
    nbformat.write(synthetic_lesson(), instructor)
    filled = {"kd-loss-answer": textwrap.dedent(KD_LOSS_SOLUTION), "high-temperature-answer":
              WRONG_ANSWERS["high-temperature-answer"][0]}  # fmt: skip
    nbformat.write(editions.student_edition(synthetic_lesson(), filled=filled), submission)
    code = editions.main(["grade", str(submission), "--source", str(instructor), "--preset", "smoke",
                          "--json", str(tmp_path / "g.json"), "--graded", str(tmp_path / "graded")])  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "hinton-kd-loss                2       2  Correct." in table
    assert "hinton-high-temperature       0       1  Not yet." in table
    assert "why-high-temperature          0       1" in table  # unanswered: nbgrader scores it zero
    (result,) = json.loads((tmp_path / "g.json").read_text())
    assert (result["points"], result["max_points"]) == (2.0, 4.0)
    feedback = {cell["grade_id"]: cell["feedback"] for cell in result["cells"]}
    assert "centre each image's logits" in feedback["hinton-high-temperature"]
    graded = nbformat.read(tmp_path / "graded" / "lesson.ipynb", as_version=4)
    assert "assert_passed" in graded.cells[5].source, "graded with the hidden tests put back"


def test_the_course_configuration_makes_the_same_student_edition(tmp_path: Path) -> None:
    """nbgrader_config.py, as generate writes it, gives nbgrader our runnable stubs."""
    nbgrader_or_skip()
    lesson = tmp_path / "in" / "demo.ipynb"
    lesson.parent.mkdir()
    nbformat.write(synthetic_lesson(), lesson)
    course = tmp_path / "course"
    editions.generate([lesson], course)
    namespace: dict[str, Any] = {
        "get_config": lambda: _Config(),
        "__file__": str(course / "nbgrader_config.py"),
    }
    exec(compile((course / "nbgrader_config.py").read_text(), "nbgrader_config.py", "exec"), namespace)  # noqa: S102
    steps = namespace["c"].GenerateAssignment.preprocessors
    assert any(getattr(step, "__name__", "") == "RunnableClearSolutions" for step in steps)


class _Config:
    """Enough of traitlets' config object for executing nbgrader_config.py outside nbgrader."""

    def __getattr__(self, name: str) -> Any:
        value = _Config()
        object.__setattr__(self, name, value)
        return value


# ------------------------------------------------------------------------------------- the real notebooks


MARKED = [path for path in NOTEBOOKS if editions.is_marked(nbformat.read(path, as_version=4))]

#: For each answer cell of the real notebooks: a mistake its checker knows, its test cell, the feedback.
NOTEBOOK_WRONG_ANSWERS: dict[str, tuple[str, str, str]] = {
    "hinton-kd-loss-answer": (KD_LOSS_WITHOUT_T_SQUARED, "hinton-kd-loss", "You forgot the factor T^2"),
    "hinton-high-temperature-answer": (
        "classes = student_logits.shape[1]\nreturn ((student_logits - teacher_logits) ** 2).sum(dim=1).mean() / (2 * classes)",
        "hinton-high-temperature", "centre each image's logits"),
    "hinton-fewer-images-answer": (
        ('MY_PREDICTION = "larger"\nFEWER = {ALONE: {"method": ALONE, "images": 10**6}, "KD": {"method": KD, '
        '"images": 10**6}}\nfewer_runs = "not run"'), "hinton-fewer-images", "fewer than the lesson's"),
    "lsl-inter-class-gram-answer": (
        (
            "flat = features.reshape(len(features), -1).double()\n"
            "means = torch.stack([flat[labels == c].mean(dim=0) for c in range(num_classes)])\n"
            "return means @ means.T"
        ), "lsl-inter-class-gram", "the diagonal should be all 1"),
    "lsl-bindings-answer": ('MY_BINDINGS = list(LSP_CHOICE)\nMY_PREDICTION = "the same"\nown_runs = "not run"',
                            "lsl-bindings", "Those are LSP's own bindings"),
    "crosslayer-fsp-matrix-answer": ('return torch.einsum("nihw,njhw->nij", a, b)', "crosslayer-fsp-matrix",
                                     "H*W"),
    "crosslayer-ablation-row-answer": ('MY_ROW = P1_P2\nMY_PREDICTION = "better"\nrow_runs = "not run"',
                                       "crosslayer-ablation-row", "already a row"),
    "mskd-exit-loss-answer": (
        (
            "log_q = F.log_softmax(exit_logits / temperature, dim=1)\n"
            "p = F.softmax(teacher_logits / temperature, dim=1)\n"
            'return alpha * F.cross_entropy(exit_logits, labels) + beta * F.kl_div(log_q, p, reduction="batchmean")'
        ), "mskd-exit-loss", "T^2"),
    "mskd-threshold-for-budget-answer": ("MY_THRESHOLD = 1.0", "mskd-threshold-for-budget", "Over budget"),
    "lm-reverse-kl-answer": (
        (
            "log_q = F.log_softmax(student_logits, dim=-1)\n"
            "log_p = F.log_softmax(teacher_logits, dim=-1)\n"
            "per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)\n"
            "return (per_position * mask).sum() / mask.sum()"
        ), "lm-reverse-kl", "wrong way round"),
    "lm-reading-answer": ('lowest_kl_to_teacher = "nobody"\nlowest_own_entropy = "nobody"', "lm-reading",
                          "not one of the students"),
}  # fmt: skip


@pytest.mark.parametrize("path", MARKED, ids=lambda p: p.stem)
def test_every_marked_notebook_is_marked_correctly_and_has_a_known_wrong_answer(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    editions.check_marking(notebook, path.name)
    answers = [
        editions.grader_metadata(c)["grade_id"]
        for c in notebook.cells
        if editions.is_solution(c) and not editions.is_grade(c)
    ]
    missing = [answer for answer in answers if answer not in NOTEBOOK_WRONG_ANSWERS]
    assert not missing, f"add a known wrong answer for {missing} to NOTEBOOK_WRONG_ANSWERS"
    assert len(answers) >= 2, "every lesson has exercises"


@pytest.mark.notebook
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", MARKED, ids=lambda p: p.stem)
def test_every_marked_notebook_grades_as_the_three_editions_should(
    path: Path, course_cache: Path, executed_notebooks: Any
) -> None:
    """Instructor edition: full marks. Every exercise filled in with a known mistake (one run: no later cell
    depends on an answer): each loses its marks with its checker's feedback. Student edition (the quick run
    the book shows): no error, and every check says "not done yet"."""
    preset = os.environ.get("KDBOOK_EDITIONS_PRESET", "smoke")
    instructor = nbformat.read(path, as_version=4)
    answers = {answer: NOTEBOOK_WRONG_ANSWERS[answer][0] for answer in NOTEBOOK_WRONG_ANSWERS
               if any(editions.grader_metadata(c).get("grade_id") == answer for c in instructor.cells)}  # fmt: skip
    executor = editions.load_executor()
    with executor.kernel_for_this_python(preset, {"KDBOOK_CACHE": str(course_cache)}) as kernel:
        full = editions.grade_executed(
            execute(instructor, kernel, path.parent, f".{path.stem}-instructor"), path.name
        )
        wrong = editions.grade_executed(execute(editions.with_answers(instructor, answers), kernel, path.parent,
                                                f".{path.stem}-wrong"), path.name)  # fmt: skip
    for scratch in path.parent.glob(f".{path.stem}-*.ipynb"):
        scratch.unlink()
    # The smoke preset's students are too small to learn: an experiment exercise's runs fail, and its checker
    # must say exactly that (flagged, never compared). Its correct path is tested on real tables in
    # tests/test_exercises.py, and in this test with KDBOOK_EDITIONS_PRESET=quick.
    flagged = {c.grade_id for c in full.cells if preset == "smoke" and "of your runs failed" in c.feedback}
    assert full.points == sum(c.max_points for c in full.cells if c.kind == "autograded"
                              and c.grade_id not in flagged), full.table()  # fmt: skip
    assert errors_outside_test_cells(full.graded) == []
    by_id = wrong.by_id()
    for answer in answers:
        _, test_id, feedback = NOTEBOOK_WRONG_ANSWERS[answer]
        assert by_id[test_id].points == 0 and feedback in by_id[test_id].feedback, (test_id, by_id[test_id])
    assert errors_outside_test_cells(wrong.graded) == []
    run = executed_notebooks.run(path)
    assert run.error is None and run.executed is not None, run.error
    student = nbformat.read(run.executed, as_version=4)
    for grade_id in exercise_ids(student):
        (cell,) = [c for c in student.cells if editions.grader_metadata(c).get("grade_id") == grade_id]
        shown = [o.data["text/plain"] for o in cell.outputs if o.output_type == "execute_result"]
        assert shown and shown[0].startswith("Not done yet."), (grade_id, shown)


def test_the_published_student_editions_are_the_current_ones() -> None:
    """notebooks/student/ holds exactly the student edition of every notebook (what Colab, Binder and the
    book's buttons open): regenerate it with `python scripts/editions.py publish` after editing a lesson."""
    published = sorted(path.name for path in editions.PUBLISHED.glob("*.ipynb"))
    assert published == [path.name for path in NOTEBOOKS], "run: python scripts/editions.py publish"
    for path in NOTEBOOKS:
        expected = editions.student_edition(nbformat.read(path, as_version=4), path.name)
        committed = nbformat.read(editions.PUBLISHED / path.name, as_version=4)
        assert committed == expected, (
            f"{path.name}: stale student edition; run: python scripts/editions.py publish"
        )
        text = (editions.PUBLISHED / path.name).read_text()
        assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
