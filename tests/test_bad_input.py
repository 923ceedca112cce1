"""Bad input gets a clear error: one row per plausible wrong call a student or instructor might make.

Each case states the exact error type, the wrong value as the message must show it, and a phrase of the
fix the message must give. The table is grouped by module; add a row for every new check.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from kdbook_utils import cli
from kdbook_utils.checkpoints import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    cache_dir,
    load_checkpoint,
    load_or_train,
    save_checkpoint,
)
from kdbook_utils.data import (
    DamagedDataError,
    DatasetNotFoundError,
    DataSplits,
    TensorLoader,
    load_dataset,
    preset_data,
)
from kdbook_utils.errors import TrainingLoaderWarning, warn_if_training_loader
from kdbook_utils.experiments import (
    ResultsFileError,
    TeacherOutputCache,
    best_on_validation,
    cached_teacher,
    compare,
    paired_interval,
    read_results,
    run_seeds,
    train_student,
    write_results,
)
from kdbook_utils.features import FeatureExtractor, TrainingModeFeaturesWarning
from kdbook_utils.lessons.hinton import HintonLesson
from kdbook_utils.lessons.lsl import SETTINGS as LSL_SETTINGS
from kdbook_utils.lessons.records import check_recorded, record, recorded_comparison
from kdbook_utils.methods.hinton import HintonKD
from kdbook_utils.metrics import accuracy, confusion_matrix, count_flops, per_class_accuracy
from kdbook_utils.models import create_model
from kdbook_utils.plots import heatmap_grid, image_grid, plot_history, results_bar
from kdbook_utils.presets import Preset, get_preset
from kdbook_utils.train import fit
from kdbook_utils.widgets import interactive_figure, layer_dropdown, make_control


@dataclass(frozen=True)
class Case:
    """A wrong call, the error it must raise, and what its message must contain."""

    call: Callable[[Path], object]  # gets a fresh temporary folder
    error: type[BaseException]  # exactly this type, not merely a subclass
    value: str  # the wrong value, as the message shows it
    fix: str  # a phrase of the fix the message gives


def resnet8(in_channels: int = 3) -> nn.Module:
    return create_model("resnet8", 10, in_channels=in_channels).eval()


def saved(folder: Path, name: str = "model.pt") -> Path:
    return save_checkpoint(resnet8(), folder / name)


def truncated(folder: Path) -> Path:
    path = saved(folder)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def flipped(folder: Path) -> Path:
    path = saved(folder)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def written(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def other_zip(folder: Path) -> Path:
    path = folder / "slides.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", "lecture notes")
    return path


def bare_state_dict(folder: Path) -> Path:
    path = folder / "weights.pt"
    torch.save(resnet8().state_dict(), path)
    return path


def plot(scale: float = 1.0, label: str = "a") -> Figure:
    figure, ax = plt.subplots()
    ax.plot([0, 1], [scale, scale], label=label)
    return figure


def runs_with_a_diverged_one() -> pd.DataFrame:
    return pd.DataFrame(
        {"method": ["student"] * 2 + ["KD"] * 2, "seed": [0, 1] * 2, "accuracy": [90.0, 91.0, 93.0, np.nan]}
    )


def history() -> pd.DataFrame:
    return pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_acc": [50.0, 60.0]})


class UnusedHead(nn.Module):
    """A model with a head it never calls (as a multi-exit model with an exit switched off)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ------------------------------------------------------------------------- the experiment layer's inputs

DIGITS = load_dataset("digits", "train", subset=40, seed=0).resized(8)
SPLITS = DataSplits(DIGITS, DIGITS, DIGITS)


def runs_table(methods: dict[str, list[int]], **columns: object) -> pd.DataFrame:
    """A tidy table of test-split runs: ``{method: seeds}``; each accuracy is 80 + the seed + a method offset."""
    rows = [{"lesson": "hinton", "stage": "final", "method": method, "seed": seed, "split": "test",
             "output": "final", "accuracy": 80.0 + seed + offset, "seconds": 1.0, "failed": ""}
            for offset, (method, seeds) in enumerate(methods.items()) for seed in seeds]  # fmt: skip
    return pd.DataFrame(rows).assign(**columns)


def with_nan(table: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    table.loc[(table["method"] == method) & (table["seed"] == seed), "accuracy"] = np.nan
    return table


def two_stages() -> pd.DataFrame:
    """What a lesson's record() returns: a sweep stage and a final stage, both with seed 0."""
    sweep = runs_table({"student alone": [0], "KD": [0]}, stage="sweep")
    return pd.concat([sweep, runs_table({"student alone": [0, 1, 2], "KD": [0, 1, 2]})], ignore_index=True)


def results_file(folder: Path) -> Path:
    """A results file as write_results writes it (its stem: <folder>/hinton)."""
    stem = folder / "hinton"
    provenance = {"command": "python -m kdbook_utils run hinton --out results"}
    write_results(runs_table({"student alone": [0, 1], "KD": [0, 1]}), stem, provenance)
    return stem


def edited(folder: Path, change: Callable[[str], str], meta: Callable[[str], str] | None = None) -> Path:
    """A results file whose CSV (and, if given, JSON) text was changed by hand or cut short."""
    stem = results_file(folder)
    table = stem.with_suffix(".csv")
    table.write_text(change(table.read_text()))
    if meta is not None:
        stem.with_suffix(".json").write_text(meta(stem.with_suffix(".json").read_text()))
    return stem


def spreadsheet(text: str) -> str:
    """The table as a spreadsheet re-saves it: ';' between fields, ',' as the decimal point."""
    return "\n".join(line.replace(",", ";").replace(".", ",") for line in text.splitlines()) + "\n"


def percent(text: str) -> str:
    lines = text.splitlines()
    fields = lines[1].split(",")
    fields[6] = f"{fields[6]}%"
    return "\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n"


class CommandLineError(Exception):
    """The command line exited with status 2 (a bad argument); the message is what it printed to stderr."""


@contextlib.contextmanager
def environment(**variables: str) -> object:
    """Set environment variables inside the block and restore them afterwards."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def command_line(*argv: str, **variables: str) -> int:
    """Run ``python -m kdbook_utils argv`` in this process (with environment ``variables``); a bad argument
    (exit status 2) raises CommandLineError with what it printed to stderr."""
    err = io.StringIO()
    with environment(**variables), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(list(argv))
        except SystemExit as stop:
            status = int(stop.code or 0)
    if status == 2:
        raise CommandLineError(err.getvalue())
    return status


def a_file(folder: Path) -> Path:
    path = folder / "results.txt"
    path.write_text("not a folder")
    return path


def cifar_folder(folder: Path, first: bytes) -> Path:
    """A cifar-10-batches-py folder whose data_batch_1 holds ``first`` (the other files are whatever)."""
    pickles = folder / "cifar-10-batches-py"
    pickles.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (pickles / name).write_bytes(first if name == "data_batch_1" else b"")
    return folder


def half_a_pickle() -> bytes:
    whole = pickle.dumps({"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 20}, protocol=2)
    return whole[: len(whole) // 2]


def half_an_npz(folder: Path) -> Path:
    path = folder / "val_data.npz"
    np.savez(path, data=np.zeros((4, 3 * 64 * 64), np.uint8), labels=np.ones(4))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return folder


def only_the_archive(folder: Path) -> Path:
    (folder / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    return folder


def broken_jpeg_tree(folder: Path) -> Path:
    for split in ("train", "test"):
        for label in range(10):
            (folder / split / f"class{label}").mkdir(parents=True)
            (folder / split / f"class{label}" / "0.jpg").write_bytes(b"" if label == 3 else b"\xff\xd8broken")
    return folder


def as_error(call: Callable[[], object]) -> object:
    """Run ``call`` with warnings turned into errors, so a warning is checked like an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


def features_in_training_mode() -> object:
    model = resnet8().train()
    with torch.no_grad():
        return FeatureExtractor(model, ["stage1"])(torch.zeros(2, 3, 32, 32))


def a_cache_in(folder: Path) -> Path:
    with environment(KDBOOK_CACHE=str(a_file(folder))):
        return cache_dir()


uint8_images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------------------------------ models
    "model: a single image without a batch dimension": Case(
        lambda _: resnet8()(torch.randn(3, 32, 32)), ValueError, "(3, 32, 32)", "images.unsqueeze(0)"
    ),
    "model: grey images into an RGB model": Case(
        lambda _: resnet8()(torch.randn(2, 1, 32, 32)), ValueError, "got 1 channel", "in_channels=1"
    ),
    "model: channels last (N, H, W, C)": Case(
        lambda _: resnet8()(torch.randn(2, 32, 32, 3)), ValueError, "(2, 32, 32, 3)", "permute(0, 3, 1, 2)"
    ),
    "model: uint8 images": Case(
        lambda _: resnet8()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
        TypeError,
        "dtype torch.uint8",
        "kdbook_utils.data.TensorLoader",
    ),
    "model: integer images": Case(
        lambda _: resnet8()(torch.zeros(2, 3, 32, 32, dtype=torch.int64)),
        TypeError,
        "dtype torch.int64",
        "images.float()",
    ),
    "model: a NumPy array": Case(
        lambda _: resnet8()(np.zeros((2, 3, 32, 32), np.float32)),
        TypeError,
        "a NumPy array of shape (2, 3, 32, 32)",
        "torch.as_tensor",
    ),
    "model: images smaller than the model's downsampling allows": Case(
        lambda _: create_model("vgg8", 10)(torch.randn(2, 3, 4, 4)),
        ValueError,
        "got 4x4 images",
        "interpolate(images, size=(8, 8))",
    ),
    "create_model: an option the model does not take": Case(
        lambda _: create_model("resnet8", 10, image_size=64), TypeError, "'image_size'", "in_channels=3"
    ),
    "create_model: a misspelled option": Case(
        lambda _: create_model("vgg8", 10, imagesize=64),
        TypeError,
        "'imagesize'",
        "Did you mean 'image_size'",
    ),
    "create_model: an unknown model": Case(
        lambda _: create_model("resnet9", 10), ValueError, "'resnet9'", "Did you mean 'resnet8'"
    ),
    "create_model: zero classes": Case(
        lambda _: create_model("resnet8", 0), ValueError, "got 0", "10 for CIFAR-10"
    ),
    "create_model: a float class count": Case(
        lambda _: create_model("resnet8", 10.0), TypeError, "got 10.0", "number of classes"
    ),
    "create_model: zero input channels": Case(
        lambda _: create_model("resnet8", 10, in_channels=0), ValueError, "got 0", "1 for grey images"
    ),
    "create_model: more conv blocks than a 32x32 image allows": Case(
        lambda _: create_model("small_cnn", 10, blocks=6), ValueError, "got 6", "more than 5"
    ),
    # ----------------------------------------------------------------------------------------- presets
    "preset: replace an unknown field": Case(
        lambda _: get_preset("quick").replace(epochs=3), TypeError, "'epochs'", "student_epochs"
    ),
    "preset: negative epochs": Case(
        lambda _: get_preset("quick").replace(student_epochs=-1), ValueError, "got -1", "Use e.g. 8"
    ),
    "preset: a batch size of 0": Case(
        lambda _: get_preset("quick").replace(batch_size=0), ValueError, "got 0", "64 or 128"
    ),
    "preset: an unknown device": Case(
        lambda _: get_preset("lab").replace(device="gpu"), ValueError, "'gpu'", "'cuda' is an NVIDIA GPU"
    ),
    "preset: a NaN learning rate": Case(
        lambda _: get_preset("quick").replace(lr=float("nan")), ValueError, "got nan", "learning rate"
    ),
    "preset: no seeds": Case(
        lambda _: get_preset("quick").replace(seeds=()), ValueError, "got ()", "(0, 1, 2)"
    ),
    "preset: a misspelled preset name": Case(
        lambda _: get_preset("quik"), ValueError, "'quik'", "Did you mean 'quick'"
    ),
    "preset: a fractional train subset in the constructor": Case(
        lambda _: Preset(**{**vars(get_preset("quick")), "train_subset": 99.5}),
        TypeError,
        "got 99.5",
        "None uses them all",
    ),
    # ------------------------------------------------------------------------------------- checkpoints
    "checkpoint: a text file": Case(
        lambda tmp: load_checkpoint(resnet8(), written(tmp, "notes.pt", b"epoch 1: loss 2.3\n")),
        NotACheckpointError,
        "a text file (it starts with 'epoch 1",
        "written by save_checkpoint",
    ),
    "checkpoint: random bytes": Case(
        lambda tmp: load_checkpoint(resnet8(), written(tmp, "noise.pt", random.Random(1).randbytes(999))),
        NotACheckpointError,
        "noise.pt is not a checkpoint",
        "delete it to retrain",
    ),
    "checkpoint: a zip of something else": Case(
        lambda tmp: load_checkpoint(resnet8(), other_zip(tmp)),
        NotACheckpointError,
        "a zip archive of other files (README.txt)",
        "written by save_checkpoint",
    ),
    "checkpoint: a plain pickle": Case(
        lambda tmp: load_checkpoint(resnet8(), written(tmp, "w.pkl", pickle.dumps({"w": [1.0]}))),
        NotACheckpointError,
        "a Python pickle",
        "written by save_checkpoint",
    ),
    "checkpoint: a bare state dict": Case(
        lambda tmp: load_checkpoint(resnet8(), bare_state_dict(tmp)),
        NotACheckpointError,
        "a bare state_dict of 56 tensors",
        "model.load_state_dict(torch.load(path, weights_only=True))",
    ),
    "checkpoint: cut short": Case(
        lambda tmp: load_checkpoint(resnet8(), truncated(tmp)),
        CorruptCheckpointError,
        "model.pt is corrupt: it is cut short",
        "Delete it to retrain",
    ),
    "checkpoint: one byte changed": Case(
        lambda tmp: load_checkpoint(resnet8(), flipped(tmp)),
        CorruptCheckpointError,
        "fails its CRC-32 check",
        "Delete it to retrain",
    ),
    "checkpoint: an empty file": Case(
        lambda tmp: load_checkpoint(resnet8(), written(tmp, "empty.pt", b"")),
        CorruptCheckpointError,
        "empty (0 bytes)",
        "Delete it to retrain",
    ),
    "checkpoint: the cache finds a corrupt file": Case(
        lambda tmp: load_or_train(resnet8(), truncated(tmp), lambda model: None),
        CorruptCheckpointError,
        "is corrupt",
        "retrain_if_corrupt=True",
    ),
    "checkpoint: another architecture": Case(
        lambda tmp: load_checkpoint(resnet8(), save_checkpoint(create_model("resnet20", 100), tmp / "t.pt")),
        CheckpointError,
        "checkpoint is resnet20 with 100 classes",
        "create_model('resnet20', 100)",
    ),
    "checkpoint: a NumPy number in the metadata": Case(
        lambda tmp: save_checkpoint(resnet8(), tmp / "m.pt", accuracy=np.float64(93.5)),
        TypeError,
        "numpy.float64",
        "x.item()",
    ),
    "lesson: a preset renamed without its settings": Case(
        lambda _: HintonLesson.settings_for(get_preset("quick").replace(name="my-quick")),
        ValueError,
        "'my-quick'",
        "settings=SETTINGS['quick']",
    ),
    "training: an unknown precision": Case(
        lambda _: fit(
            nn.Linear(2, 2),
            [(torch.zeros(2, 1, 1, 2), torch.zeros(2, dtype=torch.long))],
            epochs=1,
            precision="fp8",
            progress=False,
        ),
        ValueError,
        "'fp8'",
        "preset_precision(PRESET, DEVICE)",
    ),
    # ----------------------------------------------------------------------------------------- metrics
    "accuracy: a label out of range": Case(
        lambda _: accuracy(torch.zeros(3, 10), torch.tensor([1, 12, 3])),
        ValueError,
        "got 12",
        "num_classes=10",
    ),
    "accuracy: float labels": Case(
        lambda _: accuracy(logits, torch.tensor([0.0, 1.0])), TypeError, "torch.float32", "labels.long()"
    ),
    "accuracy: fewer labels than predictions": Case(
        lambda _: accuracy(logits, torch.tensor([0])), ValueError, "got shape (1,)", "same samples"
    ),
    "accuracy: top_k above the class count": Case(
        lambda _: accuracy(logits, torch.tensor([0, 1]), top_k=4), ValueError, "got 4", "3 classes"
    ),
    "accuracy: NaN logits": Case(
        lambda _: accuracy(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([1, 0])),
        ValueError,
        "NaN in 1 of 2 rows (the first is row 1)",
        "learning rate",
    ),
    "accuracy: no samples": Case(
        lambda _: accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),
        ValueError,
        "got 0",
        "non-empty",
    ),
    "accuracy: a list instead of a tensor": Case(
        lambda _: accuracy([[0.1, 0.9]], torch.tensor([1])), TypeError, "got a list", "torch.as_tensor"
    ),
    "confusion_matrix: logits of another class count": Case(
        lambda _: confusion_matrix(logits, torch.tensor([0, 1]), num_classes=4),
        ValueError,
        "shape (2, 3)",
        "num_classes of the model",
    ),
    "per_class_accuracy: zero classes": Case(
        lambda _: per_class_accuracy(logits, torch.tensor([0, 1]), 0), ValueError, "got 0", "10 for CIFAR-10"
    ),
    "count_flops: an input shape without channels": Case(
        lambda _: count_flops(resnet8(), (32, 32)), ValueError, "got (32, 32)", "(3, 32, 32)"
    ),
    # ----------------------------------------------------------------------------------------- widgets
    "slider: a default outside the range": Case(
        lambda _: make_control("T", (1, 20, 1, 25)), ValueError, "got 25", "widen the range"
    ),
    "slider: a step larger than the range": Case(
        lambda _: make_control("T", (1, 5, 10)), ValueError, "got 10", "For example (1, 5, 1)"
    ),
    "slider: a NaN bound": Case(
        lambda _: make_control("alpha", (float("nan"), 1.0)),
        ValueError,
        "got nan",
        "For example T=(1, 20, 1, 4)",
    ),
    "dropdown: no options": Case(
        lambda _: make_control("layer", []), ValueError, "got []", "at least one option"
    ),
    "dropdown: a default not among the options": Case(
        lambda _: make_control("layer", (["stage1", "stage2"], "stage3")),
        ValueError,
        "got 'stage3'",
        "Pick one of them",
    ),
    "interactive_figure: a control the plot function does not take": Case(
        lambda _: interactive_figure(plot, scal=(0.0, 2.0)), TypeError, "got 'scal'", "Did you mean 'scale'"
    ),
    "layer_dropdown: a layer that is not a choice": Case(
        lambda _: layer_dropdown(resnet8(), (3, 32, 32), value="stage4"),
        ValueError,
        "got 'stage4'",
        "feature_points_only=False",
    ),
    # ------------------------------------------------------------------------------------------- plots
    "image_grid: too few class names for the labels": Case(
        lambda _: image_grid(uint8_images, [0, 5], ["cat", "dog"]), ValueError, "got 5", "dataset.classes"
    ),
    "image_grid: class names that do not match the logits": Case(
        lambda _: image_grid(uint8_images, [0, 1], ["cat", "dog"], predictions=torch.randn(2, 10)),
        ValueError,
        "got 2 names",
        "dataset.classes",
    ),
    "image_grid: more labels than images": Case(
        lambda _: image_grid(uint8_images, [0, 1, 2]), ValueError, "got 3 labels", "labels[:n]"
    ),
    "image_grid: NaN pixels": Case(
        lambda _: image_grid(torch.full((2, 3, 8, 8), float("nan"))),
        ValueError,
        "a non-finite value in image 0",
        "torch.nan_to_num",
    ),
    "heatmap_grid: class names of the wrong length": Case(
        lambda _: heatmap_grid([np.eye(4)], row_labels=["a", "b", "c"]),
        ValueError,
        "got 3 names",
        "Pass 4 names",
    ),
    "heatmap_grid: a title per matrix missing": Case(
        lambda _: heatmap_grid([np.eye(3)] * 2, titles=["teacher"]),
        ValueError,
        "got 1 title.",
        "one title for each",
    ),
    "heatmap_grid: an infinite cell": Case(
        lambda _: heatmap_grid([np.array([[0.0, np.inf], [1.0, 2.0]])]),
        ValueError,
        "inf at [0, 1]",
        "nan_to_num",
    ),
    "summarize_runs/results_bar: a diverged run": Case(
        lambda _: results_bar(runs_with_a_diverged_one(), value="accuracy", by="method"),
        ValueError,
        "nan in 1 run(s) of KD",
        "runs.dropna(subset=['accuracy'])",
    ),
    "plot_history: a metric the history does not have": Case(
        lambda _: plot_history(history(), metrics=("kd",)),
        ValueError,
        "metric 'kd'",
        "Metrics it can plot: loss",
    ),
    # ---------------------------------------------------------------------------------------- features
    "FeatureExtractor: an unknown layer": Case(
        lambda _: FeatureExtractor(resnet8(), ["stage4"]),
        ValueError,
        "'stage4'",
        "Feature points: stem, stage1",
    ),
    "FeatureExtractor: a module instead of its name": Case(
        lambda _: FeatureExtractor(resnet8(), [nn.ReLU()]), TypeError, "got a ReLU", "model.feature_points"
    ),
    "FeatureExtractor: the same layer twice": Case(
        lambda _: FeatureExtractor(resnet8(), ["stem", "stem"]),
        ValueError,
        "repeated: stem",
        "Remove the repeats",
    ),
    "FeatureExtractor: a list of images": Case(
        lambda _: FeatureExtractor(resnet8(), ["stem"])([torch.zeros(3, 32, 32)]),
        TypeError,
        "a list",
        "torch.stack",
    ),
    "FeatureExtractor: a layer that never runs": Case(
        lambda _: FeatureExtractor(UnusedHead(), ["head"])(torch.zeros(1, 4)),
        RuntimeError,
        "a module that did not run",
        "Pick a module on the forward path",
    ),
    "FeatureExtractor: reading a model left in training mode (warns)": Case(
        lambda _: as_error(features_in_training_mode),
        TrainingModeFeaturesWarning,
        "in training mode: its BatchNorm2d layers",
        "Call model.eval() first",
    ),
    # -------------------------------------------------------------------------------------------- data
    "evaluation: a loader built with train=True (warns)": Case(
        lambda _: as_error(lambda: warn_if_training_loader(TensorLoader(DIGITS, 16, train=True), "evaluate")),
        TrainingLoaderWarning,
        "evaluate got a loader that augments and shuffles",
        "train=False",
    ),
    "CIFAR: a batch file that is an HTML error page": Case(
        lambda tmp: load_dataset("cifar10", "train", cifar_folder(tmp, b"<!DOCTYPE html><html>404</html>")),
        DamagedDataError,
        "data_batch_1 is damaged: it is an HTML page",
        "download=True",
    ),
    "CIFAR: a batch file cut in half": Case(
        lambda tmp: load_dataset("cifar10", "train", cifar_folder(tmp, half_a_pickle())),
        DamagedDataError,
        "data_batch_1 is damaged: it is cut short",
        "Delete the folder",
    ),
    "CIFAR: only the downloaded archive, not extracted": Case(
        lambda tmp: load_dataset("cifar10", "train", only_the_archive(tmp)),
        DatasetNotFoundError,
        "cifar-10-python.tar.gz is there, not extracted",
        "tar -xzf",
    ),
    "CIFAR: root is the cifar-10-batches-py folder itself": Case(
        lambda tmp: load_dataset("cifar10", "train", cifar_folder(tmp, b"") / "cifar-10-batches-py"),
        DatasetNotFoundError,
        "cifar-10-batches-py is torchvision's cifar-10-batches-py/ folder itself",
        "Pass its parent",
    ),
    "ImageNet 64x64: an npz file cut in half": Case(
        lambda tmp: load_dataset("imagenet64", "test", half_an_npz(tmp)),
        DamagedDataError,
        "val_data.npz is damaged",
        "download it again",
    ),
    "preset_data: a preset's name instead of the preset": Case(
        lambda _: preset_data("lab"), TypeError, "got 'lab'", "preset_data(get_preset('lab'))"
    ),
    "image folder: an image file that does not decode": Case(
        lambda tmp: load_dataset("cifar10", "test", broken_jpeg_tree(tmp)),
        DamagedDataError,
        "0.jpg is damaged: it does not decode",
        "Delete it",
    ),
    "KDBOOK_CACHE: naming a file": Case(
        lambda tmp: a_cache_in(tmp),
        NotADirectoryError,
        "results.txt' (a file)",
        "Point $KDBOOK_CACHE at a folder",
    ),
    # ------------------------------------------------------------------------- experiments: teachers
    "cached_teacher: one split instead of (train, val)": Case(
        lambda _: cached_teacher("resnet8", DIGITS, epochs=1),
        TypeError,
        "got one ImageDataset ('digits' train split, 40 images)",
        "splits = preset_data(PRESET)",
    ),
    "cached_teacher: a preset's name instead of its data": Case(
        lambda _: cached_teacher("resnet8", "quick", epochs=1),
        TypeError,
        "got 'quick'",
        "A preset's name is not its data",
    ),
    "cached_teacher: a model instead of its name": Case(
        lambda _: cached_teacher(resnet8(), SPLITS, epochs=1),
        TypeError,
        "got a model (resnet8)",
        "list_models() lists the names",
    ),
    "cached_teacher: a misspelled model name": Case(
        lambda _: cached_teacher("resnet9", SPLITS, epochs=1),
        ValueError,
        "got 'resnet9'",
        "Did you mean 'resnet8'",
    ),
    "cached_teacher: zero epochs": Case(
        lambda _: cached_teacher("resnet8", SPLITS, epochs=0), ValueError, "got 0", "teacher_epochs"
    ),
    "cached_teacher: train and val of different image sizes": Case(
        lambda _: cached_teacher("resnet8", (DIGITS, DIGITS.resized(16)), epochs=1),
        ValueError,
        "8x8 uint8",
        "the same classes and image size",
    ),
    # ------------------------------------------------------------------------- experiments: students
    "train_student: a model instead of a function that builds one": Case(
        lambda _: train_student(resnet8(), None, SPLITS, seed=0, epochs=1),
        TypeError,
        "got a model (resnet8): every seed would go on training the same one",
        "lambda: create_model",
    ),
    "train_student: a method already built instead of a factory": Case(
        lambda _: train_student(resnet8, HintonKD(resnet8(), resnet8()), SPLITS, seed=0, epochs=1),
        TypeError,
        "got a HintonKD (a method already built",
        "lambda student: HintonKD(student, teacher)",
    ),
    "train_student: a (train, val) pair without a test split": Case(
        lambda _: train_student(resnet8, None, (DIGITS, DIGITS), seed=0, epochs=1),
        TypeError,
        "got a tuple of 2",
        "DataSplits(train, val, test)",
    ),
    "train_student: one split name as a string": Case(
        lambda _: train_student(resnet8, None, SPLITS, seed=0, epochs=1, splits="test"),
        TypeError,
        "got 'test'",
        "('val', 'test')",
    ),
    "train_student: a negative seed": Case(
        lambda _: train_student(resnet8, None, SPLITS, seed=-1, epochs=1), ValueError, "got -1", "run_seeds"
    ),
    "train_student: a dict as the teacher cache": Case(
        lambda _: train_student(resnet8, None, SPLITS, seed=0, epochs=1, cache={}),
        TypeError,
        "got a dict",
        "cache=TeacherOutputCache()",
    ),
    "run_seeds: a number of seeds instead of the seeds": Case(
        lambda _: run_seeds({"alone": lambda seed: None}, seeds=3), TypeError, "got 3", "seeds=range(3)"
    ),
    "run_seeds: a seed twice": Case(
        lambda _: run_seeds({"alone": lambda seed: None}, seeds=(0, 0, 1)),
        ValueError,
        "got (0, 0, 1)",
        "Remove the repeats of [0]",
    ),
    "run_seeds: a run instead of a function of the seed": Case(
        lambda _: run_seeds({"alone": 0.5}, seeds=(0,)), TypeError, "got a float", "lambda seed:"
    ),
    "run_seeds: a function that returns no StudentRun": Case(
        lambda _: run_seeds({"alone": lambda seed: {"accuracy": 90}}, seeds=(0,), progress=False),
        TypeError,
        "returned a dict",
        "lambda seed: train_student(..., seed=seed)",
    ),
    "TeacherOutputCache: no memory": Case(
        lambda _: TeacherOutputCache(max_megabytes=0), ValueError, "got 0", "e.g. 2048"
    ),
    "TeacherOutputCache: a DataLoader instead of a TensorLoader": Case(
        lambda _: TeacherOutputCache().for_loader(
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8)))
        ),
        TypeError,
        "got a DataLoader",
        "TensorLoader(splits.train, 128, train=True",
    ),
    # ---------------------------------------------------------------------- experiments: comparisons
    "best_on_validation: an empty sweep": Case(
        lambda _: best_on_validation(pd.DataFrame(), "method", "weight"),
        ValueError,
        "got an empty table",
        "Run the experiment first",
    ),
    "best_on_validation: a column the runs lack": Case(
        lambda _: best_on_validation(runs_table({"KD": [0]}), ["T", "alpha"], "temperature"),
        ValueError,
        "a table without ['T', 'alpha']",
        "name the columns to use",
    ),
    "compare: a NaN accuracy not flagged as failed": Case(
        lambda _: compare(with_nan(runs_table({"alone": [0, 1, 2], "KD": [0, 1, 2]}), "KD", 1), "alone"),
        ValueError,
        "nan in 1 run(s) of 'KD' (seed(s) [1]), not flagged as failed",
        "runs.dropna(subset=['accuracy'])",
    ),
    "compare: two methods that share no seed": Case(
        lambda _: compare(runs_table({"alone": [0, 1, 2], "KD": [3, 4, 5]}), "alone"),
        ValueError,
        "no seed in common: 'KD' ran seeds [3, 4, 5], 'alone' ran [0, 1, 2]",
        "Run both with the same seeds",
    ),
    "compare: a table holding two stages": Case(
        lambda _: compare(two_stages(), "student alone"),
        ValueError,
        "seed 0 of 'student alone' 2 times",
        "runs[runs['stage'] == 'final']",
    ),
    "compare: a confidence in percent": Case(
        lambda _: compare(runs_table({"alone": [0, 1], "KD": [0, 1]}), "alone", confidence=95),
        ValueError,
        "got 95",
        "0.95 for a 95 % interval",
    ),
    "compare: accuracies as text": Case(
        lambda _: compare(runs_table({"alone": [0], "KD": [0]}).astype({"accuracy": str}), "alone"),
        TypeError,
        "values such as '80.0'",
        "pd.to_numeric",
    ),
    "compare: one method name as a string": Case(
        lambda _: compare(runs_table({"alone": [0, 1], "KD": [0, 1]}), "alone", methods="KD"),
        TypeError,
        "got 'KD'",
        "Use ['KD']",
    ),
    "paired_interval: a NaN difference": Case(
        lambda _: paired_interval([1.0, float("nan"), 2.0]), ValueError, "got nan", "leave failed runs out"
    ),
    # -------------------------------------------------------------------------- results files
    "write_results: a table without the accuracy column": Case(
        lambda tmp: write_results(runs_table({"KD": [0]}).drop(columns="accuracy"), tmp / "r", {}),
        ValueError,
        "a table without ['accuracy']",
        "the table run_seeds returned",
    ),
    "write_results: into a file instead of a folder": Case(
        lambda tmp: write_results(runs_table({"KD": [0]}), a_file(tmp) / "hinton", {}),
        NotADirectoryError,
        "results.txt' (a file)",
        "Choose a folder you can write",
    ),
    "read_results: a table cut off mid-row": Case(
        lambda tmp: read_results(edited(tmp, lambda text: text[: len(text) - 20])),
        ResultsFileError,
        "where its header has 9 (its last line: the file was cut short",
        "Regenerate it: python -m kdbook_utils run hinton",
    ),
    "read_results: re-saved by a spreadsheet with ';'": Case(
        lambda tmp: read_results(edited(tmp, spreadsheet)),
        ResultsFileError,
        "is separated by ';', not by commas",
        "save it from the spreadsheet as comma-separated CSV",
    ),
    "read_results: an accuracy typed as 81.0%": Case(
        lambda tmp: read_results(edited(tmp, percent)),
        ResultsFileError,
        "has accuracy '80.0%' on line 2",
        "Regenerate it",
    ),
    "read_results: a column removed by hand": Case(
        lambda tmp: read_results(
            edited(
                tmp,
                lambda text: (
                    "\n".join(
                        ",".join(line.split(",")[:7] + line.split(",")[8:]) for line in text.splitlines()
                    )
                    + "\n"
                ),
            )
        ),
        ResultsFileError,
        "lacks the columns ['seconds']",
        "Regenerate it",
    ),
    "read_results: a column added by hand": Case(
        lambda tmp: read_results(
            edited(
                tmp,
                lambda text: (
                    "\n".join(
                        line + ("," + ("note" if i == 0 else "ok"))
                        for i, line in enumerate(text.splitlines())
                    )
                    + "\n"
                ),
            )
        ),
        ResultsFileError,
        "(extra: ['note'])",
        "Regenerate it",
    ),
    "read_results: a value changed by hand": Case(
        lambda tmp: read_results(edited(tmp, lambda text: text.replace("80.0", "99.0", 1))),
        ResultsFileError,
        "does not match its provenance",
        "Regenerate it",
    ),
    "read_results: provenance cut short": Case(
        lambda tmp: read_results(edited(tmp, lambda text: text, meta=lambda text: text[:40])),
        ResultsFileError,
        "hinton.json is not valid JSON",
        "Regenerate the results",
    ),
    # ------------------------------------------------------------------------------------- records
    "record: a misspelled lesson": Case(
        lambda tmp: record("hintn", "smoke", folder=tmp), ValueError, "got 'hintn'", "Did you mean 'hinton'"
    ),
    "record: a preset renamed with replace(name=...)": Case(
        lambda tmp: record("hinton", get_preset("smoke").replace(name="mine"), folder=tmp),
        ValueError,
        "'mine' (a preset renamed with replace(name=...)",
        "pass settings=",
    ),
    "record: another lesson's settings": Case(
        lambda tmp: record("hinton", "smoke", folder=tmp, settings=LSL_SETTINGS["smoke"]),
        TypeError,
        "got a LSLLesson",
        "dataclasses.replace",
    ),
    "record: a results folder that is a file": Case(
        lambda tmp: record("hinton", "smoke", folder=a_file(tmp)),
        NotADirectoryError,
        "results.txt, which is a file",
        "Choose a folder you can write",
    ),
    "check_recorded: a preset the lesson has no settings for": Case(
        lambda _: check_recorded("hinton", "lap"), ValueError, "got 'lap'", "Did you mean 'lab'"
    ),
    "recorded_comparison: a misspelled stage": Case(
        lambda _: recorded_comparison("hinton", stage="fnal"),
        ValueError,
        "no stage 'fnal'",
        "Did you mean 'final'",
    ),
    # -------------------------------------------------------------------------------- command line
    "command line: --out naming a file (refused before training)": Case(
        lambda tmp: command_line("run", "hinton", "--out", str(a_file(tmp))),
        CommandLineError,
        "results.txt/quick' (inside",
        "Choose a folder you can write",
    ),
    "command line: --set a student the lesson lacks": Case(
        lambda _: command_line("run", "hinton", "--set", "student=cnn-4x32"),
        CommandLineError,
        "has no student 'cnn-4x32'",
        "Did you mean 'cnn-3x32'",
    ),
    "command line: --set a teacher that is not a model": Case(
        lambda _: command_line("run", "mskd", "--set", "teacher=ResNet20"),
        CommandLineError,
        "has no teacher 'ResNet20'",
        "Did you mean 'resnet20'",
    ),
    "command line: --set several values with spaces": Case(
        lambda _: command_line("run", "hinton", "--set", "temperatures=4", "8"),
        CommandLineError,
        "--set temperatures=4 8:",
        "--set temperatures=4,8",
    ),
    "command line: --set several values with spaces, quoted": Case(
        lambda _: command_line("run", "hinton", "--set", "temperatures=4 8"),
        CommandLineError,
        "temperatures takes one value",
        "--set temperatures=4,8",
    ),
    "command line: --set a learning rate of 0": Case(
        lambda _: command_line("run", "hinton", "--set", "lr=0"),
        CommandLineError,
        "got 0.0",
        "own value is 0.05",
    ),
    "command line: --set a Hinton weight above 1": Case(
        lambda _: command_line("run", "hinton", "--set", "alphas=0.5,1.5"),
        CommandLineError,
        "got (0.5, 1.5)",
        "--set alphas=0.1,0.5",
    ),
    "command line: --set a field twice": Case(
        lambda _: command_line("run", "hinton", "--set", "epochs=5", "--set", "epochs=6"),
        CommandLineError,
        "--set epochs=5 and --set epochs=6",
        "keep one",
    ),
    "command line: an unknown preset in KDBOOK_PRESET": Case(
        lambda _: command_line("run", "hinton", KDBOOK_PRESET="smok"),
        CommandLineError,
        "'smok' (from $KDBOOK_PRESET)",
        "Did you mean 'smoke'",
    ),
    "command line: record with another preset in KDBOOK_PRESET": Case(
        lambda _: command_line("record", "hinton", KDBOOK_PRESET="quick"),
        CommandLineError,
        "$KDBOOK_PRESET is 'quick'",
        "--preset quick or --preset lab",
    ),
    "command line: --data at the cifar-10-batches-py folder itself": Case(
        lambda tmp: command_line(
            "run", "hinton", "--preset", "lab", "--data", str(cifar_folder(tmp, b"") / "cifar-10-batches-py")
        ),
        CommandLineError,
        "cifar-10-batches-py is torchvision's cifar-10-batches-py folder itself",
        "Point at its parent: --data",
    ),
    "command line: show a results file with 81.0%": Case(
        lambda tmp: command_line("show", str(edited(tmp, percent).with_suffix(".csv"))),
        CommandLineError,
        "accuracy '80.0%' on line 2",
        "Regenerate it",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_error(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    with pytest.raises(Exception) as caught:  # the exact type is checked below
        case.call(tmp_path)
    message = str(caught.value)
    assert type(caught.value) is case.error, f"{type(caught.value).__name__}: {message}"
    assert case.value in message, f"the message does not show the wrong value {case.value!r}: {message}"
    assert case.fix in message, f"the message does not give the fix {case.fix!r}: {message}"


def test_enough_cases() -> None:
    assert len(CASES) >= 100
    plt.close("all")
