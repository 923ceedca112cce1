"""The recorded lab results that the notebooks show: present, well formed, and made with the settings the
lessons would run now."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdbook_utils.lessons.records import LESSONS, check_recorded, results_path


@pytest.mark.parametrize("lesson", list(LESSONS))
def test_the_recorded_lab_results_are_there_well_formed_and_current(lesson: str) -> None:
    """The notebooks show these files: each must exist, read back with its provenance, hold the final stage
    on the test split with at least three seeds, and match the settings the lesson would run now."""
    runs, provenance = check_recorded(lesson, "lab")
    final = runs[(runs["stage"] == "final") & (runs["split"] == "test")]
    assert final["seed"].nunique() >= 3
    assert final["accuracy"].between(0, 100).all()
    assert {"commit", "date", "machine", "torch", "wall_seconds", "command"} <= set(provenance)


def test_a_recorded_file_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    source = results_path("hinton", "lab")
    (tmp_path / "lab").mkdir()
    for suffix in (".csv", ".json"):
        shutil.copy(source.with_suffix(suffix), tmp_path / "lab" / f"hinton{suffix}")
    provenance = json.loads((tmp_path / "lab" / "hinton.json").read_text())
    provenance["settings_hash"] = "0" * len(provenance["settings_hash"])
    (tmp_path / "lab" / "hinton.json").write_text(json.dumps(provenance))
    with pytest.raises(ValueError, match="out of date.*Regenerate"):
        check_recorded("hinton", "lab", tmp_path)
    with pytest.raises(FileNotFoundError):
        check_recorded("lsl", "lab", tmp_path)


def test_a_recorded_stage_that_does_not_exist_is_named_with_the_ones_that_do() -> None:
    from kdbook_utils.lessons.records import recorded_comparison

    with pytest.raises(ValueError, match="no stage 'sizes'.*'ablation', 'final'"):
        recorded_comparison("crosslayer", stage="sizes")
