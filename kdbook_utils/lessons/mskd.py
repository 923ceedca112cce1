"""Lesson 4 (MSKD): its settings per preset, the paper's tables (as the paper's) and the lesson's figures."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from kdbook_utils.data import DataSplits
from kdbook_utils.experiments import (
    StudentRun,
    TrainedModel,
    cached_teacher,
    cached_teacher_exits,
    train_student,
)
from kdbook_utils.lessons import LessonRunner, Stage
from kdbook_utils.methods.mskd import MSKD, MultiExitCrossEntropy, OtO
from kdbook_utils.models import create_model
from kdbook_utils.models.multi_exit import FINAL_EXIT, MultiExit
from kdbook_utils.plots import DPI
from kdbook_utils.presets import Preset
from kdbook_utils.train import DeviceLike


@dataclass(frozen=True)
class MSKDLesson:
    """What lesson 4 runs in one preset."""

    image_size: int
    teacher: str
    student: str
    teacher_options: dict = field(default_factory=dict)
    student_options: dict = field(default_factory=dict)
    student_images: int | None = None
    teacher_epochs: int = 8
    head_epochs: int = 2  # the OtO teacher's exit heads, trained on its frozen backbone
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    temperature: float = 3.0
    alpha: float = 1.0
    beta: float = 1.0
    heads: str = "copy"
    seeds: tuple[int, ...] = (0, 1, 2)


SETTINGS: dict[str, MSKDLesson] = {
    "quick": MSKDLesson(image_size=16, teacher="resnet20", student="resnet8", student_images=360,
                        teacher_epochs=8, head_epochs=2, epochs=10, batch_size=64, seeds=(0, 1, 2, 3, 4)),
    "lab": MSKDLesson(image_size=32, teacher="resnet18_cifar", student="resnet10_cifar",
                      teacher_options={"base_width": 32}, student_options={"base_width": 16}, student_images=2500,
                      teacher_epochs=15,
                      head_epochs=5, epochs=10, batch_size=128, seeds=(0, 1, 2)),
    "paper": MSKDLesson(image_size=32, teacher="vgg13", student="vgg8", teacher_epochs=240, head_epochs=100,
                        epochs=240, batch_size=64, seeds=(0, 1, 2)),
    "smoke": MSKDLesson(image_size=16, teacher="resnet8", student="resnet8", student_images=60, teacher_epochs=1,
                        head_epochs=1, epochs=1, batch_size=32, seeds=(0, 1)),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# The paper's numbers (Xu et al. 2022, its Tables; labelled as the paper's wherever shown)
# --------------------------------------------------------------------------------------------------------

_EXIT_COLUMNS = [
    "teacher",
    "teacher_base",
    "student",
    "student_base",
    "exit1",
    "exit2",
    "exit3",
    "exit4",
    "ensemble",
]

PAPER_CIFAR100_EXITS = pd.DataFrame(
    [
        ["ResNet152", 80.88, "ResNet50", 79.34, 79.32, 80.80, 81.78, 81.74, 83.20],
        ["ResNet152", 80.88, "ResNet18", 78.47, 75.06, 77.40, 80.15, 80.50, 81.73],
        ["ResNet152", 80.88, "ResNet10", 76.19, 73.19, 75.12, 77.52, 78.02, 79.74],
        ["ResNet50", 79.34, "ResNet18", 78.47, 74.37, 77.62, 80.09, 80.65, 81.42],
        ["ResNet50", 79.34, "VGG8", 70.36, 71.20, 69.79, 70.95, 72.98, 76.05],
        ["VGG13", 74.64, "VGG8", 70.36, 71.17, 70.59, 71.10, 72.65, 76.27],
    ],
    columns=_EXIT_COLUMNS,
)
"""Per-exit top-1 accuracy (%) on CIFAR-100. The ensemble column equals Table C's OtO row: most likely OtO."""

PAPER_TINY_IMAGENET_EXITS = pd.DataFrame(
    [
        ["ResNet34", 66.40, "ResNet34", 66.40, 59.52, 63.80, 68.65, 70.38, 71.38],
        ["ResNet34", 66.40, "ResNet18", 64.40, 59.86, 62.30, 65.30, 68.04, 69.86],
    ],
    columns=_EXIT_COLUMNS,
)
"""Per-exit top-1 accuracy (%) on Tiny ImageNet (ensemble = Table D's OtO row)."""

PAPER_CIFAR100_METHODS = pd.DataFrame(
    {
        "KD": [79.69, 79.86, 77.85, 79.72, 73.81, 72.98, 74.92],
        "FitNet": [80.51, 79.24, 78.02, 76.27, 73.24, 73.22, 73.07],
        "AT": [80.41, 80.19, 78.45, 78.28, 74.01, 73.48, 73.97],
        "SP": [80.72, 79.87, 78.25, 79.32, 73.52, 73.49, 74.34],
        "CC": [79.89, 79.82, 78.06, 77.42, 73.48, 73.04, 73.18],
        "VID": [79.24, 79.67, 77.80, 76.79, 73.46, 72.97, 74.07],
        "RKD": [80.22, 79.60, 77.90, 78.75, 73.51, 73.19, 73.36],
        "PKT": [80.57, 79.44, 78.41, 78.89, 73.61, 73.25, 74.42],
        "AB": [81.21, 79.50, 78.18, 76.77, 73.65, 73.35, 72.65],
        "FT": [80.37, 79.26, 77.53, 76.29, 72.98, 73.44, 73.33],
        "CRD": [80.53, 79.81, 78.60, 74.58, 74.58, 74.29, 75.79],
        "SSKD": [80.29, 80.36, 78.60, 79.72, 75.36, 75.27, 76.14],
        "HSAKD": [83.33, 82.17, 79.75, 81.22, 75.20, 75.07, 78.20],
        "TSKD": [83.09, 81.27, 79.34, 81.28, 75.63, 75.42, 78.31],
        "MSKD": [82.37, 81.32, 79.38, 81.17, 75.74, 75.83, 77.58],
        "OtO": [83.20, 81.73, 79.74, 81.42, 76.05, 76.27, 78.57],
        "OtO*": [83.47, 82.63, 80.52, 82.10, 76.19, 76.36, 78.72],
    },
    index=["R152→R50", "R152→R18", "R152→R10", "R50→R18", "R50→VGG8", "VGG13→VGG8", "WRN40-2→WRN16-2"],
).T
"""Top-1 accuracy (%) on CIFAR-100 of MSKD, OtO, OtO* and other KD methods (rows) per teacher→student pair."""

PAPER_TINY_IMAGENET_METHODS = pd.DataFrame(
    {
        "R34→R18": [
            66.40,
            64.40,
            67.90,
            64.44,
            66.54,
            67.06,
            66.92,
            65.90,
            65.76,
            67.94,
            68.56,
            69.04,
            69.86,
        ],
        "R34→R34": [
            66.40,
            66.40,
            68.80,
            66.18,
            67.16,
            68.36,
            68.08,
            67.80,
            68.18,
            68.96,
            69.58,
            70.78,
            71.38,
        ],
    },
    index=[
        "Teacher",
        "Student",
        "KD",
        "FitNet",
        "AT",
        "SP",
        "VID",
        "RKD",
        "PKT",
        "CRD",
        "AFD",
        "MSKD",
        "OtO",
    ],
)
"""Top-1 accuracy (%) on Tiny ImageNet (the paper gives no OtO* here)."""

PAPER_PAIRS: tuple[tuple[str, str], ...] = (
    ("resnet152_cifar", "resnet50_cifar"),
    ("resnet152_cifar", "resnet18_cifar"),
    ("resnet152_cifar", "resnet10_cifar"),
    ("resnet50_cifar", "resnet18_cifar"),
    ("resnet50_cifar", "vgg8"),
    ("vgg13", "vgg8"),
    ("wrn40_2", "wrn16_2"),
)
"""The paper's CIFAR-100 (teacher, student) pairs as zoo names, in Table C's column order."""


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def plot_exit_diagram(network: MultiExit, costs: pd.DataFrame | None = None) -> Figure:
    """Where the exits sit: the backbone's stages left to right, a head branching down after each exit point.

    With ``costs`` (from :func:`exit_costs`), each exit is labelled with its early-exit cost relative to
    the single-exit network.
    """
    stages = [name for name, _ in network.backbone.named_children()]
    fig, ax = plt.subplots(figsize=(9.0, 3.4), layout="constrained", dpi=DPI)
    palette = plt.get_cmap("tab10")
    ax.set_xlim(-0.6, len(stages) - 0.4)
    ax.set_ylim(-2.15, 0.9)
    ax.axis("off")
    for position, name in enumerate(stages):
        ax.add_patch(Rectangle((position - 0.4, 0.0), 0.8, 0.6, facecolor="#dfe8f5", edgecolor="#34495e"))
        ax.text(position, 0.3, name, ha="center", va="center", fontsize=9)
        if position:
            ax.annotate("", (position - 0.4, 0.3), (position - 0.6, 0.3), arrowprops={"arrowstyle": "->"})
    for index, exit_name in enumerate(network.exit_names):
        colour = palette(index)
        if exit_name == FINAL_EXIT:
            x, label = len(stages) - 1, f"exit {index + 1}: {FINAL_EXIT}\n(the model's own classifier)"
            ax.annotate("", (x, -0.95), (x, 0.0), arrowprops={"arrowstyle": "->", "color": colour, "lw": 2})
        else:
            x = stages.index(exit_name)
            ax.annotate(
                "",
                (x + 0.25, -0.95),
                (x + 0.25, 0.0),
                arrowprops={"arrowstyle": "->", "color": colour, "lw": 2},
            )
            head = network.heads[exit_name]
            copied = [name for name, _ in head.named_children() if name not in ("pool", "classifier")]
            if network.head_style == "light":
                kind = "one conv"
            elif len(copied) > 1:
                kind = f"copy of\n{copied[0]}-{copied[-1]}"
            else:
                kind = f"copy of\n{copied[0]}" if copied else "none"
            label = f"exit {index + 1} after {exit_name}\nhead: {kind}\n+ pool + classifier"
        if costs is not None:
            label += f"\n{costs.loc[exit_name, 'relative_macs']:.2f}x the MACs"
        ax.text(x + (0.25 if exit_name != FINAL_EXIT else 0), -1.0, label, ha="center", va="top", fontsize=7.5,
                color=colour, bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": colour})  # fmt: skip
    ax.set_title(
        f"{getattr(network.backbone, 'arch', 'model')} with {network.num_exits} exits ({network.head_style} heads)"
    )
    return fig


def plot_exit_accuracies(runs: pd.DataFrame) -> Figure:
    """Dots per exit (groups) and method (colours): mean accuracy over seeds, the std as a bar (none for
    a single run), and each run as a small dot. ``runs`` has the columns ``method, seed, exit, accuracy``
    (percent). The axis is zoomed to the data, so the dots and bars, not areas, carry the comparison."""
    summary = runs.groupby(["exit", "method"], sort=False)["accuracy"].agg(["mean", "std", "count"])
    per_method = runs.groupby("method", sort=False)["exit"].unique()
    exits = list(max(per_method, key=len))  # forward order, from the method with the most exits
    exits = [name for name in exits if name != "ensemble"] + (["ensemble"] if "ensemble" in exits else [])
    methods = list(dict.fromkeys(runs["method"]))
    width = 0.8 / len(methods)
    palette = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8.5, 3.8), layout="constrained", dpi=DPI)
    for m, method in enumerate(methods):
        for e, exit_name in enumerate(exits):
            if (exit_name, method) not in summary.index:
                continue
            mean, std, count = summary.loc[(exit_name, method)]
            x = e + (m - (len(methods) - 1) / 2) * width
            singles = runs[(runs["exit"] == exit_name) & (runs["method"] == method)]["accuracy"]
            ax.scatter([x] * len(singles), singles, s=8, color=palette(m), alpha=0.5)
            ax.errorbar(x, mean, yerr=std if count > 1 else None, fmt="o", color=palette(m), capsize=3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=palette(m)) for m in range(len(methods))]
    ax.legend(handles, methods, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xticks(range(len(exits)), exits)
    ax.set_xlabel("exit (named by the stage it follows)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per exit: mean ± std over seeds, and each run", fontsize="medium")
    return fig


def plot_accuracy_vs_macs(
    curves: dict[str, pd.DataFrame],
    points: dict[str, tuple[float, float]] | None = None,
    split: str = "validation",
) -> Figure:
    """Early exit's accuracy (percent) against the mean MACs per image (one curve per
    :func:`~kdbook_utils.methods.mskd.threshold_sweep`), plus single models as points
    ``{name: (macs, accuracy)}``."""
    fig, ax = plt.subplots(figsize=(7.0, 3.8), layout="constrained", dpi=DPI)
    for name, sweep in curves.items():
        ax.plot(sweep["mean_macs"] / 1e6, sweep["accuracy"], marker=".", label=name)
    for name, (macs, accuracy) in (points or {}).items():
        ax.scatter([macs / 1e6], [accuracy], marker="*", s=160, zorder=3, label=name)
    ax.set_xlabel("mean multiply-accumulates per image (millions of MACs)")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title("Early exit: accuracy against computation", fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------------------
# What the lesson runs
# --------------------------------------------------------------------------------------------------------

SINGLE = "single exit"
SINGLE_KD = "single exit + KD"
MULTI_CE = "multi-exit CE"
MSKD_COPY = "MSKD"
OTO = "OtO"
MSKD_LIGHT = "MSKD, light heads"
METHODS = (SINGLE, SINGLE_KD, MULTI_CE, MSKD_COPY, OTO, MSKD_LIGHT)
"""The ways the lesson trains the student. "single exit + KD" is MSKD's loss on the plain network (no
extra exit): Hinton KD with MSKD's teacher, temperature, weights and epochs, the fair baseline."""


@dataclass
class MSKDRunner(LessonRunner):
    """What lesson 4 runs, written once for the notebook, the results recorder and the command line.

    A job is ``{"method": name}``, ``name`` one of :data:`METHODS`."""

    STAGES: ClassVar[dict[str, Stage]] = {
        "final": Stage("every way of training the multi-exit student, over the seeds", (),
                       lambda runner: runner.compare_all(), split="test"),
    }  # fmt: skip
    SETTINGS: ClassVar[Mapping[str, MSKDLesson]] = SETTINGS
    lesson: ClassVar[str] = "mskd"

    teacher: TrainedModel
    exits: TrainedModel  # the teacher with exit heads, for OtO (its ``model`` is a MultiExit)

    @property
    def teacher_exits(self) -> MultiExit:
        """The OtO teacher: the lesson's teacher with an exit head after every stage."""
        return self.exits.model

    def teacher_models(self) -> dict[str, TrainedModel]:
        return {"teacher": self.teacher, "teacher with exits": self.exits}

    @classmethod
    def prepare(
        cls,
        preset: Preset,
        splits: DataSplits,
        *,
        device: DeviceLike = None,
        progress: bool = True,
        settings: MSKDLesson | None = None,
    ) -> MSKDRunner:
        """Load the teacher (trained on the whole training split) and its exit heads for OtO (shipped,
        cached, or trained where the preset allows); cut the students' images from the training split."""
        settings = cls.settings_for(preset, settings)
        device, precision = cls.runtime(preset, device)
        sized = DataSplits(*(data.resized(settings.image_size) for data in splits))
        common = {"lr": settings.lr, "batch_size": settings.batch_size, "device": device, "precision": precision,
                  "may_train": preset.train_teachers, "progress": progress}  # fmt: skip
        teacher = cached_teacher(settings.teacher, sized, epochs=settings.teacher_epochs,
                                 model_options=settings.teacher_options, **common)  # fmt: skip
        exits = cached_teacher_exits(teacher.model, sized, epochs=settings.head_epochs, heads=settings.heads,
                                     **common)  # fmt: skip
        train = sized.train
        if settings.student_images is not None and settings.student_images < len(train):
            train = train.subset(settings.student_images, seed=0)
        return cls(preset, settings, DataSplits(train, sized.val, sized.test), device, precision, progress,
                   teacher, exits)  # fmt: skip

    def build(self) -> nn.Module:
        data = self.splits.train
        return create_model(self.settings.student, data.num_classes, in_channels=data.image_shape[0],
                            **self.settings.student_options)  # fmt: skip

    def network(
        self, heads: str | None = None, exits: Sequence[str] | None = None
    ) -> Callable[[nn.Module], MultiExit]:
        shape = self.splits.train.image_shape
        return lambda student: MultiExit(
            student, exits=exits, heads=heads or self.settings.heads, input_shape=shape
        )

    def method(self, name: str) -> Callable[[nn.Module], nn.Module] | None:
        """The method that trains a fresh student for ``name`` (one of :data:`METHODS`)."""
        s = self.settings
        loss = {"temperature": s.temperature, "alpha": s.alpha, "beta": s.beta}
        if name == SINGLE:
            return None
        if name == SINGLE_KD:
            plain = self.network(exits=())
            return lambda student: MSKD(plain(student), self.teacher.model, **loss)
        if name == MULTI_CE:
            return lambda student: MultiExitCrossEntropy(self.network()(student), alpha=s.alpha)
        if name == MSKD_COPY:
            return lambda student: MSKD(self.network()(student), self.teacher.model, **loss)
        if name == OTO:
            return lambda student: OtO(self.network()(student), self.teacher_exits, **loss)
        if name == MSKD_LIGHT:
            return lambda student: MSKD(self.network(heads="light")(student), self.teacher.model, **loss)
        raise ValueError(f"Unknown method {name!r}; the lesson's methods are {METHODS}.")

    def complete(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        if spec.get("method") not in METHODS:
            raise ValueError(f"Unknown method {spec.get('method')!r}; the lesson's methods are {METHODS}.")
        return {"method": spec["method"]}

    def train_job(self, spec: dict[str, Any], seed: int) -> StudentRun:
        s = self.settings
        return train_student(self.build, self.method(spec["method"]), self.splits, seed=seed, epochs=s.epochs,
                             lr=s.lr, batch_size=s.batch_size, cache=self.cache, keep_logits=True,
                             device=self.device, precision=self.precision)  # fmt: skip

    def compare_all(self, methods: Sequence[str] = METHODS) -> pd.DataFrame:
        """Every method over the lesson's seeds: one tidy table (a row per exit and the ensemble)."""
        return self.table({name: {"method": name} for name in methods}, self.settings.seeds)
