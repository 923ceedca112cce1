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
                   "date": "today", "seconds": 100.0}])  # fmt: skip
    (row,) = timer.add_teachers([notebook], "smoke", "this machine", "today")
    assert row["cached"] is False and row["teacher_seconds"] > 0
    assert row["seconds"] == pytest.approx(100.0 + row["teacher_seconds"], abs=0.11)
    timer.record([row])
    table = pd.read_csv(tmp_path / "timings.csv")
    assert len(table) == 2 and table["teacher_seconds"].notna().sum() == 1
