"""Lesson 2 (LSL): its settings per preset, the paper's tables (as the paper's) and the lesson's figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from kdbook_utils.features import layer_table
from kdbook_utils.methods.lsl import LayerGrams
from kdbook_utils.plots import DPI


@dataclass(frozen=True)
class LSLLesson:
    """What lesson 2 runs in one preset."""

    teacher: str
    student: str
    teacher_epochs: int
    student_images: int | None
    epochs: int
    batch_size: int
    lr: float
    projection_dim: int
    reduction: str
    alphas: tuple[float, ...]  # the alignment weight, chosen on the validation split
    seeds: tuple[int, ...]


SETTINGS: dict[str, LSLLesson] = {
    "quick": LSLLesson(teacher="alexnet_lsl_teacher_eighth", student="alexnet_lsl_student_eighth",
                       teacher_epochs=8, student_images=100, epochs=40, batch_size=16, lr=0.01,
                       projection_dim=256, reduction="mean", alphas=(0.1, 0.3, 1.0), seeds=(0, 1, 2)),
    "lab": LSLLesson(teacher="alexnet_lsl_teacher_quarter", student="alexnet_lsl_student_quarter",
                     teacher_epochs=15, student_images=1000, epochs=30, batch_size=32, lr=0.02,
                     projection_dim=2048, reduction="mean", alphas=(0.1, 0.3, 1.0), seeds=(0, 1, 2)),
    "paper": LSLLesson(teacher="alexnet_lsl_teacher", student="alexnet_lsl_student", teacher_epochs=100,
                       student_images=None, epochs=100, batch_size=32, lr=0.02, projection_dim=2048,
                       reduction="sum", alphas=(1.0,), seeds=(0, 1, 2)),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# The paper's numbers (Li et al. 2019), shown labelled as the paper's
# --------------------------------------------------------------------------------------------------------

PAPER_LAYERS = {
    "teacher": {"conv1": (11, 4, 96), "conv2": (5, 1, 256), "conv3": (3, 1, 384), "conv4": (3, 1, 384),
                "conv5": (3, 1, 256), "fc1": ("-", "-", 4096), "fc2": ("-", "-", 4096)},
    "student": {"conv1": (3, 1, 96), "conv2": (3, 2, 384), "conv3": (3, 1, 256), "fc1": ("-", "-", 512),
                "fc2": ("-", "-", 512)},
}  # fmt: skip
"""The paper's Tables 1 and 2: (kernel, stride, channels) of every layer of its AlexNet teacher and student."""

PAPER_TABLE3 = pd.DataFrame(
    {"teacher": [0.00588, 0.00322, 0.00316, 0.00307, 0.00015, 0.00023],
     "student": [0.00193, 0.00143, None, None, 0.00028, 0.00037]},
    index=pd.Index(["conv2", "conv3", "conv4", "conv5", "fc1", "fc2"], name="layer"),
)  # fmt: skip
"""The paper's Table 3: LSP scores on PPMI (its scale differs from our cosine scale; compare rankings)."""

PAPER_BINDINGS_TABLES = pd.DataFrame(
    [
        ("4", "conv2->conv3", "38.7 / 36.1", "48.0 / 41.4", "80.2 / 79.9"),
        ("4", "conv3->conv3", "39.3 / 35.9", "49.4 / 42.2", "80.0 / 79.7"),
        ("4", "conv4->conv3", "40.1 / 36.3", "49.1 / 46.1", "79.1 / 79.0"),
        ("4", "conv5->conv3", "40.8 / 36.7", "47.7 / 43.4", "80.5 / 81.1"),
        ("5", "conv4->conv3 + conv5->fc1", "38.5 / 36.2", "46.5 / 43.1", "79.5 / 80.5"),
        ("5", "conv5->conv3 + fc1->fc1", "40.0 / 37.0", "48.8 / 45.4", "80.6 / 81.9"),
        ("6", "conv5->conv3 + fc1->fc1 + fc2->fc2", "39.8 / 37.6", "47.1 / 46.0", "82.4 / 82.2"),
        ("8", "conv4->conv2 + conv5->conv3 + fc1->fc1", "not given / 41.0", "not given / 48.0", "not given / 87.2"),
    ],
    columns=["paper's table", "bindings", "PPMI: teacher / student (%)", "Willow", "UIUC-Sports"],
).set_index("bindings")
"""The paper's Tables 4-6 and 8 (its data sets, not ours): jointly trained teacher / student accuracy."""

PAPER_TABLE8 = pd.DataFrame(
    {"PPMI": [60.7, 24.1, 27.8, 37.9, 41.0], "Willow": [75.5, 41.0, 42.4, 44.2, 48.0],
     "UIUC-Sports": [94.2, 74.6, 77.2, 85.5, 87.2]},
    index=pd.Index(["teacher", "student alone", "Hinton KD", "FSP", "LSL"], name="method"),
)  # fmt: skip
"""The paper's Table 8: student accuracy (%) per method on its three data sets."""


# --------------------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------------------


def architecture_table(model: nn.Module, role: str, input_shape: Sequence[int]) -> pd.DataFrame:
    """The paper's layer table (kernel/stride, channels) beside ours and our output shapes."""
    shapes = layer_table(model, input_shape).set_index("layer")["output_shape"]
    rows = []
    for layer in model.paper_layers:
        module = model.get_submodule(layer)
        first = module[0] if layer.startswith("conv") else module[-2]
        ours = ((first.kernel_size[0], first.stride[0], first.out_channels) if layer.startswith("conv")
                else ("-", "-", first.out_features))  # fmt: skip
        paper = PAPER_LAYERS[role][layer]
        rows.append({"layer": layer, "paper: kernel/stride": f"{paper[0]}/{paper[1]}", "paper: channels": paper[2],
                     "ours: kernel/stride": f"{ours[0]}/{ours[1]}", "ours: channels": ours[2],
                     "ours: output shape": "x".join(map(str, shapes[layer]))})  # fmt: skip
    return pd.DataFrame(rows).set_index("layer")


def plot_binding_grams(
    teacher: LayerGrams, student: LayerGrams, class_names: Sequence[str] | None = None, panel_size: float = 3.2
) -> Figure:
    """The LSP matrices of one binding: inter-class Grams (top, class names on the axes) and inter-layer
    Grams (bottom) of the teacher layer (left) and the student layer (right), on one [0, 1] colour scale."""
    fig, axes = plt.subplots(2, 2, figsize=(2 * panel_size + 1.6, 2 * panel_size + 1.0), layout="constrained", dpi=DPI)
    image = None
    for column, (role, grams) in enumerate((("teacher", teacher), ("student", student))):
        top, bottom = axes[0, column], axes[1, column]
        image = top.imshow(grams.inter_class.cpu().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        top.set_title(f"{role} {grams.layer}: inter-class H\nH_class = {grams.h_class:.3f}", fontsize="medium")
        if class_names is not None:
            ticks = range(len(class_names))
            top.set_xticks(ticks, [str(name) for name in class_names], rotation=90)
            top.set_yticks(ticks, [str(name) for name in class_names])
        top.set_xlabel("class")
        top.set_ylabel("class")
        bottom.imshow(grams.inter_layer.cpu().numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")  # fmt: skip
        bottom.set_title(f"{role}: {grams.previous} × {grams.layer} inter-layer G\nG_diversity = "
                         f"{grams.g_diversity:.3f}", fontsize="medium")  # fmt: skip
        bottom.set_ylabel(f"channel of {grams.previous}")
        bottom.set_xlabel(f"channel of {grams.layer}")
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle(f"LSP = {teacher.lsp:.3f} (teacher {teacher.layer}), {student.lsp:.3f} (student {student.layer})")
    return fig
