"""Lesson support: the tables and figures of each lesson, and the reconstruction of each lesson's settings."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

from kdbook_utils.lessons.crosslayer import gram_gap, plot_gap_curve
from kdbook_utils.lessons.hinton import (
    WHICH_LOSS_EXAMPLE,
    HintonLesson,
    dark_knowledge_table,
    high_temperature_table,
    kd_gradient_norms,
    kd_loss_conventions,
    plot_soft_targets,
)
from kdbook_utils.methods.hinton import kd_loss, logit_matching_limit, soft_targets

matplotlib.use("Agg")


def random_logits(
    batch: int = 8, classes: int = 10, scale: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    return student, teacher


# ------------------------------------------------------------------------------------------ lesson 1


def test_conventions_differ_by_the_stated_factors() -> None:
    student, teacher = random_logits(classes=7)
    table = kd_loss_conventions(student, teacher, 3.0).set_index("convention")["value"]
    reference = kd_loss(student, teacher, 3.0).item()
    entropy = -(soft_targets(teacher, 3.0) * soft_targets(teacher, 3.0).log()).sum(dim=1).mean().item()
    assert table["batchmean KL x T^2"] == pytest.approx(reference)
    assert table["per-element mean KL x T^2"] == pytest.approx(reference / 7)
    assert table["KL without T^2"] == pytest.approx(reference / 9)
    assert table["soft cross-entropy x T^2"] == pytest.approx(reference + 9 * entropy)


def test_the_notebook_example_reads_as_the_lesson_says() -> None:
    example = WHICH_LOSS_EXAMPLE
    student = torch.tensor([example["student_logits"]])
    teacher = torch.tensor([example["teacher_logits"]])
    values = kd_loss_conventions(student, teacher, example["temperature"])["value"].tolist()
    assert [f"{value:.2f}" for value in values[:3]] == ["8.00", "0.80", "0.50"]
    assert f"{values[3]:.1f}" == "41.8"
    assert teacher.argmax().item() == 7  # the example's story: a teacher sure of "7"


def test_high_temperature_kd_becomes_logit_matching() -> None:
    student, teacher = random_logits()
    limit = logit_matching_limit(student, teacher).item()
    assert kd_loss(student, teacher, 1000.0).item() == pytest.approx(limit, rel=1e-3)
    table = high_temperature_table(student, teacher, [1, 10, 100, 1000])
    assert table["teacher max prob"].is_monotonic_decreasing
    assert table["teacher max prob"].iloc[-1] == pytest.approx(0.1, abs=1e-2)
    assert table["KL"].iloc[-1] < 1e-5


def test_t_squared_keeps_the_soft_gradient_from_vanishing() -> None:
    student, teacher = random_logits()
    table = kd_gradient_norms(student, teacher, [4.0, 40.0, 400.0])
    with_t2 = table["grad norm, KL x T^2"].to_numpy()
    without = table["grad norm, KL"].to_numpy()
    assert with_t2.max() / with_t2.min() < 1.5  # levels off
    assert without[1] / without[2] == pytest.approx(100, rel=0.05)  # falls like 1/T^2


def test_dark_knowledge_table_names_the_most_similar_wrong_class() -> None:
    # Class 0 images lean towards class 2, class 1 images towards class 0.
    logits = torch.tensor([[5.0, 0.0, 2.0], [6.0, -1.0, 3.0], [1.5, 5.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    table = dark_knowledge_table(logits, labels, ["a", "b", "c"], temperature=4.0)
    assert table["class"].tolist() == ["a", "b"]  # class "c" has no images
    assert table["most similar wrong class"].tolist() == ["c", "a"]
    row = table.iloc[0]
    assert row["its probability at T = 4 (%)"] > row["its probability at T = 1 (%)"]


def test_plot_soft_targets_draws_one_row_per_image() -> None:
    figure = plot_soft_targets(torch.randn(2, 10), torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                               torch.tensor([1, 2]), [str(i) for i in range(10)], temperatures=(1, 4))  # fmt: skip
    assert len(figure.axes) == 4
    assert len(figure.axes[1].patches) == 2 * 10
    with pytest.raises(ValueError, match="labels"):
        plot_soft_targets(torch.randn(2, 10), torch.zeros(2, 3, 8, 8), torch.tensor([1]), list("0123456789"))


def _sweep(val_accuracy: dict[tuple[float, float], float], failed: set[tuple[float, float]]) -> pd.DataFrame:
    rows = [{"method": "alone", "split": "val", "T": None, "alpha": None, "accuracy": 99.0, "failed": ""}]
    for (temperature, alpha), accuracy in val_accuracy.items():
        note = "at chance" if (temperature, alpha) in failed else ""
        rows.append({"method": f"KD T={temperature}", "split": "val", "T": temperature, "alpha": alpha,
                     "accuracy": accuracy, "failed": note})  # fmt: skip
        rows.append({**rows[-1], "split": "test", "accuracy": 100.0})  # the test split never decides
    return pd.DataFrame(rows)


def test_the_sweep_choice_reads_validation_accuracy_and_skips_failed_runs() -> None:
    sweep = _sweep({(1.0, 0.5): 60.0, (4.0, 0.9): 70.0, (16.0, 0.1): 80.0}, failed={(16.0, 0.1)})
    assert HintonLesson.choose(sweep) == (4.0, 0.9)


def test_when_every_kd_run_failed_the_choice_warns_and_the_lesson_runs_on() -> None:
    sweep = _sweep({(1.0, 0.5): 10.0, (4.0, 0.9): 11.0}, failed={(1.0, 0.5), (4.0, 0.9)})
    with pytest.warns(RuntimeWarning, match="Every run that could choose the temperature and weight failed"):
        assert HintonLesson.choose(sweep) == (4.0, 0.9)


def test_the_gap_curve_flags_a_diverged_run_instead_of_failing() -> None:
    pair = ("stem", "stage1")
    teacher = {pair: torch.ones(4, 4)}
    snapshots = [
        {"phase": "gram", "grams": {pair: torch.zeros(4, 4)}},
        {"phase": "task", "grams": {pair: torch.full((4, 4), 1e30)}},  # float32 overflows when squared
    ]
    assert gram_gap(teacher, snapshots[0]["grams"]) == pytest.approx(4.0)
    figure = plot_gap_curve(teacher, snapshots)
    axis = figure.axes[0]
    assert axis.get_ylim() == pytest.approx((0.0, 4.0 * 1.15))
    assert any("diverged" in text.get_text() for text in axis.texts)


def test_the_book_tables_of_times_are_rendered_from_the_recorded_files(tmp_path, monkeypatch) -> None:
    from kdbook_utils import lessons

    monkeypatch.setattr(lessons, "RESULTS", tmp_path)
    assert "No running times recorded yet" in lessons.timings_markdown()
    assert "No experiments recorded yet" in lessons.recordings_markdown()
    pd.DataFrame([{"notebook": "01_hinton_kd", "preset": "lab", "cached": True, "machine": "m", "date": "d",
                   "seconds": 754.0, "peak_memory_mib": 1536.0, "memory_date": "d2"},
                  {"notebook": "01_hinton_kd", "preset": "lab", "cached": False, "machine": "m", "date": "d",
                   "seconds": 1114.0, "teacher_seconds": 360.0},
                  {"notebook": "00_start_here", "preset": "quick", "cached": False, "machine": "m", "date": "d",
                   "seconds": 30.0, "peak_memory_mib": 612.4, "memory_date": "d"}],
                 ).to_csv(tmp_path / "timings.csv", index=False)  # fmt: skip
    (tmp_path / "lab").mkdir()
    provenance = {
        "lesson": "hinton",
        "preset": "lab",
        "machine": "m",
        "device": "cpu",
        "precision": "bfloat16",
        "date": "2026-12-02 01:00 UTC",
        "wall_seconds": 1500.0,
        "command": "python -m kdbook_utils",
    }
    (tmp_path / "lab" / "hinton.json").write_text(json.dumps(provenance))
    text = lessons.write_timings_markdown(tmp_path / "times.md").read_text()
    assert "| `01_hinton_kd` | `lab` | already cached | m | d (memory d2) | 12.6 min | 1.5 GiB |" in text
    assert (
        "| `01_hinton_kd` | `lab` | trained first (6.0 min, timed on their own) | m | d | 18.6 min "
        "| not measured yet |" in text
    )
    assert "| `00_start_here` | `quick` | empty cache, notebooks in order | m | d | 30 s | 612 MiB |" in text
    assert "| hinton | `lab` | ? | m, `cpu`, bfloat16 | 2026-12-02 | 25 min |" in text
    tables = [[line for line in part.splitlines() if line.startswith("|")] for part in text.split("\n\n")]
    tables = [rows for rows in tables if rows]
    assert len(tables) == 2
    for rows in tables:  # every row has as many cells as its header
        assert {row.count(" | ") for row in rows[2:]} == {rows[0].count(" | ")}, rows
    assert (
        "**" not in lessons.notebook_times("01_hinton_kd").data
        and "12.6 min" in lessons.notebook_times("01_hinton_kd").data
    )


# -------------------------------------------------------------------------------------- shipping teachers


def test_two_lessons_shipping_at_once_keep_each_others_teachers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`teachers LESSON --ship` read-modify-writes one manifest: run for two lessons at once, each must keep
    the other's entries; and a lesson shipping a new recipe replaces its own older file, no one else's."""
    import threading
    import time
    from types import SimpleNamespace

    from torch import nn

    from kdbook_utils.checkpoints import file_sha256, save_checkpoint
    from kdbook_utils.experiments import TrainedModel
    from kdbook_utils.lessons import teachers

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 5, generator=generator), torch.randint(0, 3, (64,), generator=generator)

    class Runner:
        def __init__(self, lesson: str, recipe: str) -> None:
            self.lesson, self.preset = lesson, SimpleNamespace(name="lab")
            self.splits = SimpleNamespace(test=labels)
            model = nn.Linear(5, 3)
            model.cache_key = f"linear_{lesson}_{recipe}"
            path = save_checkpoint(model, tmp_path / "cache" / f"{recipe}.pt", recipe={"kind": recipe})
            self.models = {"teacher": TrainedModel(model, None, path, "trained")}

        def trained_models(self) -> dict:
            return self.models

        def accuracy(self, model: nn.Module, split: str) -> float:
            with torch.no_grad():
                return 100.0 * (model(images).argmax(1) == labels).float().mean().item()

    folder = tmp_path / "teachers"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"models": {}}))

    def slow_loads(text: str) -> dict:  # widens the window between reading the manifest and writing it
        read = json.loads(text)
        time.sleep(0.3)
        return read

    monkeypatch.setattr(teachers, "json", SimpleNamespace(loads=slow_loads, dump=json.dump))
    shippers = [threading.Thread(target=teachers.ship, args=(Runner(lesson, "a"), "test", folder))
                for lesson in ("hinton", "lsl")]  # fmt: skip
    for shipper in shippers:
        shipper.start()
    for shipper in shippers:
        shipper.join()
    manifest = json.loads((folder / "manifest.json").read_text())["models"]
    assert sorted(manifest) == ["linear_hinton_a.pt", "linear_lsl_a.pt"]
    for name, record in manifest.items():
        assert record["sha256"] == file_sha256(folder / name) and record["stored_as"] == "float16"

    teachers.ship(Runner("hinton", "b"), "test", folder)
    manifest = json.loads((folder / "manifest.json").read_text())["models"]
    assert sorted(manifest) == ["linear_hinton_b.pt", "linear_lsl_a.pt"]
    assert sorted(path.name for path in folder.glob("*.pt")) == sorted(manifest)


# ------------------------------------------------------------------------------------------ jobs and keys


def test_an_edited_loss_function_is_a_new_job_and_the_same_one_is_not(tmp_path: Path) -> None:
    """A learner's own loss in a job counts by its source: fixing it retrains, re-running the cell does not."""
    import importlib.util

    from kdbook_utils.lessons import job_key

    def load(name: str, body: str):  # the same function name, as a re-run notebook cell defines it
        (tmp_path / f"{name}.py").write_text(f"def my_kd_loss(student, teacher):\n    return {body}\n")
        spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.my_kd_loss

    first, rerun, fixed = load("a", "(student - teacher).abs().mean()"), load("b", "(student - teacher).abs().mean()"), load("c", "(student - teacher).pow(2).mean()")  # fmt: skip
    spec = {"method": "KD", "temperature": 4.0, "alpha": 0.1}
    assert job_key({**spec, "loss": first}) == job_key({**spec, "loss": rerun})
    assert job_key({**spec, "loss": first}) != job_key({**spec, "loss": fixed})
    assert job_key({**spec, "alpha": 0.5}) != job_key(spec)
    assert job_key({"alpha": 0.1, "method": "KD", "temperature": 4.0}) == job_key(spec)  # order plays no part


def test_a_job_met_twice_trains_once_and_the_environment_preset_is_the_named_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kdbook_utils.data import DataSplits
    from kdbook_utils.lessons import LessonRunner
    from kdbook_utils.presets import get_preset

    trained: list[tuple[dict, int]] = []

    class Runner(LessonRunner):
        def complete(self, spec):
            return {"alpha": 0.1, **spec}

        def train_job(self, spec, seed):
            trained.append((spec, seed))
            return f"run {len(trained)}"

    for name in ("quick", "lab"):
        monkeypatch.setenv("KDBOOK_PRESET", name)
        from_environment = get_preset()
        monkeypatch.delenv("KDBOOK_PRESET")
        assert from_environment == get_preset(name)
        assert LessonRunner.runtime(from_environment, None) == LessonRunner.runtime(get_preset(name), None)
    preset = get_preset("quick")
    device, precision = LessonRunner.runtime(preset, None)
    runner = Runner(preset, None, DataSplits(None, None, None), device, precision, False)
    assert runner.job({"method": "KD"}, 0) == runner.job({"method": "KD", "alpha": 0.1}, 0) == "run 1"
    assert (
        runner.job({"method": "KD"}, 1) == "run 2"
        and runner.job({"method": "KD", "alpha": 0.5}, 0) == "run 3"
    )
    assert trained == [({"alpha": 0.1, "method": "KD"}, 0), ({"alpha": 0.1, "method": "KD"}, 1),
                       ({"alpha": 0.5, "method": "KD"}, 0)]  # fmt: skip
