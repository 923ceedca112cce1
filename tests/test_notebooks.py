"""Every notebook: committed clean (no outputs), with a Colab guard and a `parameters` cell, and executed
top to bottom with the quick preset in a fresh kernel (tests marked `notebook`; a failing cell fails the
test with that cell's error). The executions come from the session fixture ``executed_notebooks``
(tests/conftest.py), which keeps the executed copies for the browser test's book."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import nbformat
import pytest

if TYPE_CHECKING:
    from conftest import ExecutedNotebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 900  # the whole notebook; the quick preset aims at 2-3 minutes on 2 cores
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
COLAB_GUARD = 'if "google.colab" in sys.modules:'


def ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def is_progress_bar(model_id: str, state: dict) -> bool:
    """Whether a displayed widget is (or contains) a progress bar, e.g. tqdm's: no figure expected."""
    model = state.get(model_id, {})
    if model.get("model_name") in ("FloatProgressModel", "IntProgressModel"):
        return True
    children = model.get("state", {}).get("children", [])
    return any(is_progress_bar(child.removeprefix("IPY_MODEL_"), state) for child in children)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


# ------------------------------------------------------------------------------------- committed state


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(code_cells(notebook)) if cell.outputs or cell.execution_count]
    assert not dirty, f"code cells {dirty} have outputs or execution counts: strip them before committing"
    assert "widgets" not in notebook.metadata, "saved widget state: strip it before committing"
    from ipykernel.ipkernel import IPythonKernel

    assert notebook.metadata.get("language_info") == IPythonKernel.language_info, (
        "its language_info is not what this environment's kernel reports, so JupyterLab would mark it modified "
        "on opening: run python scripts/editions.py publish"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_starts_with_the_colab_guard_and_has_a_parameters_cell(path: Path) -> None:
    cells = code_cells(nbformat.read(path, as_version=4))
    assert cells, "a notebook without code"
    guard = cells[0].source
    assert COLAB_GUARD in guard and "%pip install" in guard, "the first code cell must be the Colab guard"
    tagged = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    assert "PRESET = get_preset()" in tagged[0].source


# ----------------------------------------------------------------------------------------------- running


@pytest.mark.notebook
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path: Path, executed_notebooks: ExecutedNotebooks) -> None:
    run = executed_notebooks.run(path)
    if run.error is not None:
        raise run.error
    assert run.executed is not None
    executed = nbformat.read(run.executed, as_version=4)
    cells = code_cells(executed)
    errors = [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"error outputs: {[e.ename for e in errors]}"
    state = executed.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for index, cell in enumerate(cells):
        kinds = {key for output in cell.outputs for key in output.get("data", {})}
        views = [
            output.data[WIDGET_VIEW]["model_id"]
            for output in cell.outputs
            if WIDGET_VIEW in output.get("data", {})
        ]
        if any(not is_progress_bar(model_id, state) for model_id in views):
            assert kinds & {"image/png", "image/svg+xml", "text/html"}, (
                f"code cell {index} shows a widget but no static figure or table: the rendered book would "
                "be blank there (draw the default figure too, e.g. with kdbook_utils.widgets.interactive_figure)"
            )
    kernel_name = executed_notebooks.kernel_name
    assert executed.metadata["kernelspec"]["name"] != kernel_name, "keeps the notebook's own kernel name"
    too_wide = {
        index: width
        for index, cell in enumerate(cells)
        for output in cell.outputs
        if "image/png" in output.get("data", {})
        and (width := png_width(output.data["image/png"])) > MAX_FIGURE_WIDTH_PX
    }
    assert not too_wide, (
        f"figures wider than {MAX_FIGURE_WIDTH_PX} px (code cell: width) are shrunk until their text is "
        f"illegible at the book's column width: {too_wide}; put the panels in rows"
    )


MAX_FIGURE_WIDTH_PX = 1100
"""The widest figure a lesson may draw: the book's column is about 850 px, so wider figures are scaled down
and text of matplotlib's default size drops below a legible size."""


def png_width(encoded: str) -> int:
    """The width in pixels of a base64-encoded PNG (from its IHDR header)."""
    import base64
    import struct

    return struct.unpack(">I", base64.b64decode(encoded[:48])[16:20])[0]


# ------------------------------------------------------------------------------- the code a lesson shows


def package_code_cells() -> list[tuple[Path, int, str]]:
    found = []
    for path in NOTEBOOKS:
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if "package-code" in cell.metadata.get("tags", []):
                found.append((path, index, cell.source))
    return found


def test_lesson_1_shows_the_training_step_every_method_trains_with() -> None:
    """The d2l pattern: the notebook's cell is the package's code, so the step a student reads is the one
    that runs (a test fails as soon as the two differ)."""
    import inspect

    import kdbook_utils.train as train_module

    cells = package_code_cells()
    assert [path.stem for path, _, _ in cells] == ["01_hinton_kd"], "lesson 1 shows the step, once"
    _, _, source = cells[0]
    first, _, body = source.partition("\n")
    assert first == "# kdbook_utils/train.py", "the cell names the file it is copied from"
    assert body == inspect.getsource(train_module.train_step).rstrip("\n"), (
        "the cell and kdbook_utils.train.train_step differ"
    )
    assert 15 <= len(body.splitlines()) <= 30, "the step stays short enough to read in one go"


#: What a "What you should see" sentence names, and the output that shows it.
SEEN: dict[str, tuple[str, ...]] = {
    "figure": ("image/png",),
    "heatmap": ("image/png",),
    "table": ("text/html",),
    "verdict": ("text/markdown", "text/html"),
    "sentence": ("text/markdown",),
}


def what_you_should_see(notebook: nbformat.NotebookNode) -> list[tuple[int, str, int]]:
    """(markdown cell, its "What you should see" text, the next code cell) for every such paragraph."""
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "markdown" or "What you should see" not in cell.source:
            continue
        text = cell.source.split("What you should see", 1)[1].split("\n\n", 1)[0]
        following = next((j for j in range(index + 1, len(notebook.cells))
                          if notebook.cells[j].cell_type == "code"), None)  # fmt: skip
        if following is not None:
            found.append((index, text, following))
    return found


@pytest.mark.notebook
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_every_what_you_should_see_names_something_its_cell_shows(
    path: Path, executed_notebooks: ExecutedNotebooks
) -> None:
    """A "What you should see" that names a figure, a table, a verdict or a sentence is followed by a cell
    whose output holds that kind of thing, in the executed student edition."""
    run = executed_notebooks.run(path)
    if run.error is not None:
        raise run.error
    assert run.executed is not None
    executed = nbformat.read(run.executed, as_version=4)
    paragraphs = what_you_should_see(executed)
    assert paragraphs or path.stem == "00_start_here", "a lesson says what to look for before its results"
    for index, text, code_index in paragraphs:
        kinds = {key for output in executed.cells[code_index].outputs for key in output.get("data", {})}
        named = [word for word in SEEN if word in text.lower()]
        assert named, f"cell {index}: 'What you should see' names no figure, table, verdict or sentence"
        for word in named:
            assert kinds & set(SEEN[word]), (
                f"cell {index} says you should see a {word}, but cell {code_index} shows only {sorted(kinds)}"
            )
