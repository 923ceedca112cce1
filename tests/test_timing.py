"""The notebook timer's empty-cache mode (``scripts/time_notebooks.py --teachers``): it times exactly the
teachers a notebook trains, and records the notebook's empty-cache time as its cached time plus theirs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from kdbook_utils.data import preset_data
from kdbook_utils.lessons.crosslayer import CrossLayerRunner
from kdbook_utils.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def timer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("time_notebooks", ROOT / "scripts" / "time_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_every_notebook_has_the_lesson_whose_teachers_it_trains(timer: ModuleType) -> None:
    notebooks = {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks == set(timer.NOTEBOOK_LESSON), (
        "scripts/time_notebooks.py: NOTEBOOK_LESSON is out of date"
    )


def test_the_cross_layer_notebook_s_chain_teachers_count_as_its_teachers(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path))
    preset = get_preset("smoke")
    runner = CrossLayerRunner.prepare(preset, preset_data(preset), device="cpu", progress=False)
    before = {path.name for path in (tmp_path / "models").glob("*.pt")}
    assert len(before) == runner.settings.teachers  # prepare trains the ensemble only
    runner.notebook_teachers()
    added = {path.name for path in (tmp_path / "models").glob("*.pt")} - before
    assert sorted(name.split("_seed")[0] for name in added) == [
        "resnet50_cifar+adapters_digits",
        "resnet50_cifar_digits8px",
    ]
    runner.notebook_teachers()  # the second time everything comes from the cache
    assert {path.name for path in (tmp_path / "models").glob("*.pt")} == before | added


def test_the_empty_cache_time_is_the_cached_time_plus_the_teachers(
    timer: ModuleType, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(timer, "TIMINGS", tmp_path / "timings.csv")
    notebook = ROOT / "notebooks" / "04_mskd_multi_exit.ipynb"
    with pytest.raises(SystemExit, match="run --only-cached first"):
        timer.add_teachers([notebook], "smoke", "this machine", "today")
    timer.record([{"notebook": notebook.stem, "preset": "smoke", "cached": True, "machine": "this machine",
                   "date": "today", "seconds": 100.0, "peak_memory_mib": 1.0,
                   "memory_date": "today"}])  # fmt: skip
    (row,) = timer.add_teachers([notebook], "smoke", "this machine", "today")
    assert row["cached"] is False and row["teacher_seconds"] > 0
    assert row["seconds"] == pytest.approx(100.0 + row["teacher_seconds"], abs=0.11)
    if timer.load_executor().peak_resident_mib() is not None:  # the larger: the teachers' training here
        assert row["peak_memory_mib"] > 1.0
    timer.record([row])
    table = pd.read_csv(tmp_path / "timings.csv")
    assert len(table) == 2 and table["teacher_seconds"].notna().sum() == 1


def test_the_kernel_s_peak_memory_is_measured(timer: ModuleType, tmp_path) -> None:
    """A notebook that fills 300 MiB: the kernel's recorded peak holds them (Linux, where /proc says)."""
    if timer.load_executor().peak_resident_mib() is None:
        pytest.skip("this system does not report a process's peak resident memory (/proc/<pid>/status)")
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("filled = bytearray(b'x') * (300 * 2**20)  # every page written"),
        nbformat.v4.new_code_cell("del filled"),
    ]
    path = tmp_path / "fill.ipynb"
    nbformat.write(notebook, path)
    executor = timer.load_executor()
    memory = executor.KernelMemory()
    with executor.kernel_for_this_python("smoke") as kernel:
        executor.execute_notebook(path, kernel_name=kernel, timeout=120, memory=memory)
    assert memory.peak_mib is not None and 300 < memory.peak_mib < 300 + 1024


def test_memory_only_keeps_the_recorded_times_and_old_files_stay_readable(
    timer: ModuleType, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(timer, "TIMINGS", tmp_path / "timings.csv")
    old = "notebook,preset,cached,machine,date,seconds,teacher_seconds\n00_start_here,quick,True,m,d1,10.6,\n"
    (tmp_path / "timings.csv").write_text(old)  # written before memory was measured
    run = {"notebook": "00_start_here", "preset": "quick", "cached": True, "machine": "m", "date": "d2",
           "seconds": 55.0, "peak_memory_mib": 640.0, "memory_date": "d2"}  # fmt: skip
    timer.record([run], memory_only=True)
    (row,) = pd.read_csv(tmp_path / "timings.csv").to_dict("records")
    kept = (row["date"], row["seconds"], row["peak_memory_mib"], row["memory_date"])
    assert kept == ("d1", 10.6, 640.0, "d2")
    timer.record([{**run, "cached": False}], memory_only=True)  # no such row yet: recorded whole
    timer.record([{**run, "peak_memory_mib": 700.0}])  # a full run replaces the time too
    table = pd.read_csv(tmp_path / "timings.csv")
    assert len(table) == 2
    assert table[table["cached"]][["seconds", "peak_memory_mib"]].values.tolist() == [[55.0, 700.0]]
