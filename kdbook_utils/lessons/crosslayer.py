"""Lesson 3 (cross-layer KD): its settings per preset, the ablation grid after the paper's tables, figures,
and the abstract's numbers (the only numbers the paper makes public)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Arc
from torch import Tensor, nn

from kdbook_utils.features import FeatureExtractor, eval_mode
from kdbook_utils.methods.crosslayer import Pair, cross_layer_pairs, fsp_matrices
from kdbook_utils.plots import DPI, heatmap_grid

# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossLayerLesson:
    """What lesson 3 runs in one preset."""

    image_size: int  # the digits are 8x8 scans: quick trains at their native size
    teacher: str
    student: str
    width: float  # channel multiplier of the paper's ResNet-32 / ResNet-8 (64/128/256 channels)
    teachers: int  # the ensemble's size (P3)
    teacher_epochs: int
    student_images: int | None
    gram_epochs: int  # phase A
    task_epochs: int  # phase B
    lr: float
    gram_lr: float
    batch_size: int
    augment: bool  # False: teachers' outputs are cached per image
    seeds: tuple[int, ...]
    chain: dict = field(default_factory=dict)  # the ResNet-50 -> 18 -> 10 experiment (base width, epochs)


SETTINGS: dict[str, CrossLayerLesson] = {
    "quick": CrossLayerLesson(
        image_size=8, teacher="resnet32w", student="resnet8w", width=0.25, teachers=3, teacher_epochs=8,
        student_images=None, gram_epochs=3, task_epochs=6, lr=0.05, gram_lr=0.01, batch_size=64, augment=False,
        seeds=(0, 1, 2), chain={"base_width": 8, "teacher_epochs": 6, "adapter_epochs": 3},
    ),
    "lab": CrossLayerLesson(
        image_size=32, teacher="resnet32w", student="resnet8w", width=0.5, teachers=3, teacher_epochs=15,
        student_images=None, gram_epochs=5, task_epochs=15, lr=0.05, gram_lr=0.01, batch_size=128, augment=True,
        seeds=(0, 1, 2), chain={"base_width": 16, "teacher_epochs": 15, "adapter_epochs": 3},
    ),
    "paper": CrossLayerLesson(
        image_size=32, teacher="resnet32w", student="resnet8w", width=1.0, teachers=3, teacher_epochs=240,
        student_images=None, gram_epochs=40, task_epochs=100, lr=0.1, gram_lr=0.01, batch_size=128, augment=True,
        seeds=(0, 1, 2), chain={"base_width": 64, "teacher_epochs": 240, "adapter_epochs": 10},
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation: which parts of the method are on (``num_teachers=0``: the student alone)."""

    k: int = 3
    mode: str = "cumulative"
    use_kl: bool = True
    num_teachers: int = 3
    ensemble: str = "mean"
    kl_mode: str = "forward"

    @property
    def label(self) -> str:
        if self.num_teachers == 0:
            return "student alone"
        parts = [f"cross-{self.k}" + ("" if self.mode == "cumulative" else " (exact)")]
        if self.use_kl:
            parts.append("KL" if self.kl_mode == "forward" else "symmetric KL")
        parts.append(f"{self.num_teachers} teacher" + ("s" if self.num_teachers > 1 else ""))
        if self.num_teachers > 1 and self.ensemble != "mean":
            parts.append(self.ensemble.replace("_", " "))
        return " + ".join(parts)

    def replace(self, **changes: object) -> Ablation:
        return replace(self, **changes)


STUDENT_ALONE = Ablation(num_teachers=0)
P1 = Ablation(k=3, use_kl=False, num_teachers=1)
P1_P2 = Ablation(k=3, use_kl=True, num_teachers=1)
P1_P2_P3 = Ablation(k=3, use_kl=True, num_teachers=3)


def ablation_grid(max_k: int = 3, max_teachers: int = 3) -> dict[str, list[Ablation]]:
    """The settings behind each group of the paper's tables (identical settings are shared):

    * "cross-k" (Tables 4-6): P1 with k = 1..max_k, one teacher;
    * "KL" (Tables 7-9): cross-max_k with and without the KL term, one teacher;
    * "teachers" (Tables 10-12): cross-max_k + KL with 1..max_teachers teachers;
    * "combinations" (Tables 13-15): P1, P1+P2, P1+P2+P3, and the student alone.
    """
    return {
        "cross-k": [STUDENT_ALONE] + [P1.replace(k=k) for k in range(1, max_k + 1)],
        "KL": [STUDENT_ALONE, P1.replace(k=max_k), P1_P2.replace(k=max_k)],
        "teachers": [STUDENT_ALONE] + [P1_P2.replace(k=max_k, num_teachers=n) for n in range(1, max_teachers + 1)],
        "combinations": [STUDENT_ALONE, P1.replace(k=max_k), P1_P2.replace(k=max_k),
                         P1_P2_P3.replace(k=max_k, num_teachers=max_teachers)],
    }  # fmt: skip


def unique_settings(groups: Mapping[str, Sequence[Ablation]]) -> list[Ablation]:
    """Every distinct setting of an ablation grid once, in first-seen order (each is trained once)."""
    return list(dict.fromkeys(itertools.chain.from_iterable(groups.values())))


TABLE_TITLES = {
    "cross-k": "Tables 4-6: cross-k (P1 only, one teacher)",
    "KL": "Tables 7-9: adding the KL term (cross-3, one teacher)",
    "teachers": "Tables 10-12: number of teachers (cross-3 + KL)",
    "combinations": "Tables 13-15: combinations (P1: cross-3, P2: KL, P3: three teachers)",
}

PAPER_ABSTRACT = pd.DataFrame(
    {
        "pair": ["VGG-11 -> VGG-6", "ResNet-32 -> ResNet-8", "MobileNet-16 -> MobileNet-9"],
        "data set": ["CIFAR-100", "CIFAR-100", "ImageNet 64x64"],
        "student's top-1 gain (points)": [3.57, 4.38, 3.98],
        "compression (parameters)": [2.08, 6.11, 1.59],
        "computation rate": [3.5, 5.27, 2.05],
    }
).set_index("pair")
"""The paper's abstract: its only public numbers (Tables 1-20 are published as images we could not read)."""

PAPER_PAIRS = {
    "VGG-11 -> VGG-6": ("vgg11", "vgg6", 100, 32),
    "ResNet-32 -> ResNet-8": ("resnet32w", "resnet8w", 100, 32),
    "MobileNet-16 -> MobileNet-9": ("mobilenet16", "mobilenet9", 1000, 64),
}
"""The abstract's three pairs as zoo models: (teacher, student, classes, image size)."""


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def plot_pairs(points: Sequence[str], k: int, mode: str = "cumulative") -> Figure:
    """The checkpoints on a line and one arc per pair of "cross ``k`` layers" (the paper's Fig. 2)."""
    points = list(points)
    pairs = cross_layer_pairs(points, k, mode)
    fig, ax = plt.subplots(figsize=(1.6 * len(points) + 1, 2.4), layout="constrained", dpi=DPI)
    colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.8, len(points) - 1).tolist())
    for first, second in pairs:
        i, j = points.index(first), points.index(second)
        ax.add_patch(Arc(((i + j) / 2, 0), j - i, 0.9 * (j - i), theta1=0, theta2=180, lw=2, color=colours[j - i - 1]))
    ax.scatter(range(len(points)), [0] * len(points), s=120, color="black", zorder=3)
    for index, name in enumerate(points):
        ax.annotate(name, (index, 0), xytext=(0, -16), textcoords="offset points", ha="center", va="top")
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set_ylim(-0.45, 0.5 * (len(points) - 1) + 0.1)
    ax.set_axis_off()
    plural = "s" if len(pairs) > 1 else ""
    ax.set_title(f"cross {k} layer{'s' if k > 1 else ''}, {mode}: {len(pairs)} pair{plural}")
    return fig


def pair_title(pair: Pair) -> str:
    return f"{pair[0]} × {pair[1]}"


@torch.no_grad()
def mean_grams(
    model: nn.Module, images: Tensor, points: Sequence[str], pairs: Sequence[Pair], pool: str = "max"
) -> dict[Pair, Tensor]:
    """A model's Gram matrices on a batch, averaged over the batch (eval mode): ``{pair: (C_a, C_b)}``."""
    with eval_mode(model), FeatureExtractor(model, list(points)) as extractor:
        features = extractor(images)
    return {pair: gram.mean(0).cpu() for pair, gram in fsp_matrices(features, pairs, pool).items()}


def _teacher_scales(teacher_grams: Mapping[Pair, Tensor]) -> dict[Pair, float]:
    """Each pair's largest absolute teacher entry: pairs differ in scale by orders of magnitude."""
    return {pair: float(gram.abs().max()) or 1.0 for pair, gram in teacher_grams.items()}


def plot_gram_comparison(
    teacher_grams: Mapping[Pair, Tensor], student_grams: Mapping[Pair, Tensor], title: str = "", pairs: Sequence[Pair] | None = None
) -> Figure:
    """Teacher (top row), student (middle) and teacher - student (bottom) for each of ``pairs`` (default:
    the first three), one column per pair. Each pair is divided by its teacher matrix's largest absolute
    entry, so one fixed colour scale [-1, 1] serves every panel of every figure drawn with it."""
    chosen = list(pairs) if pairs is not None else list(teacher_grams)[:3]
    scale = _teacher_scales(teacher_grams)
    matrices = ([teacher_grams[p] / scale[p] for p in chosen] + [student_grams[p] / scale[p] for p in chosen]
                + [(teacher_grams[p] - student_grams[p]) / scale[p] for p in chosen])  # fmt: skip
    titles = ([f"teacher\n{pair_title(p)}" for p in chosen] + [f"student\n{pair_title(p)}" for p in chosen]
              + [f"difference\n{pair_title(p)}" for p in chosen])  # fmt: skip
    return heatmap_grid(matrices, titles=titles, ncols=len(chosen), cmap="RdBu_r", vmin=-1.0, vmax=1.0,
                        xlabel="channel of the later map", ylabel="channel of the earlier map",
                        colorbar_label="G / max |G_teacher| of the pair", suptitle=title or None,
                        panel_size=2.2)  # fmt: skip


def gram_gap(teacher_grams: Mapping[Pair, Tensor], snapshot_grams: Mapping[Pair, Tensor]) -> float:
    """The relative distance between teacher and student Gram matrices, summed over pairs:
    ``sqrt(sum_pairs ||(G_T - G_S) / max|G_T|||_F^2)``."""
    scale = _teacher_scales(teacher_grams)
    return sum(float(((teacher_grams[p] - snapshot_grams[p]) / scale[p]).pow(2).sum()) for p in teacher_grams) ** 0.5


def plot_gap_curve(teacher_grams: Mapping[Pair, Tensor], snapshots: Sequence[Mapping]) -> Figure:
    """The teacher-student Gram gap (:func:`gram_gap`) after every epoch, phase A then phase B."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4), layout="constrained", dpi=DPI)
    xs, gaps, phases = [], [], []
    for index, snapshot in enumerate(snapshots):
        xs.append(index)
        gaps.append(gram_gap(teacher_grams, snapshot["grams"]))
        phases.append(snapshot["phase"])
    ax.plot(xs, gaps, marker="o")
    switch = next((i for i, phase in enumerate(phases) if phase == "task"), None)
    if switch is not None and switch > 0:
        ax.axvline(switch, color="grey", linestyle="--")
        ax.annotate("phase A: Gram loss only", (switch / 2, max(gaps)), ha="center", va="top", fontsize="small")
        ax.annotate("phase B: CE + KL", ((switch + len(xs) - 1) / 2, max(gaps)), ha="center", va="top", fontsize="small")
    ax.set_ylim(0, max(gaps) * 1.15)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("Gram gap to the teachers\n(relative, summed over pairs)")
    ax.set_title("The student's Gram matrices approach the teachers' in phase A", fontsize="medium")
    return fig
