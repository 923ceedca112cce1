"""The experiment jobs: cached teachers, the teacher-output cache, student runs over seeds, and the paired
comparison that tells a gain from seed noise."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kdbook_utils.data import DataSplits, TensorLoader, load_dataset
from kdbook_utils.experiments import (
    TeacherCacheMismatch,
    TeacherOutputCache,
    cached_adapted_teacher,
    cached_teacher,
    cached_teacher_exits,
    compare,
    paired_interval,
    run_seeds,
    train_student,
)
from kdbook_utils.methods.crosslayer import CrossLayerDistiller
from kdbook_utils.methods.hinton import HintonKD
from kdbook_utils.methods.mskd import MSKD
from kdbook_utils.models import create_model
from kdbook_utils.models.multi_exit import MultiExit
from kdbook_utils.train import fit, seed_everything


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
    exits = cached_teacher_exits(teacher, splits, epochs=1, batch_size=32, progress=False)
    assert isinstance(exits, MultiExit) and exits.exit_names == ("stage1", "stage2", "final")
    for name, value in teacher.state_dict().items():  # the frozen backbone is the trained teacher
        assert torch.equal(exits.backbone.state_dict()[name], value)
    again = cached_teacher_exits(teacher, splits, epochs=1, batch_size=32, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in exits.state_dict().items())

    wide = cached_teacher("resnet10_cifar", splits, epochs=1, batch_size=32, model_options={"base_width": 8},
                          progress=False).model  # fmt: skip
    student = create_model("resnet10_cifar", 10, base_width=4)
    adapted = cached_adapted_teacher(wide, student, splits, epochs=1, batch_size=32, progress=False)
    assert any(point.endswith("_reduce") for point in adapted.feature_points)


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
