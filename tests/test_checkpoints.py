"""Checkpoints: round trips, refusals with clear messages, atomic writes, safe loading, the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
import torch
from torch import nn

from kdbook_utils import checkpoints
from kdbook_utils.checkpoints import (
    CheckpointError,
    cache_dir,
    checkpoint_path,
    download_checkpoint,
    load_checkpoint,
    load_or_train,
    save_checkpoint,
)
from kdbook_utils.data import load_dataset
from kdbook_utils.models import create_model
from kdbook_utils.presets import get_preset


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDBOOK_CACHE", str(cache))
    return cache


def trained_looking(name: str = "resnet8", num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A model with random weights *and* non-default BatchNorm statistics (buffers must round-trip too)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(seed + 7)
    return model


def assert_same_state(first: nn.Module, second: nn.Module) -> None:
    second_state = second.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(value, second_state[name]), name


def test_cache_dir_and_checkpoint_names(private_cache: Path) -> None:
    assert cache_dir() == private_cache and private_cache.is_dir()
    path = checkpoint_path("resnet32", "digits", "quick", 0)
    assert path == private_cache / "checkpoints" / "resnet32_digits_quick_seed0.pt"
    assert (
        checkpoint_path("resnet8", "cifar10", "lab", 2, tag="30ep").name
        == "resnet8_cifar10_lab_seed2_30ep.pt"
    )
    with pytest.raises(ValueError, match="path separators"):
        checkpoint_path("../resnet8", "digits", "quick", 0)


def test_round_trip_restores_weights_buffers_and_metadata(tmp_path: Path) -> None:
    model = trained_looking(seed=0)
    path = save_checkpoint(model, tmp_path / "model.pt", epochs=3, note="teacher", accuracy=[0.5, 0.75])
    fresh = trained_looking(seed=1)
    metadata = load_checkpoint(fresh, path)
    assert_same_state(model, fresh)
    assert metadata == {"epochs": 3, "note": "teacher", "accuracy": [0.5, 0.75]}

    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "resnet8" and raw["num_classes"] == 10
    assert set(raw) == {"arch", "num_classes", "state_dict", "metadata"}


def test_channels_last_weights_round_trip(tmp_path: Path) -> None:
    model = trained_looking().to(memory_format=torch.channels_last)
    path = save_checkpoint(model, tmp_path / "model.pt")
    fresh = trained_looking(seed=3)
    load_checkpoint(fresh, path)
    assert_same_state(model, fresh)


def test_another_architecture_or_class_count_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(trained_looking("resnet32", 100), tmp_path / "teacher.pt")
    with pytest.raises(
        CheckpointError, match="checkpoint is resnet32 with 100 classes, model is resnet8 with 100"
    ):
        load_checkpoint(create_model("resnet8", 100), path)
    with pytest.raises(
        CheckpointError, match="checkpoint is resnet32 with 100 classes, model is resnet32 with 10 "
    ):
        load_checkpoint(create_model("resnet32", 10), path)


def test_metadata_must_be_plain_values(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metadata\['optimizer'\] is a SGD"):
        save_checkpoint(
            trained_looking(), tmp_path / "x.pt", optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))])
        )
    assert not (tmp_path / "x.pt").exists()


def test_a_crash_mid_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    original = trained_looking(seed=0)
    save_checkpoint(original, path)
    good_bytes = path.read_bytes()

    def save_half_then_fail(obj: object, file: object, *args: object, **kwargs: object) -> None:
        file.write(good_bytes[: len(good_bytes) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(trained_looking(seed=1), path)  # overwriting a good checkpoint fails midway
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(trained_looking(seed=1), tmp_path / "new.pt")
    monkeypatch.undo()

    assert not (tmp_path / "new.pt").exists()
    assert path.read_bytes() == good_bytes  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary files left behind
    fresh = trained_looking(seed=2)
    load_checkpoint(fresh, path)
    assert_same_state(original, fresh)


class RunsCodeWhenUnpickled:
    """An object whose unpickling would call a function: what a weights-only load must refuse."""

    ran: ClassVar[list[str]] = []

    def __reduce__(self) -> tuple:
        return (RunsCodeWhenUnpickled.ran.append, ("code ran",))


def test_a_checkpoint_holding_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pt"
    model = trained_looking()
    torch.save(
        {
            "arch": "resnet8",
            "num_classes": 10,
            "state_dict": model.state_dict(),
            "metadata": RunsCodeWhenUnpickled(),
        },
        path,
    )
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint(trained_looking(seed=1), path)
    assert RunsCodeWhenUnpickled.ran == []


def test_a_truncated_or_foreign_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = save_checkpoint(trained_looking(), tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*Delete it"):
        load_checkpoint(trained_looking(), path)

    foreign = tmp_path / "weights.pt"
    torch.save(trained_looking().state_dict(), foreign)  # a bare state dict, not a kdbook checkpoint
    with pytest.raises(CheckpointError, match="not a kdbook checkpoint"):
        load_checkpoint(trained_looking(), foreign)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(trained_looking(), tmp_path / "missing.pt")


def test_load_or_train_trains_once_then_loads(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    calls: list[nn.Module] = []
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.5, 0.75], "val_acc": [0.5, float("nan")]})

    def train(model: nn.Module) -> pd.DataFrame:
        calls.append(model)
        with torch.no_grad():
            model.classifier.bias.fill_(0.25)  # "training" changes the weights
        return history

    model, first_history, loaded = load_or_train(trained_looking(seed=0), path, train, preset="quick")
    assert (loaded, len(calls)) == (False, 1)
    assert first_history is history

    again, second_history, loaded = load_or_train(trained_looking(seed=1), path, train, preset="quick")
    assert (loaded, len(calls)) == (True, 1)  # no second training
    assert_same_state(model, again)
    pd.testing.assert_frame_equal(second_history, history)
    assert load_checkpoint(trained_looking(), path)["preset"] == "quick"


def test_download_checks_the_hash_and_reuses_a_verified_file(tmp_path: Path) -> None:
    source = tmp_path / "hosted" / "teacher.pt"
    source.parent.mkdir()
    source.write_bytes(b"pretend these are weights" * 100)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()

    downloaded = download_checkpoint(source.as_uri(), digest, progress=False)
    assert downloaded == cache_dir() / "downloads" / "teacher.pt"
    assert downloaded.read_bytes() == source.read_bytes()

    source.unlink()  # a second call must not need the URL any more
    assert download_checkpoint(source.as_uri(), digest.upper(), progress=False) == downloaded

    wrong = "0" * 64
    other = tmp_path / "hosted" / "other.pt"
    other.write_bytes(b"something else")
    actual = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(CheckpointError, match=f"SHA-256 {actual}, expected {wrong}"):
        download_checkpoint(other.as_uri(), wrong, progress=False)
    assert sorted(p.name for p in (cache_dir() / "downloads").iterdir()) == ["teacher.pt"]


def test_an_unreachable_url_says_where_to_put_the_file(tmp_path: Path) -> None:
    missing = (tmp_path / "nowhere" / "teacher.pt").as_uri()
    with pytest.raises(CheckpointError, match="Could not download.*place it at .*downloads.teacher.pt"):
        download_checkpoint(missing, "a" * 64, progress=False)
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        download_checkpoint(missing, "abc")
    assert checkpoints.CACHE_ENV_VAR == "KDBOOK_CACHE"
