"""The experiment jobs: cached teachers, the teacher-output cache, student runs over seeds, and the paired
comparison that tells a gain from seed noise."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import kdbook_utils.experiments as experiments_module
from kdbook_utils.data import DataSplits, TensorLoader, load_dataset
from kdbook_utils.experiments import (
    ResultsFileError,
    TeacherCacheMismatch,
    TeacherOutputCache,
    cached_adapted_teacher,
    cached_teacher,
    cached_teacher_exits,
    compare,
    paired_interval,
    read_results,
    run_seeds,
    train_student,
    write_results,
)
from kdbook_utils.methods.crosslayer import CrossLayerDistiller
from kdbook_utils.methods.hinton import HintonKD
from kdbook_utils.methods.mskd import MSKD
from kdbook_utils.models import create_model
from kdbook_utils.models.multi_exit import MultiExit
from kdbook_utils.presets import get_preset
from kdbook_utils.train import evaluate, fit, seed_everything

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KDBOOK_PRESET", "quick")


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    train = load_dataset("digits", "train", subset=96, seed=0).resized(16)
    val = load_dataset("digits", "train", subset=40, seed=1).resized(16)
    test = load_dataset("digits", "test", subset=40, seed=0).resized(16)
    return DataSplits(train, val, test)


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", 10, blocks=1, width=4)


class ForwardCounter:
    """Counts a module's forward passes with a forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        module.register_forward_hook(self.hook)

    def hook(self, *_: object) -> None:
        self.count += 1


def kd_student(
    splits: DataSplits,
    teacher: nn.Module,
    cache: TeacherOutputCache | None,
    seed: int = 3,
    augment: bool = True,
) -> nn.Module:
    run = train_student(lambda: create_model("small_cnn", 10, blocks=1, width=4),
                        lambda student: HintonKD(student, teacher), splits, seed=seed, epochs=2, batch_size=32,
                        augment=augment, cache=cache, splits=())  # fmt: skip
    return run.model


# ------------------------------------------------------------------------------------ teacher-output cache


@pytest.mark.parametrize("augment", [True, False])
def test_a_warm_cache_runs_no_teacher_and_trains_the_same_student(splits: DataSplits, augment: bool) -> None:
    teacher = tiny_cnn(0).eval()
    counter = ForwardCounter(teacher)
    uncached = kd_student(splits, teacher, cache=None, augment=augment)
    batches = 2 * math.ceil(96 / 32)
    assert counter.count == batches

    cache = TeacherOutputCache()
    cold = kd_student(splits, teacher, cache, augment=augment)
    # augmented: every batch of both epochs is new; un-augmented: the first epoch sees every image once
    passes = batches + (batches if augment else batches // 2)
    assert counter.count == passes
    warm = kd_student(splits, teacher, cache, augment=augment)
    assert counter.count == passes, "the warm run must not run the teacher"
    assert cache.hits >= batches
    for name, tensor in cold.state_dict().items():
        assert torch.equal(tensor, warm.state_dict()[name]), name
        assert torch.equal(tensor, uncached.state_dict()[name]), name


def test_without_augmentation_outputs_are_kept_per_image_and_shared_by_seeds(splits: DataSplits) -> None:
    teacher = tiny_cnn(0).eval()
    counter = ForwardCounter(teacher)
    cache = TeacherOutputCache()
    kd_student(splits, teacher, cache, seed=3, augment=False)  # epoch 1 fills every image, epoch 2 hits
    first = counter.count
    assert first == math.ceil(96 / 32)
    kd_student(splits, teacher, cache, seed=4, augment=False)  # another order: still every image known
    assert counter.count == first


def test_with_augmentation_another_seed_is_another_set_of_batches(splits: DataSplits) -> None:
    teacher = tiny_cnn(0).eval()
    cache = TeacherOutputCache()
    kd_student(splits, teacher, cache, seed=3)
    kd_student(splits, teacher, cache, seed=4)
    kd_student(splits, tiny_cnn(1).eval(), cache, seed=3)  # another teacher: all misses
    assert cache.hits == 0 and cache.misses == 3 * 2 * 3


def test_the_cache_refuses_a_batch_that_is_not_the_one_it_holds(splits: DataSplits) -> None:
    teacher = tiny_cnn(0).eval()
    cache = TeacherOutputCache()
    loader = TensorLoader(splits.train, 32, train=True, seed=3)
    other = TensorLoader(splits.train, 32, train=True, seed=9)
    method = HintonKD(tiny_cnn(5), teacher)
    method.use_teacher_cache(cache.for_loader(loader))
    fit(method, loader, epochs=1, progress=False)
    method.use_teacher_cache(cache.for_loader(loader))
    with pytest.raises(TeacherCacheMismatch, match="other images or labels"):
        loader.set_epoch(0)
        fit(method, other, epochs=1, progress=False)  # batches of another loader under this loader's keys


def test_evaluation_outside_fit_runs_the_teacher_not_the_cache(splits: DataSplits) -> None:
    cache = TeacherOutputCache()
    method = HintonKD(tiny_cnn(1), tiny_cnn(0))
    method.use_teacher_cache(cache.for_loader(TensorLoader(splits.train, 32, train=True)))
    method.eval()(torch.randn(4, 3, 16, 16), torch.arange(4))
    assert cache.misses == cache.hits == 0


def test_feature_maps_and_several_teachers_come_from_the_cache(splits: DataSplits) -> None:
    teachers = [create_model("resnet8", 10).eval() for _ in range(2)]
    counters = [ForwardCounter(t) for t in teachers]
    cache = TeacherOutputCache()

    def run(seed: int) -> None:
        train_student(lambda: create_model("resnet8", 10),
                      lambda s: CrossLayerDistiller(s, teachers, gram_epochs=1, gram_lr=0.01), splits, seed=seed,
                      epochs=1, batch_size=48, augment=False, cache=cache, splits=())  # fmt: skip

    run(0)
    passes = [c.count for c in counters]
    assert passes == [2, 2]  # phase A fills every image (logits and features), phase B hits
    run(1)
    assert [c.count for c in counters] == passes


# ---------------------------------------------------------------------------------------- cached models


def test_cached_teacher_trains_once_then_loads_and_names_its_recipe(splits: DataSplits, capsys) -> None:
    first = cached_teacher("resnet8", splits, epochs=1, batch_size=32, progress=False)
    assert (
        not first.loaded
        and first.path.is_file()
        and "Trained resnet8_digits16px_seed0" in capsys.readouterr().out
    )
    assert not first.model.training and not any(p.requires_grad for p in first.model.parameters())
    again = cached_teacher("resnet8", splits, epochs=1, batch_size=32, progress=False)
    assert again.loaded and again.path == first.path and "Loaded" in capsys.readouterr().out
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name])
    pd.testing.assert_frame_equal(first.history, again.history)
    longer = cached_teacher("resnet8", splits, epochs=2, batch_size=32, progress=False)
    assert not longer.loaded and longer.path != first.path  # another recipe, another file: never stale


def test_cached_teacher_exits_and_adapted_teachers(splits: DataSplits) -> None:
    teacher = cached_teacher("resnet8", splits, epochs=1, batch_size=32, progress=False).model
    exits = cached_teacher_exits(teacher, splits, epochs=1, batch_size=32, progress=False).model
    assert isinstance(exits, MultiExit) and exits.exit_names == ("stage1", "stage2", "final")
    for name, value in teacher.state_dict().items():  # the frozen backbone is the trained teacher
        assert torch.equal(exits.backbone.state_dict()[name], value)
    again = cached_teacher_exits(teacher, splits, epochs=1, batch_size=32, progress=False)
    assert again.source == "cache"
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in exits.state_dict().items())

    wide = cached_teacher("resnet10_cifar", splits, epochs=1, batch_size=32, model_options={"base_width": 8},
                          progress=False).model  # fmt: skip
    student = create_model("resnet10_cifar", 10, base_width=4)
    adapted = cached_adapted_teacher(wide, student, splits, epochs=1, batch_size=32, progress=False).model
    assert any(point.endswith("_reduce") for point in adapted.feature_points)


def test_a_shipped_teacher_is_found_by_its_recipe_whatever_the_precision(
    splits: DataSplits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teacher shipped with the package is loaded (its SHA-256 checked) when the cache lacks it, whatever
    precision the run trains in; a missing one is refused, with the way to get it, where training is not
    allowed; a changed recipe never finds it."""
    from kdbook_utils import checkpoints
    from kdbook_utils.experiments import TeacherNotTrainedError
    from kdbook_utils.lessons.teachers import ship

    trained = cached_teacher("resnet8", splits, epochs=1, batch_size=32, progress=False)
    folder = tmp_path / "shipped"

    class Runner:  # the part of a lesson runner that ship() reads
        lesson, preset, device = "demo", get_preset("smoke"), torch.device("cpu")

        def __init__(self) -> None:
            self.splits = splits

        def trained_models(self) -> dict:
            return {"teacher": trained}

        def accuracy(self, model: nn.Module, split: str) -> float:
            return float(evaluate(model, TensorLoader(getattr(splits, split), 256, train=False))["accuracy"])

    (record,) = ship(Runner(), "a test", folder)  # type: ignore[arg-type]
    assert record["stored_as"] == "float16" and record["precision"] == "float32"
    assert 0 <= record["test_accuracy"] <= 100 and record["sha256"] == checkpoints.file_sha256(
        folder / record["file"]
    )
    monkeypatch.setattr(checkpoints, "SHIPPED", folder)
    monkeypatch.setattr(
        experiments_module, "shipped_model", lambda name: checkpoints.shipped_model(name, folder)
    )
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "empty-cache"))
    for precision in (None, "bf16"):
        found = cached_teacher("resnet8", splits, epochs=1, batch_size=32, progress=False, precision=precision,
                               may_train=False)  # fmt: skip
        assert found.source == "shipped" and found.record["sha256"] == record["sha256"]
        for name, value in trained.model.state_dict().items():  # the half-precision copy, back in float32
            loaded = found.model.state_dict()[name]
            assert loaded.dtype == value.dtype
            torch.testing.assert_close(
                loaded, value.half().to(value.dtype) if value.is_floating_point() else value
            )
    with pytest.raises(TeacherNotTrainedError, match="train_teachers=True"):
        cached_teacher("resnet8", splits, epochs=2, batch_size=32, progress=False, may_train=False)


# -------------------------------------------------------------------------------------------- students


def test_train_student_measures_val_and_test_per_output(splits: DataSplits) -> None:
    teacher = cached_teacher("resnet8", splits, epochs=1, batch_size=32, progress=False).model
    alone = train_student(lambda: create_model("resnet8", 10), None, splits, seed=0, epochs=1, batch_size=32)
    assert set(alone.accuracy) == {"val", "test"} and list(alone.accuracy["test"].index) == ["final"]
    exits = train_student(lambda: create_model("resnet8", 10), lambda s: MSKD(MultiExit(s), teacher), splits,
                          seed=0, epochs=1, batch_size=32)  # fmt: skip
    assert list(exits.accuracy["test"].index) == ["stage1", "stage2", "final", "ensemble"]
    rows = exits.rows(method="MSKD", seed=0)
    assert len(rows) == 8 and {row["split"] for row in rows} == {"val", "test"}
    assert all(0 <= row["accuracy"] <= 100 for row in rows)


class NaNLoss(nn.Module):
    """A method whose loss is NaN: training must stop, and the run be flagged rather than raised."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        return logits, {"ce": torch.nn.functional.cross_entropy(logits, labels) * float("nan")}


def constant_student() -> nn.Module:
    model = create_model("resnet8", 10)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)  # every image gets class 0: chance accuracy
    return model


def test_a_run_at_chance_or_with_a_nan_loss_is_flagged_as_failed(splits: DataSplits) -> None:
    from kdbook_utils.train import Distiller

    class Wrapped(Distiller):
        forward = NaNLoss.forward

    at_chance = train_student(constant_student, None, splits, seed=0, epochs=1, lr=1e-12, batch_size=32)
    assert at_chance.accuracy["val"]["final"] < 15 and "at or near chance" in at_chance.failed
    broken = train_student(constant_student, Wrapped, splits, seed=0, epochs=1, batch_size=32)
    assert broken.failed.startswith("non-finite loss") and "NaN" in broken.failed
    good = train_student(lambda: create_model("resnet8", 10), None, splits, seed=0, epochs=10, batch_size=16)
    assert good.failed == ""


def test_run_seeds_makes_a_tidy_table_and_reuses_kept_runs(splits: DataSplits) -> None:
    calls = []

    def run(seed: int):
        calls.append(seed)
        return train_student(lambda: tiny_cnn(seed), None, splits, seed=seed, epochs=1, batch_size=32)

    kept = {}
    table = run_seeds({"alone": run}, [0, 1], progress=False, keep=kept, lesson="test")
    assert list(table.columns) == [
        "lesson",
        "method",
        "seed",
        "split",
        "output",
        "accuracy",
        "seconds",
        "failed",
    ]
    assert len(table) == 4 and set(table["split"]) == {"val", "test"}
    run_seeds({"alone": run}, [0, 1], progress=False, keep=kept)
    assert calls == [0, 1]


# ------------------------------------------------------------------------------------------ comparisons


def synthetic_runs(differences: dict[str, float], seeds: int, noise: float, seed: int = 0) -> pd.DataFrame:
    """Runs where each method is the baseline plus a known difference plus paired noise."""
    generator = np.random.default_rng(seed)
    rows = []
    base = 75 + 6 * generator.standard_normal(seeds)  # seed-to-seed variation shared by all methods
    for method, difference in {"alone": 0.0, **differences}.items():
        values = base + difference + noise * generator.standard_normal(seeds)
        rows += [{"method": method, "seed": s, "split": "test", "output": "final", "accuracy": v, "failed": ""}
                 for s, v in enumerate(values)]  # fmt: skip
    return pd.DataFrame(rows)


def test_the_paired_interval_matches_the_t_formula() -> None:
    differences = [1.0, 2.0, 3.0, 2.5, 1.5]
    result = paired_interval(differences)
    mean, sd, n = np.mean(differences), np.std(differences, ddof=1), len(differences)
    half = 2.7764451051977987 * sd / math.sqrt(n)  # t_{0.975, 4}
    assert result["difference"] == pytest.approx(mean)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert result["verdict"] == "better"


def test_verdicts_follow_known_differences() -> None:
    runs = synthetic_runs({"helps": 3.0, "hurts": -3.0, "same": 0.0}, seeds=5, noise=0.5)
    comparison = compare(runs, "alone")
    assert comparison.verdict("helps") == "better"
    assert comparison.verdict("hurts") == "worse"
    assert comparison.verdict("same") == "inconclusive"
    assert comparison.table.loc["helps", "ci_low"] > 0 > comparison.table.loc["hurts", "ci_high"]
    # pairing removes the shared seed-to-seed variation: the interval is far narrower than the std
    assert (
        comparison.table.loc["helps", "ci_high"] - comparison.table.loc["helps", "ci_low"]
        < comparison.table.loc["alone", "std"]
    )
    sentence = comparison.sentence("helps")
    assert "better than the baseline" in sentence and "95 % interval" in sentence and "5 seeds" in sentence


def test_one_seed_gets_numbers_but_no_verdict_and_failed_runs_are_left_out() -> None:
    one = compare(synthetic_runs({"helps": 3.0}, seeds=1, noise=0.5), "alone")
    assert one.verdict("helps") == "no verdict" and "no verdict" in one.sentence("helps")

    runs = synthetic_runs({"helps": 3.0, "broken": 0.0}, seeds=4, noise=0.5)
    runs.loc[(runs["method"] == "broken"), "failed"] = "accuracy 10.0 % is at or near chance"
    runs.loc[(runs["method"] == "helps") & (runs["seed"] == 0), "failed"] = "non-finite loss"
    comparison = compare(runs, "alone")
    assert comparison.verdict("broken") == "failed" and "not interpreted" in comparison.sentence("broken")
    assert comparison.table.loc["helps", "seeds"] == 3 and comparison.table.loc["helps", "failed"] == 1
    with pytest.raises(ValueError, match="No runs of"):
        compare(runs, "nobody")


def test_compare_picks_the_final_output_of_multi_exit_runs() -> None:
    runs = synthetic_runs({"mskd": 2.0}, seeds=3, noise=0.1)
    extra = runs[runs["method"] == "mskd"].assign(output="ensemble", accuracy=lambda t: t["accuracy"] + 5)
    runs = pd.concat([runs, extra])
    assert compare(runs, "alone").table.loc["mskd", "difference"] == pytest.approx(2.0, abs=0.5)
    assert compare(runs, "alone", output="ensemble").table.loc["mskd", "difference"] == pytest.approx(
        7.0, abs=0.5
    )


def test_seeding_makes_paired_runs_see_the_same_batches(splits: DataSplits) -> None:
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for name in seen:
        loader = TensorLoader(splits.train, 32, train=True, seed=7)
        seed_everything(7)
        seen[name] = [labels.clone() for _, labels in loader]
    assert all(torch.equal(a, b) for a, b in zip(seen["a"], seen["b"]))


# ------------------------------------------------------------------------ the cache, correct by construction


def test_the_cache_refreshes_when_the_teachers_weights_are_replaced(splits: DataSplits) -> None:
    for augment in (False, True):
        teacher = tiny_cnn(0).eval()
        counter = ForwardCounter(teacher)
        cache = TeacherOutputCache()
        kd_student(splits, teacher, cache, augment=augment)
        passes = counter.count
        teacher.load_state_dict(tiny_cnn(1).state_dict())  # another teacher's weights, in place
        with_cache = kd_student(splits, teacher, cache, augment=augment)
        assert counter.count == 2 * passes, "every batch must run the new teacher, none served from the old"
        assert cache.dropped > 0, "the old teacher's outputs are dropped, not kept taking memory"
        without = kd_student(splits, teacher, None, augment=augment)
        for name, tensor in with_cache.state_dict().items():
            assert torch.equal(tensor, without.state_dict()[name]), name


def test_the_cache_refreshes_when_the_training_images_change_in_place(splits: DataSplits) -> None:
    train = load_dataset("digits", "train", subset=96, seed=0).resized(16)
    changed = DataSplits(train, splits.val, splits.test)
    teacher = tiny_cnn(0).eval()
    counter = ForwardCounter(teacher)
    cache = TeacherOutputCache()
    kd_student(changed, teacher, cache, augment=False)
    passes = counter.count
    train.images[:10] = 255 - train.images[:10]  # edited in place: the same tensor, other pixels
    kd_student(changed, teacher, cache, augment=False)
    assert counter.count == 2 * passes
    kd_student(changed, teacher, cache, augment=False)  # unchanged since: served from the cache
    assert counter.count == 2 * passes


def test_outputs_computed_in_another_precision_are_other_entries(splits: DataSplits) -> None:
    teacher = tiny_cnn(0).eval()
    counter = ForwardCounter(teacher)
    loader = TensorLoader(splits.train, 32, train=True, augment=False, seed=0)
    view = TeacherOutputCache().for_loader(loader)
    images, labels = next(iter(loader.epoch_batches(0)))
    float32 = view.outputs(teacher, images, labels, (), 0, 0)
    assert counter.count == 1 and torch.equal(
        view.outputs(teacher, images, labels, (), 0, 0).logits, float32.logits
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bfloat16 = view.outputs(teacher, images, labels, (), 0, 0)
    assert counter.count == 2, "bfloat16 outputs are not served from float32 ones"
    assert not torch.equal(bfloat16.logits, float32.logits)
    assert counter.count == 2 and view.cache.hits == 1


def test_weight_checks_cost_little_next_to_a_teacher_pass(splits: DataSplits) -> None:
    teacher = create_model("resnet20", 10).eval()
    loader = TensorLoader(splits.train, 32, train=True, augment=False, seed=0)
    view = TeacherOutputCache().for_loader(loader)
    images, labels = next(iter(loader.epoch_batches(0)))
    started = time.perf_counter()
    view.outputs(teacher, images, labels, (), 0, 0)  # the pass, and the weights' hash once
    miss = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(5):
        view.outputs(teacher, images, labels, (), 0, 0)
    hit = (time.perf_counter() - started) / 5
    assert view.cache.hits == 5 and hit < miss / 3, (hit, miss)


# -------------------------------------------------------------------------- comparisons refuse, not guess


def test_too_few_paired_seeds_say_how_many_were_paired() -> None:
    runs = synthetic_runs({"helps": 3.0}, seeds=3, noise=0.5)
    runs.loc[(runs["method"] == "helps") & (runs["seed"] < 2), "failed"] = "non-finite loss"
    one = compare(runs, "alone")
    assert one.verdict("helps") == "no verdict" and one.table.loc["helps", "seeds"] == 1
    assert "1 paired seed" in one.sentence("helps")
    runs.loc[(runs["method"] == "alone") & (runs["seed"] == 2), "failed"] = "non-finite loss"
    none = compare(runs, "alone")
    assert none.table.loc["helps", "seeds"] == 0 and "no seed on which both ran" in none.sentence("helps")


def test_an_inconclusive_sentence_says_the_interval_contains_zero_and_its_width() -> None:
    comparison = compare(synthetic_runs({"same": 0.0}, seeds=5, noise=0.5), "alone")
    row = comparison.table.loc["same"]
    assert row["verdict"] == "inconclusive" and row["ci_low"] < 0 < row["ci_high"]
    width = f"{row['ci_high'] - row['ci_low']:.1f} points wide, contains zero"
    assert f"**inconclusive: the interval, {width}" in comparison.sentence("same")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda runs: runs.assign(accuracy=runs["accuracy"].where(runs["seed"] != 1)),
            "not flagged as failed",
        ),
        (lambda runs: pd.concat([runs, runs.assign(stage="sweep")]), "several stages"),
        (lambda runs: runs.assign(seed=runs["seed"] + 10 * (runs["method"] == "helps")), "no seed in common"),
    ],
)
def test_compare_refuses_what_it_cannot_judge(change, message: str) -> None:
    runs = synthetic_runs({"helps": 3.0}, seeds=3, noise=0.5).assign(stage="final")
    with pytest.raises(ValueError, match=message):
        compare(change(runs), "alone")


# -------------------------------------------------------------------------------------- results files


def results(rows: int, accuracy: float) -> pd.DataFrame:
    """A results table of ``rows`` runs, every accuracy ``accuracy`` (so a table read back names its write)."""
    return pd.DataFrame({"lesson": "hinton", "stage": "final", "method": "KD", "seed": range(rows), "split": "test",
                         "output": "final", "accuracy": accuracy, "seconds": 1.5, "failed": ""})  # fmt: skip


def test_results_round_trip_with_provenance(tmp_path: Path) -> None:
    runs = results(4, 81.25)
    runs.loc[2, ["accuracy", "failed"]] = (math.nan, "non-finite loss (epoch 1, batch 2, term 'kd')")
    write_results(runs, tmp_path / "lab" / "hinton", {"command": "python -m ..."})
    back, provenance = read_results(tmp_path / "lab" / "hinton")
    pd.testing.assert_frame_equal(back[runs.columns].fillna({"accuracy": -1}), runs.fillna({"accuracy": -1}),
                                  check_dtype=False)  # fmt: skip
    assert provenance["command"] == "python -m ..." and provenance["results_table"]["rows"] == 4
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == [
        "hinton.csv",
        "hinton.json",
    ]  # no temporaries


def test_an_interrupted_write_leaves_the_old_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = tmp_path / "hinton"
    write_results(results(3, 70.0), stem, {"run": "old"})
    synced = []

    def fail_at_the_second_file(
        descriptor: int,
    ) -> None:  # the table's temporary file is written, then the stop
        synced.append(descriptor)
        if len(synced) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fail_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        write_results(results(3, 90.0), stem, {"run": "new"})
    monkeypatch.undo()
    runs, provenance = read_results(stem)
    assert (runs["accuracy"] == 70.0).all() and provenance["run"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hinton.csv", "hinton.json"]


def test_a_write_stopped_between_the_two_files_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stem = tmp_path / "hinton"
    write_results(results(3, 70.0), stem, {"run": "old"})
    replace = os.replace
    calls = []

    def stop_before_the_provenance(source: str, target: str) -> None:
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", stop_before_the_provenance)
    with pytest.raises(KeyboardInterrupt):
        write_results(results(3, 90.0), stem, {"run": "new"})
    monkeypatch.undo()
    with pytest.raises(ResultsFileError, match=r"hinton.csv does not match its provenance"):
        read_results(stem)  # a new table with the old provenance is never shown as the old (or new) results


WRITER = """
import sys
from pathlib import Path
import pandas as pd
from kdbook_utils.experiments import write_results

stem, rows = Path(sys.argv[1]), int(sys.argv[2])
for k in range(10**6):
    table = pd.DataFrame({"lesson": "hinton", "stage": "final", "method": "KD", "seed": range(rows), "split": "test",
                          "output": "final", "accuracy": float(k % 100), "seconds": 1.5, "failed": ""})
    write_results(table, stem, {"write": k})
    Path(str(stem) + ".done").write_text(str(k))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_killing_a_writer_mid_write_never_leaves_a_table_that_reads_back_wrong(tmp_path: Path) -> None:
    """A writer rewriting a large results file is killed while one of its temporary files is on disk (no
    Python cleanup runs, as in a power cut); each time the files read back as one complete write (the table
    and its provenance agree), or are refused as mismatched: never a partial table."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    outcomes = []
    for attempt in range(3):
        folder = tmp_path / f"run{attempt}"
        stem = folder / "hinton"
        writer = subprocess.Popen([sys.executable, str(script), str(stem), "20000"], env=environment)
        partial: list[Path] = []
        try:
            deadline = time.monotonic() + 180
            while not partial and time.monotonic() < deadline:
                assert writer.poll() is None, "the writer ended before it could be killed"
                if Path(str(stem) + ".done").is_file():  # one whole write is there: now catch the next
                    partial = list(folder.glob(".hinton.*.tmp"))
                time.sleep(0.001)
            assert partial, "never caught the writer with a temporary file on disk"
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert writer.returncode == -signal.SIGKILL
        try:
            runs, provenance = read_results(stem)
        except ResultsFileError as error:
            assert "does not match its provenance" in str(error)
            outcomes.append("refused")
            continue
        assert len(runs) == 20000 and runs["accuracy"].nunique() == 1
        assert runs["accuracy"].iloc[0] == provenance["write"] % 100, (
            "the table is the one its provenance names"
        )
        outcomes.append("complete")
    assert "complete" in outcomes, outcomes
