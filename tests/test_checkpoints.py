"""Checkpoints: round trips, refusals with clear messages, atomic writes, safe loading, the cache."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kdbook_utils import checkpoints
from kdbook_utils.checkpoints import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    UnverifiedCheckpointWarning,
    cache_dir,
    content_sha256,
    load_checkpoint,
    load_or_train,
    read_checkpoint,
    save_checkpoint,
)
from kdbook_utils.models import create_model

REPO = Path(__file__).resolve().parents[1]


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


def test_cache_dir_is_made_where_kdbook_cache_points(private_cache: Path) -> None:
    assert cache_dir() == private_cache and private_cache.is_dir()
    assert checkpoints.CACHE_ENV_VAR == "KDBOOK_CACHE"


def test_half_precision_storage_halves_the_file_and_loads_back_as_float32(tmp_path: Path) -> None:
    model = trained_looking(seed=0)
    full = save_checkpoint(model, tmp_path / "full.pt")
    half = save_checkpoint(model, tmp_path / "half.pt", storage=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    fresh = trained_looking(seed=1)
    load_checkpoint(fresh, half)
    for name, value in model.state_dict().items():
        loaded = fresh.state_dict()[name]
        assert loaded.dtype == value.dtype, name  # back in the model's own dtype
        if value.is_floating_point():
            torch.testing.assert_close(loaded, value.half().to(value.dtype), rtol=0, atol=0)
        else:
            assert torch.equal(loaded, value), name  # integer buffers are stored as they are


def test_left_out_weights_are_kept_from_the_model_and_nothing_else_may_be_missing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    path = save_checkpoint(model, tmp_path / "heads.pt", leave_out=("0.",))
    assert read_checkpoint(path)["metadata"]["left_out"] == ["0."]
    assert set(read_checkpoint(path)["state_dict"]) == {"1.weight", "1.bias"}
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    kept = other[0].weight.detach().clone()
    load_checkpoint(other, path)
    assert torch.equal(other[0].weight, kept) and torch.equal(other[1].weight, model[1].weight)
    plain = save_checkpoint(nn.Sequential(nn.Linear(3, 4)), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(other, plain)  # without left_out, a missing layer is an error


def test_a_shipped_model_is_found_by_name_and_refused_when_its_bytes_changed(tmp_path: Path) -> None:
    folder = tmp_path / "teachers"
    path = save_checkpoint(trained_looking(seed=0), folder / "resnet_abc.pt", storage=torch.float16)
    manifest = {"models": {"resnet_abc.pt": {"sha256": checkpoints.file_sha256(path), "test_accuracy": 90.0}}}
    (folder / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    found, record = checkpoints.shipped_model("resnet_abc.pt", folder)
    assert found == path and record["test_accuracy"] == 90.0
    assert checkpoints.shipped_model("other.pt", folder) is None
    assert checkpoints.shipped_model("resnet_abc.pt", tmp_path / "nothing") is None
    with open(path, "r+b") as file:  # one byte changed: the manifest's SHA-256 no longer matches
        file.seek(100)
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 1]))
    with pytest.raises(checkpoints.ShippedModelError, match="Reinstall the package"):
        checkpoints.shipped_model("resnet_abc.pt", folder)


def test_the_shipped_manifest_matches_the_shipped_files() -> None:
    """Every file the package ships is in its manifest with the right SHA-256, and the other way round."""
    files = {path.name for path in checkpoints.SHIPPED.glob("*.pt")}
    manifest = checkpoints.shipped_models()
    assert files == set(manifest)
    for name, record in manifest.items():
        assert checkpoints.file_sha256(checkpoints.SHIPPED / name) == record["sha256"], name
        for key in ("recipe", "trained_on", "precision", "stored_as", "test_accuracy", "command", "commit"):
            assert key in record, f"{name}: the manifest lacks {key!r}"


def test_round_trip_restores_weights_buffers_and_metadata(tmp_path: Path) -> None:
    model = trained_looking(seed=0)
    path = save_checkpoint(model, tmp_path / "model.pt", epochs=3, note="teacher", accuracy=[0.5, 0.75])
    fresh = trained_looking(seed=1)
    metadata = load_checkpoint(fresh, path)
    assert_same_state(model, fresh)
    assert metadata == {"epochs": 3, "note": "teacher", "accuracy": [0.5, 0.75]}

    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "resnet8" and raw["num_classes"] == 10
    assert set(raw) == {"arch", "num_classes", "state_dict", "metadata", "sha256"}
    assert raw["sha256"] == content_sha256(raw) and len(raw["sha256"]) == 64


def test_the_hash_covers_every_weight_and_value() -> None:
    checkpoint = {
        "arch": "resnet8",
        "num_classes": 10,
        "state_dict": trained_looking().state_dict(),
        "metadata": {"epochs": 3, "history": {"val_acc": [50.0, 75.0]}},
    }
    reference = content_sha256(checkpoint)
    assert content_sha256({**checkpoint, "sha256": "anything"}) == reference  # the hash key is left out

    def changed(**replacement: object) -> str:
        return content_sha256({**checkpoint, **replacement})

    state = dict(checkpoint["state_dict"])
    weight = state["stage2.0.conv1.weight"].clone()
    weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(1.0))  # one ulp
    assert changed(state_dict={**state, "stage2.0.conv1.weight": weight}) != reference
    state.pop("classifier.bias")
    assert changed(state_dict=state) != reference
    assert changed(num_classes=100) != reference and changed(arch="resnet20") != reference
    assert changed(metadata={"epochs": 3, "history": {"val_acc": [50.0, 75.5]}}) != reference
    assert (
        changed(metadata={"epochs": 3.0, "history": {"val_acc": [50.0, 75.0]}}) != reference
    )  # int vs float
    assert changed(metadata={"epochs": "3", "history": {"val_acc": [50.0, 75.0]}}) != reference


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
    with pytest.raises(TypeError, match=r"metadata\['optimizer'\] must be a plain value.*got a torch.optim"):
        save_checkpoint(
            trained_looking(), tmp_path / "x.pt", optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))])
        )
    # A NumPy number is a float subclass but pickles as a NumPy object, which weights_only refuses.
    with pytest.raises(TypeError, match=r"metadata\['accuracy'\].*got a numpy.float64.*x.item\(\)"):
        save_checkpoint(trained_looking(), tmp_path / "x.pt", accuracy=np.float64(93.5))
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


def test_a_truncated_or_changed_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = save_checkpoint(trained_looking(), tmp_path / "model.pt")
    good = path.read_bytes()
    path.write_bytes(good[:1000])
    with pytest.raises(
        CorruptCheckpointError, match=r"(?i)model\.pt is corrupt: it is cut short.*delete it to retrain"
    ):
        load_checkpoint(trained_looking(), path)
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=r"(?i)empty \(0 bytes\).*delete it to retrain"):
        load_checkpoint(trained_looking(), path)
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x10  # one bit in the middle: inside a tensor's bytes
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptCheckpointError, match=r"(?i)fails its CRC-32 check.*delete it to retrain"):
        load_checkpoint(trained_looking(), path)


def test_a_weight_changed_inside_a_valid_file_fails_the_hash(tmp_path: Path) -> None:
    # Rewritten with valid zip checksums (as a tool that edits the file would): only the hash can tell.
    path = save_checkpoint(trained_looking(), tmp_path / "model.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["classifier.weight"][0, 0] += 1e-6
    torch.save(checkpoint, path)
    model = trained_looking(seed=4)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="do not match the SHA-256 written when it was saved"):
        load_checkpoint(model, path)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("epoch 1: loss 2.3\n")
    with pytest.raises(NotACheckpointError, match=r"notes\.pt is not a checkpoint: it is a text file"):
        load_checkpoint(trained_looking(), text)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(NotACheckpointError, match="binary data that no PyTorch file starts with"):
        load_checkpoint(trained_looking(), noise)
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        opened.writestr("README.txt", "not weights")
    with pytest.raises(NotACheckpointError, match=r"a zip archive of other files \(README.txt\)"):
        load_checkpoint(trained_looking(), archive)
    pickled = tmp_path / "plain.pkl"
    pickled.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    with pytest.raises(NotACheckpointError, match="a Python pickle"):
        load_checkpoint(trained_looking(), pickled)
    bare = tmp_path / "weights.pt"
    torch.save(trained_looking().state_dict(), bare)  # a bare state dict, not a kdbook checkpoint
    with pytest.raises(NotACheckpointError, match=r"bare state_dict of 56 tensors.*model\.load_state_dict"):
        load_checkpoint(trained_looking(), bare)
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint(trained_looking(), tmp_path / "missing.pt")


def test_a_checkpoint_saved_before_the_hash_loads_with_a_warning(tmp_path: Path) -> None:
    original = trained_looking(seed=0)
    path = save_checkpoint(original, tmp_path / "old.pt", epochs=2)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["sha256"]
    torch.save(checkpoint, path)
    fresh = trained_looking(seed=1)
    with pytest.warns(UnverifiedCheckpointWarning, match=r"old\.pt was saved before .* SHA-256"):
        assert load_checkpoint(fresh, path) == {"epochs": 2}
    assert_same_state(original, fresh)
    save_checkpoint(fresh, path, epochs=2)  # saving again adds the hash: no warning any more
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(trained_looking(seed=2), path)


def flip_random_bytes(data: bytes, rng: random.Random) -> bytes:
    """1 to 8 bytes XOR-ed with a non-zero value: anywhere, in the first 4 KiB (zip header and pickle) or
    in the last 4 KiB (the zip's central directory)."""
    damaged = bytearray(data)
    region = rng.choice(["anywhere", "start", "end"])
    low, high = {"anywhere": (0, len(data)), "start": (0, 4096), "end": (len(data) - 4096, len(data))}[region]
    for _ in range(rng.randint(1, 8)):
        damaged[rng.randrange(low, high)] ^= rng.randint(1, 255)
    return bytes(damaged)


def test_flipped_bytes_never_load_as_different_weights(tmp_path: Path) -> None:
    # Property: whatever bytes change, a load either refuses the file as corrupt (or as no checkpoint,
    # when the zip's own signature is hit) or returns exactly the saved weights and metadata.
    original = trained_looking(seed=0)
    path = save_checkpoint(original, tmp_path / "model.pt", epochs=3, note="teacher")
    good = path.read_bytes()
    rng = random.Random(2024)
    outcomes = {"refused": 0, "identical": 0}
    for trial in range(300):
        damaged = flip_random_bytes(good, rng) if trial % 10 else good[: rng.randrange(len(good))]
        path.write_bytes(damaged)
        model = trained_looking(seed=1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UnverifiedCheckpointWarning)
                metadata = load_checkpoint(model, path)
        except (CorruptCheckpointError, NotACheckpointError) as error:
            assert "arbitrary code" not in str(error)
            assert "delete it to retrain" in str(error).lower(), str(error)
            outcomes["refused"] += 1
        else:  # the change missed everything that is read (e.g. zip padding): the same weights
            assert_same_state(original, model)
            assert metadata == {"epochs": 3, "note": "teacher"}
            outcomes["identical"] += 1
    assert outcomes["refused"] >= 250, outcomes


WRITER = """
import os, sys, time
import torch
from torch import nn
from kdbook_utils.checkpoints import save_checkpoint

real_fdopen = os.fdopen


class SlowFile:
    # Writes trickle out in 64 KiB pieces, so the test can kill this process in the middle of one.
    def __init__(self, file):
        self.file = file

    def write(self, data):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), 1 << 16):
            self.file.write(view[start : start + (1 << 16)])
            self.file.flush()
            time.sleep(0.002)
        return len(view)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


os.fdopen = lambda *args, **kwargs: SlowFile(real_fdopen(*args, **kwargs))
torch.manual_seed(int(sys.argv[2]))
model = nn.Sequential(nn.Linear(512, 4096), nn.Linear(4096, 512))
model.arch, model.num_classes = "two_linear", 512
save_checkpoint(model, sys.argv[1])
"""


def two_linear(seed: int) -> nn.Module:
    """The writer's model (4.2 M parameters, a 17 MB checkpoint)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(512, 4096), nn.Linear(4096, 512))
    model.arch, model.num_classes = "two_linear", 512
    return model


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_killing_a_writer_mid_write_leaves_the_old_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    old = two_linear(seed=0)
    save_checkpoint(old, path)
    old_bytes = path.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, str(script), str(path), "1"], env=environment)
    partial = None
    try:
        deadline = time.monotonic() + 180
        while partial is None and time.monotonic() < deadline:
            assert writer.poll() is None, "the writer ended before it could be killed"
            temporaries = [p for p in tmp_path.glob(".big.pt.*.tmp") if p.stat().st_size > 1 << 20]
            partial = temporaries[0] if temporaries else None
            time.sleep(0.005)
        assert partial is not None, "the writer never started writing"
        os.kill(writer.pid, signal.SIGKILL)  # no Python cleanup runs: as a power cut or the OOM killer
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert 1 << 20 < partial.stat().st_size < len(old_bytes), "killed in the middle of the write"
    assert path.read_bytes() == old_bytes
    reloaded = two_linear(seed=5)
    load_checkpoint(reloaded, path)
    assert_same_state(old, reloaded)
    with pytest.raises(CorruptCheckpointError):  # the orphaned temporary file is no checkpoint either
        read_checkpoint(partial)


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


def test_load_or_train_retrains_a_corrupt_checkpoint_only_on_request(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    calls: list[int] = []

    def train(model: nn.Module) -> pd.DataFrame:
        calls.append(1)
        return pd.DataFrame({"epoch": [1], "train_loss": [0.5]})

    load_or_train(trained_looking(seed=0), path, train)
    path.write_bytes(path.read_bytes()[:5000])  # e.g. a copy cut short
    with pytest.raises(CorruptCheckpointError, match=r"(?i)delete it to retrain.*retrain_if_corrupt=True"):
        load_or_train(trained_looking(seed=1), path, train)
    assert len(calls) == 1
    with pytest.warns(UserWarning, match=r"teacher\.pt is corrupt.*Retraining"):
        _, history, loaded = load_or_train(trained_looking(seed=1), path, train, retrain_if_corrupt=True)
    assert (loaded, len(calls)) == (False, 2) and list(history["epoch"]) == [1]
    _, _, loaded = load_or_train(trained_looking(seed=2), path, train, retrain_if_corrupt=True)
    assert (loaded, len(calls)) == (True, 2)
    # A file that is no checkpoint at all is never overwritten, even on request.
    path.write_text("my notes")
    with pytest.raises(NotACheckpointError):
        load_or_train(trained_looking(), path, train, retrain_if_corrupt=True)
    assert path.read_text() == "my notes"
