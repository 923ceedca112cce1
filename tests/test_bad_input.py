"""Bad input gets a clear error: one row per plausible wrong call a student or instructor might make.

Each case states the exact error type, the wrong value as the message must show it, and a phrase of the
fix the message must give. The table is grouped by module; add a row for every new check.
"""

from __future__ import annotations

import pickle
import random
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

from kdbook_utils.checkpoints import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    load_checkpoint,
    load_or_train,
    save_checkpoint,
)
from kdbook_utils.features import FeatureExtractor
from kdbook_utils.lessons.hinton import HintonLesson
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
        lambda _: HintonLesson.settings_for(get_preset("quick").replace(name="my-quick")), ValueError,
        "'my-quick'", "settings=SETTINGS['quick']",
    ),
    "training: an unknown precision": Case(
        lambda _: fit(nn.Linear(2, 2), [(torch.zeros(2, 1, 1, 2), torch.zeros(2, dtype=torch.long))], epochs=1,
                      precision="fp8", progress=False),
        ValueError, "'fp8'", "preset_precision(PRESET, DEVICE)",
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
    assert len(CASES) >= 30
    plt.close("all")
