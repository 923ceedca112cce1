"""The instructor's kit (scripts/editions.py): nbgrader marking, the student edition, the course layout and
the autograder, with the real exercise checks of kdbook_utils.exercises.

Three editions of one notebook are graded in a fresh kernel each: the instructor edition gets full marks;
the student edition runs top to bottom unfilled, gets zero on every exercise and fails nowhere else; a
student edition with one exercise filled in with a mistake its checker knows loses that exercise's marks,
with the checker's feedback. Small synthetic notebooks make this take seconds; the same checks run over
every marked notebook in notebooks/ (tests marked ``notebook``, preset ``$KDBOOK_EDITIONS_PRESET``,
default ``smoke``). Where nbgrader is installed (the ``instructor`` extra), its own preprocessors and
commands check that our student edition and our grades are the ones nbgrader produces.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
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
    """A lesson in miniature with lesson 1's two exercises: a function to write (2 points), a prediction
    to make (1 point), a written answer for the rubric, a read-only cell, and cells after the exercises."""
    cells = [
        new_markdown_cell("# A lesson in miniature"),
        new_code_cell(
            "import torch\nfrom torch.nn import functional as F\n"
            "from kdbook_utils.exercises.hinton import check_high_temperature_prediction, check_kd_loss"
        ),
        new_code_cell("TEMPERATURE = 4.0  # the lesson's setting", metadata=nbgrader("settings", locked=True)),
        new_markdown_cell("## Exercise 1: write the KD loss"),
        answer_cell(
            "kd-loss-answer",
            "def my_kd_loss(student_logits, teacher_logits, temperature):\n"
            f"    ### BEGIN SOLUTION\n{KD_LOSS_SOLUTION}\n    ### END SOLUTION",
        ),
        checking_cell("hinton-kd-loss", "check_kd_loss(my_kd_loss)", 2),
        new_markdown_cell("## Exercise 2: predict a very high temperature"),
        answer_cell(
            "high-temperature-answer",
            'soft_targets_become = None  # "one-hot", "uniform" or "unchanged"\nkd_loss_becomes = None\n'
            '### BEGIN SOLUTION\nsoft_targets_become = "uniform"\nkd_loss_becomes = "levels off"\n'
            "### END SOLUTION",
        ),
        checking_cell("hinton-high-temperature", "check_high_temperature_prediction(soft_targets_become, kd_loss_becomes)", 1),
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


KD_LOSS_WITHOUT_T_SQUARED = """\
log_q = F.log_softmax(student_logits / temperature, dim=1)
p = F.softmax(teacher_logits / temperature, dim=1)
return F.kl_div(log_q, p, reduction="batchmean")"""

#: For each answer cell: a mistake its checker knows, the test cell that grades it, and the feedback.
WRONG_ANSWERS: dict[str, tuple[str, str, str]] = {
    "kd-loss-answer": (KD_LOSS_WITHOUT_T_SQUARED, "hinton-kd-loss", "You forgot the factor T^2"),
    "high-temperature-answer": (
        'soft_targets_become = "one-hot"\nkd_loss_becomes = "levels off"', "hinton-high-temperature",
        "they become uniform (1/C each)"),
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
    assert prediction.source.endswith("kd_loss_becomes = None\n# YOUR CODE HERE"), "top level: no raise"
    assert test.source == "check_kd_loss(my_kd_loss)"
    assert written.source == "YOUR ANSWER HERE"
    joined = "\n".join(sources(student))
    for leaked in ("BEGIN", "END", "assert_passed", "levels off", "reduction=", "logit differences"):
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
    instructor.cells[1].metadata["scrolled"] = True
    instructor.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    student = editions.student_edition(instructor)
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert "scrolled" not in student.cells[1].metadata and "widgets" not in student.metadata
    assert student.metadata["kernelspec"] == instructor.metadata["kernelspec"]
    nbformat.validate(student)


def test_filling_an_answer_replaces_its_region_at_the_regions_indent() -> None:
    filled = editions.student_edition(synthetic_lesson(), filled={"kd-loss-answer": "x = 1\nreturn x"})
    assert (
        filled.cells[4].source
        == "def my_kd_loss(student_logits, teacher_logits, temperature):\n    x = 1\n    return x"
    )
    with pytest.raises(KeyError, match="no-such-cell"):
        editions.student_edition(synthetic_lesson(), filled={"no-such-cell": "pass"})


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
        prediction.source = prediction.source.replace("soft_targets_become = None  ", "# ")
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
    "a top-level answer without a default": "binds soft_targets_become",
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
        ".kdbook-editions", "nbgrader_config.py", "release/01_lesson/01_lesson.ipynb",
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


# ------------------------------------------------------------------------------------- scoring (no kernel)


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
        ([new_output("execute_result", data={"text/plain": "1.5"}, execution_count=1)], True, 1.5,
         "partial credit 1.5 of 2"),
        ([new_output("execute_result", data={"text/plain": "'text'"}, execution_count=1)], True, 2, "'text'"),
        ([], False, 0, "not run (the kernel died or stopped before this cell)"),
    ],
)  # fmt: skip
def test_test_cells_are_scored_as_nbgrader_scores_them(
    outputs: list[Any], executed: bool, points: float, feedback: str
) -> None:
    assert editions.score(graded_cell(outputs, executed=executed)) == (points, feedback)


def test_sanitize_restores_the_instructors_cells_and_ids() -> None:
    instructor = synthetic_lesson()
    submission = editions.student_edition(instructor)
    submission.cells[5].source = "print('I pass')"  # edited a locked test cell
    submission.cells[5].metadata["nbgrader"]["points"] = 100  # and its points
    submission.cells[2].source = "TEMPERATURE = 1000.0"  # edited a read-only cell
    submission.cells[4].source += "\n# my notes"  # the answer is the student's own
    submission.cells[10].metadata["nbgrader"] = {"grade_id": "invented", "grade": True, "points": 5}
    del submission.cells[8]  # deleted a test cell
    sanitized, missing = editions.sanitize(submission, instructor)
    assert sanitized.cells[5].source == instructor.cells[5].source
    assert sanitized.cells[5].metadata["nbgrader"]["points"] == 2
    assert sanitized.cells[2].source == instructor.cells[2].source
    assert sanitized.cells[4].source.endswith("# my notes")
    assert "nbgrader" not in sanitized.cells[9].metadata, "a cell the instructor never marked is not graded"
    assert missing == ["hinton-high-temperature"]


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


@pytest.fixture(scope="module")
def gradings(kernel_name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic lesson graded as the instructor edition, the student edition, and the student edition
    with each exercise filled in with a known mistake (one run each)."""
    instructor = synthetic_lesson()
    folder = tmp_path_factory.mktemp("grading")

    def run(submission: nbformat.NotebookNode, name: str) -> Any:
        return editions.grade(
            submission, instructor, name=name, kernel_name=kernel_name, cwd=folder, timeout=GRADING_TIMEOUT_S
        )

    results = {
        "instructor": run(instructor, "instructor"),
        "student": run(editions.student_edition(instructor), "student"),
    }
    for answer, (code, _, _) in WRONG_ANSWERS.items():
        results[answer] = run(editions.student_edition(instructor, filled={answer: code}), f"wrong {answer}")
    return results


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
        else:
            assert cell.feedback.startswith("not answered"), (cell.grade_id, cell.feedback)
    assert errors_outside_test_cells(grading.graded) == []
    assert "after the exercises: torch.Size([4, 10])" in json.dumps(grading.graded.cells[-1].outputs)


@pytest.mark.parametrize("answer", list(WRONG_ANSWERS))
def test_a_known_wrong_answer_loses_its_marks_with_the_checkers_feedback(
    gradings: dict[str, Any], answer: str
) -> None:
    _, test_id, feedback = WRONG_ANSWERS[answer]
    grading = gradings[answer].by_id()
    assert grading[test_id].points == 0 and grading[test_id].max_points > 0
    assert grading[test_id].feedback.startswith("Not yet.") and feedback in grading[test_id].feedback
    others = [cell for grade_id, cell in grading.items() if grade_id != test_id and cell.kind == "autograded"]
    assert all(cell.feedback.startswith("Not done yet.") for cell in others), "only this answer was filled in"
    assert errors_outside_test_cells(gradings[answer].graded) == []


def test_the_student_edition_runs_top_to_bottom_unfilled(kernel_name: str, tmp_path: Path) -> None:
    """Run as a student would (no hidden tests): no error anywhere, and each check says "not done yet"."""
    path = tmp_path / "lesson.ipynb"
    nbformat.write(editions.student_edition(synthetic_lesson()), path)
    executed = editions.load_executor().execute_notebook(
        path, kernel_name=kernel_name, timeout=GRADING_TIMEOUT_S
    )
    for grade_id in exercise_ids(executed):
        (cell,) = [c for c in executed.cells if editions.grader_metadata(c).get("grade_id") == grade_id]
        (shown,) = [output for output in cell.outputs if output.output_type == "execute_result"]
        assert shown.data["text/plain"].startswith("Not done yet."), grade_id
        assert "Not done yet." in shown.data["text/html"]


def test_the_grade_command_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    instructor, submission = tmp_path / "lesson.ipynb", tmp_path / "submitted" / "lesson.ipynb"
    submission.parent.mkdir()
    nbformat.write(synthetic_lesson(), instructor)
    filled = {"kd-loss-answer": textwrap.dedent(KD_LOSS_SOLUTION)}
    nbformat.write(editions.student_edition(synthetic_lesson(), filled=filled), submission)
    code = editions.main(
        [
            "grade",
            str(submission),
            "--source",
            str(instructor),
            "--json",
            str(tmp_path / "g.json"),
            "--graded",
            str(tmp_path / "graded"),
            "--timeout",
            str(GRADING_TIMEOUT_S),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "hinton-kd-loss                2       2  Correct." in table
    assert "hinton-high-temperature       0       1  Not done yet." in table
    assert "why-high-temperature          0       1  not answered" in table
    (result,) = json.loads((tmp_path / "g.json").read_text())
    assert (result["points"], result["max_points"]) == (2.0, 4.0)
    graded = nbformat.read(tmp_path / "graded" / "lesson.ipynb", as_version=4)
    assert "assert_passed" in graded.cells[5].source, "graded with the hidden tests put back"


# ---------------------------------------------------------------------------- the same with nbgrader itself


def nbgrader_or_skip() -> ModuleType:
    return pytest.importorskip(
        "nbgrader", reason="nbgrader is not installed (pip install -e '.[instructor]')"
    )


def test_nbgrader_accepts_our_metadata_and_makes_the_same_student_edition(tmp_path: Path) -> None:
    nbgrader_or_skip()
    from nbgrader.nbgraderformat import MetadataValidator
    from nbgrader.preprocessors import (
        CheckCellMetadata,
        ClearHiddenTests,
        ClearMarkScheme,
        ClearOutput,
        ClearSolutions,
        ComputeChecksums,
        LockCells,
    )  # fmt: skip

    instructor = synthetic_lesson()
    ours = editions.student_edition(instructor)
    MetadataValidator().validate_nb(ours)
    MetadataValidator().validate_nb(instructor)
    config_file = tmp_path / "nbgrader_config.py"
    config_file.write_text(editions.NBGRADER_CONFIG.format(timeout=900))
    namespace: dict[str, Any] = {"get_config": lambda: _Config()}
    exec(compile(config_file.read_text(), str(config_file), "exec"), namespace)  # noqa: S102 (our own file)

    def nbgraders(clear_solutions: type) -> nbformat.NotebookNode:
        notebook, resources = copy.deepcopy(instructor), {}
        for step in (
            LockCells,
            clear_solutions,
            ClearOutput,
            CheckCellMetadata,
            ComputeChecksums,
            ClearHiddenTests,
            ClearMarkScheme,
            ComputeChecksums,
            CheckCellMetadata,
        ):
            notebook, resources = step().preprocess(notebook, resources)
        return notebook

    assert nbgraders(namespace["RunnableClearSolutions"]) == ours
    stock = nbgraders(ClearSolutions)
    differ = [i for i, (a, b) in enumerate(zip(stock.cells, ours.cells)) if a.source != b.source]
    assert differ == [7], "nbgrader's own stub differs only where an answer sits at the top level"
    assert stock.cells[7].source.endswith("raise NotImplementedError()")


class _Config:
    """Enough of traitlets' config object for executing nbgrader_config.py outside nbgrader."""

    def __getattr__(self, name: str) -> Any:
        value = _Config()
        object.__setattr__(self, name, value)
        return value


def test_nbgraders_own_grades_match_ours(gradings: dict[str, Any]) -> None:
    nbgrader_or_skip()
    from nbgrader.utils import determine_grade

    for name, grading in gradings.items():
        for cell in grading.cells:
            if cell.kind == "autograded" and cell.cell_index is not None:
                points, max_points = determine_grade(grading.graded.cells[cell.cell_index])
                assert (points, max_points) == (cell.points, cell.max_points), (name, cell.grade_id)


@pytest.mark.timeout(300)
def test_nbgrader_generate_assignment_and_autograde_agree_with_this_command(tmp_path: Path) -> None:
    nbgrader_or_skip()
    bin_folder = Path(sys.executable).parent
    if not (bin_folder / "nbgrader").is_file() or not (bin_folder / "alembic").is_file():
        pytest.skip("the nbgrader command is not installed next to this Python")
    lesson = tmp_path / "in" / "demo.ipynb"
    lesson.parent.mkdir()
    nbformat.write(synthetic_lesson(), lesson)
    course = tmp_path / "course"
    editions.generate([lesson], course)
    ours = (course / "release" / "demo" / "demo.ipynb").read_text()
    code, wrong_answer = "kd-loss-answer", WRONG_ANSWERS["kd-loss-answer"][0]
    submitted = course / "submitted" / "alice" / "demo" / "demo.ipynb"
    submitted.parent.mkdir(parents=True)
    nbformat.write(editions.student_edition(synthetic_lesson(), filled={code: wrong_answer}), submitted)
    env = {
        **os.environ,
        "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}",
        "KDBOOK_PRESET": "quick",
    }
    for command in (["generate_assignment", "demo", "--force"], ["autograde", "demo", "--create"]):
        done = subprocess.run(
            [str(bin_folder / "nbgrader"), *command],
            cwd=course,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((course / "release" / "demo" / "demo.ipynb").read_text()) == json.loads(ours)
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        notebook = gradebook.find_submission_notebook("demo", "demo", "alice")
        scores = {grade.name: (grade.auto_score, grade.max_score) for grade in notebook.grades}
    assert scores["hinton-kd-loss"] == (0.0, 2.0) and scores["hinton-high-temperature"] == (0.0, 1.0)
    autograded = nbformat.read(course / "autograded" / "alice" / "demo" / "demo.ipynb", as_version=4)
    errors = [o.evalue for o in autograded.cells[5].outputs if o.output_type == "error"]
    assert errors and "You forgot the factor T^2" in errors[0]
    shutil.rmtree(course, ignore_errors=True)


# ------------------------------------------------------------------------------- the real notebooks (later)


MARKED = [path for path in NOTEBOOKS if editions.is_marked(nbformat.read(path, as_version=4))]
MARKED_OR_SKIP = MARKED or [
    pytest.param(
        None, marks=pytest.mark.skip(reason="no notebook in notebooks/ carries nbgrader markers yet")
    )
]

#: For each answer cell of the real notebooks: a mistake its checker knows, its test cell, the feedback.
NOTEBOOK_WRONG_ANSWERS: dict[str, tuple[str, str, str]] = {
    "hinton-kd-loss-answer": (KD_LOSS_WITHOUT_T_SQUARED, "hinton-kd-loss", "You forgot the factor T^2"),
    "hinton-high-temperature-answer": (
        'soft_targets_become = "one-hot"\nkd_loss_becomes = "levels off"', "hinton-high-temperature",
        "they become uniform (1/C each)"),
    "lsl-inter-class-gram-answer": (
        (
            "flat = features.reshape(len(features), -1).double()\n"
            "means = torch.stack([flat[labels == c].mean(dim=0) for c in range(num_classes)])\n"
            "return means @ means.T"
        ), "lsl-inter-class-gram", "the diagonal should be all 1"),
    "lsl-bindings-answer": ('MY_BINDINGS = [("conv2", "conv2")]', "lsl-bindings", "lowest-scoring"),
    "crosslayer-fsp-matrix-answer": ('return torch.einsum("nihw,njhw->nij", a, b)', "crosslayer-fsp-matrix",
                                     "H*W"),
    "crosslayer-cross-two-layers-answer": ('my_pairs = [("stem", "stage2"), ("stage1", "stage3")]',
                                           "crosslayer-cross-two-layers", "'exact' reading"),
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


@pytest.mark.parametrize("path", MARKED_OR_SKIP, ids=lambda p: getattr(p, "stem", "none"))
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


@pytest.mark.notebook
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", MARKED_OR_SKIP, ids=lambda p: getattr(p, "stem", "none"))
def test_every_marked_notebook_grades_as_the_three_editions_should(path: Path, course_cache: Path) -> None:
    """Instructor edition: full marks. Student edition: zero on every exercise, no error elsewhere. Every
    exercise filled in with a known mistake (one run, as no later cell depends on an answer): each loses
    its marks with its checker's feedback."""
    preset = os.environ.get("KDBOOK_EDITIONS_PRESET", "smoke")
    instructor = nbformat.read(path, as_version=4)
    answers = {
        answer: NOTEBOOK_WRONG_ANSWERS[answer][0]
        for answer in NOTEBOOK_WRONG_ANSWERS
        if any(editions.grader_metadata(c).get("grade_id") == answer for c in instructor.cells)
    }

    def run(submission: nbformat.NotebookNode) -> Any:
        return editions.grade(submission, instructor, name=path.name, preset=preset, cwd=path.parent)

    full = run(instructor)
    assert full.points == sum(c.max_points for c in full.cells if c.kind == "autograded"), full.table()
    assert errors_outside_test_cells(full.graded) == []
    empty = run(editions.student_edition(instructor, path.name))
    assert all(c.points == 0 for c in empty.cells if c.kind == "autograded"), empty.table()
    assert all(c.feedback.startswith("Not done yet.") for c in empty.cells if c.kind == "autograded"), (
        empty.table()
    )
    assert errors_outside_test_cells(empty.graded) == []
    wrong = run(editions.student_edition(instructor, path.name, filled=answers)).by_id()
    for answer in answers:
        _, test_id, feedback = NOTEBOOK_WRONG_ANSWERS[answer]
        assert wrong[test_id].points == 0 and feedback in wrong[test_id].feedback, (test_id, wrong[test_id])
