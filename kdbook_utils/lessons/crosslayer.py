"""Lesson 3 (cross-layer KD): its settings per preset, the ablation grid after the paper's tables, figures,
and the abstract's numbers (the only numbers the paper makes public)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Arc
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from kdbook_utils.data import DataSplits, ImageDataset, TensorLoader
from kdbook_utils.experiments import (
    StudentRun,
    TrainedModel,
    cached_adapted_teacher,
    cached_teacher,
    train_student,
)
from kdbook_utils.features import FeatureExtractor, eval_mode
from kdbook_utils.lessons import LessonRunner, Stage
from kdbook_utils.methods.crosslayer import CrossLayerDistiller, Pair, cross_layer_pairs, fsp_matrices
from kdbook_utils.methods.hinton import HintonKD
from kdbook_utils.models import create_model
from kdbook_utils.plots import DPI, heatmap_grid
from kdbook_utils.presets import Preset
from kdbook_utils.train import DeviceLike, evaluate, freeze

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
        student_images=300, gram_epochs=3, task_epochs=6, lr=0.05, gram_lr=0.01, batch_size=64, augment=False,
        seeds=(0, 1, 2, 3, 4), chain={"base_width": 8, "teacher_epochs": 20, "adapter_epochs": 10},
    ),
    "lab": CrossLayerLesson(
        image_size=32, teacher="resnet32w", student="resnet8w", width=0.25, teachers=3, teacher_epochs=6,
        student_images=2000, gram_epochs=3, task_epochs=10, lr=0.05, gram_lr=0.01, batch_size=128, augment=False,
        seeds=(0, 1, 2), chain={"base_width": 8, "teacher_epochs": 8, "adapter_epochs": 3},
    ),
    "paper": CrossLayerLesson(
        image_size=32, teacher="resnet32w", student="resnet8w", width=1.0, teachers=3, teacher_epochs=240,
        student_images=None, gram_epochs=40, task_epochs=100, lr=0.1, gram_lr=0.01, batch_size=128, augment=True,
        seeds=(0, 1, 2), chain={"base_width": 64, "teacher_epochs": 240, "adapter_epochs": 10},
    ),
    "smoke": CrossLayerLesson(
        image_size=8, teacher="resnet32w", student="resnet8w", width=0.125, teachers=2, teacher_epochs=1,
        student_images=60, gram_epochs=1, task_epochs=1, lr=0.05, gram_lr=0.01, batch_size=32, augment=False,
        seeds=(0, 1), chain={"base_width": 4, "teacher_epochs": 1, "adapter_epochs": 1},
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation: which parts of the method are on. ``num_teachers=0`` is the student alone;
    ``gram=False`` drops phase A (the cross-layer Gram term, P1), ``use_kl=False`` the KL term (P2);
    ``hinton=True`` is Hinton KD (lesson 1's loss, T = 4, alpha = 0.1) from the ensemble's first teacher,
    the row that tells the paper's terms apart from plain response distillation."""

    k: int = 3
    mode: str = "cumulative"
    use_kl: bool = True
    num_teachers: int = 3
    ensemble: str = "mean"
    kl_mode: str = "forward"
    gram: bool = True
    hinton: bool = False

    def __post_init__(self) -> None:
        if self.num_teachers > 0 and not (self.gram or self.use_kl or self.hinton):
            raise ValueError("An ablation row with teachers needs a term: gram, use_kl or hinton.")

    @property
    def label(self) -> str:
        if self.num_teachers == 0:
            return "student alone"
        teachers = f"{self.num_teachers} teacher" + ("s" if self.num_teachers > 1 else "")
        if self.hinton:
            return f"Hinton KD + {teachers}"
        parts = [f"cross-{self.k}" + ("" if self.mode == "cumulative" else " (exact)")] if self.gram else []
        if self.use_kl:
            parts.append("KL" if self.kl_mode == "forward" else "symmetric KL")
        parts.append(teachers)
        if self.num_teachers > 1 and self.ensemble != "mean":
            parts.append(self.ensemble.replace("_", " "))
        return " + ".join(parts)

    def replace(self, **changes: object) -> Ablation:
        return replace(self, **changes)


STUDENT_ALONE = Ablation(num_teachers=0)
P1 = Ablation(k=3, use_kl=False, num_teachers=1)
P2 = Ablation(k=3, gram=False, use_kl=True, num_teachers=1)
P1_P2 = Ablation(k=3, use_kl=True, num_teachers=1)
P2_P3 = Ablation(k=3, gram=False, use_kl=True, num_teachers=3)
P1_P2_P3 = Ablation(k=3, use_kl=True, num_teachers=3)
HINTON_KD = Ablation(num_teachers=1, gram=False, use_kl=False, hinton=True)


def ablation_grid(max_k: int = 3, max_teachers: int = 3) -> dict[str, list[Ablation]]:
    """The settings behind each group of the paper's tables (identical settings are shared):

    * "cross-k" (Tables 4-6): P1 with k = 1..max_k, one teacher;
    * "KL" (Tables 7-9): cross-max_k with and without the KL term, one teacher, beside the KL term alone
      and Hinton KD (not in the paper: they tell its terms apart from plain response distillation);
    * "teachers" (Tables 10-12): cross-max_k + KL with 1..max_teachers teachers;
    * "combinations" (Tables 13-15): P1, P2, P1+P2, P2+P3, P1+P2+P3, Hinton KD and the student alone.
    """
    many = max(1, max_teachers)
    return {
        "cross-k": [STUDENT_ALONE] + [P1.replace(k=k) for k in range(1, max_k + 1)],
        "KL": [STUDENT_ALONE, P1.replace(k=max_k), P2, P1_P2.replace(k=max_k), HINTON_KD],
        "teachers": [STUDENT_ALONE] + [P1_P2.replace(k=max_k, num_teachers=n) for n in range(1, max_teachers + 1)],
        "combinations": [STUDENT_ALONE, P1.replace(k=max_k), P2, P1_P2.replace(k=max_k),
                         P2_P3.replace(num_teachers=many), P1_P2_P3.replace(k=max_k, num_teachers=many),
                         HINTON_KD],
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
        ax.add_patch(
            Arc(((i + j) / 2, 0), j - i, 0.9 * (j - i), theta1=0, theta2=180, lw=2, color=colours[j - i - 1])
        )
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
    teacher_grams: Mapping[Pair, Tensor],
    student_grams: Mapping[Pair, Tensor],
    title: str = "",
    pairs: Sequence[Pair] | None = None,
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
    return (
        sum(float(((teacher_grams[p] - snapshot_grams[p]) / scale[p]).pow(2).sum()) for p in teacher_grams)
        ** 0.5
    )


def plot_gap_curve(teacher_grams: Mapping[Pair, Tensor], snapshots: Sequence[Mapping]) -> Figure:
    """The teacher-student Gram gap (:func:`gram_gap`) after every epoch, phase A then phase B."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4), layout="constrained", dpi=DPI)
    xs, gaps, phases = [], [], []
    for index, snapshot in enumerate(snapshots):
        xs.append(index)
        gaps.append(gram_gap(teacher_grams, snapshot["grams"]))
        phases.append(snapshot["phase"])
    finite = [gap for gap in gaps if math.isfinite(gap)]
    top = max(finite, default=1.0)
    ax.plot(xs, [gap if math.isfinite(gap) else float("nan") for gap in gaps], marker="o")
    if len(finite) < len(gaps):  # a run whose matrices overflowed: say so on the figure, plot what is left
        ax.annotate(
            "the gap overflowed at the missing points:\nthis run diverged, so read no trend into it",
            (0.98, 0.5), xycoords="axes fraction", ha="right", va="center", color="tab:red", fontsize="small",
        )  # fmt: skip
    switch = next((i for i, phase in enumerate(phases) if phase == "task"), None)
    if switch is not None and switch > 0:
        ax.axvline(switch, color="grey", linestyle="--")
        ax.annotate("phase A: Gram loss only", (switch / 2, top), ha="center", va="top", fontsize="small")
        ax.annotate(
            "phase B: CE + KL",
            ((switch + len(xs) - 1) / 2, top),
            ha="center",
            va="top",
            fontsize="small",
        )
    ax.set_ylim(0, top * 1.15)
    ax.set_xlim(-0.3, len(xs) - 0.7)  # every epoch, also those whose gap overflowed
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("Gram gap to the teachers\n(relative, summed over pairs)")
    ax.set_title("The student's Gram gap to the teachers, epoch by epoch", fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------------------
# What the lesson runs
# --------------------------------------------------------------------------------------------------------


CHAIN_ROUTES: dict[str, str] = {
    "ResNet-10 alone": "alone",
    "ResNet-50 -> ResNet-10 (1x1 adapters)": "adapters",
    "ResNet-50 -> ResNet-18 -> ResNet-10": "two steps",
}
"""The chain experiment's routes (the paper's Tables 19-20): their labels and job names."""


@dataclass
class CrossLayerRunner(LessonRunner):
    """What lesson 3 runs, written once for the notebook, the results recorder and the command line.

    A job is an :class:`Ablation`'s fields as a dict (``dataclasses.asdict(setting)``), or ``{"chain":
    route}`` for a route of the chain experiment (:data:`CHAIN_ROUTES`; ``"intermediate"`` is its
    ResNet-18, distilled from the adapted ResNet-50 with the first seed).
    """

    STAGES: ClassVar[dict[str, Stage]] = {
        "ablation": Stage("the paper's ablation tables (cross-k, the KL term, the number of teachers) with the "
                          "KL term alone and Hinton KD beside them", (),
                          lambda runner: runner.grid(unique_settings(ablation_grid(max_teachers=runner.settings.teachers)))),
        "final": Stage("P1 + P2 + P3 against the student alone, over the seeds", (),
                       lambda runner: runner.grid(runner.headline_settings()), split="test"),
        "chain": Stage("ResNet-50 to ResNet-10 through 1x1 adapters, and in two steps through a ResNet-18",
                       (), lambda runner: runner.chain()[0], split="test"),
    }  # fmt: skip
    SETTINGS: ClassVar[Mapping[str, CrossLayerLesson]] = SETTINGS
    lesson: ClassVar[str] = "crosslayer"

    full_train: ImageDataset  # the teachers' training split, at the lesson's image size
    teachers: list[TrainedModel]

    @classmethod
    def prepare(
        cls,
        preset: Preset,
        splits: DataSplits,
        *,
        device: DeviceLike = None,
        progress: bool = True,
        settings: CrossLayerLesson | None = None,
    ) -> CrossLayerRunner:
        """Load the ensemble's teachers, one seed each (shipped, cached, or trained where the preset allows),
        at the lesson's image size; cut the students' images from the training split."""
        settings = cls.settings_for(preset, settings)
        device, precision = cls.runtime(preset, device)
        sized = DataSplits(*(data.resized(settings.image_size) for data in splits))
        teachers = [
            cached_teacher(settings.teacher, sized, epochs=settings.teacher_epochs, lr=settings.lr,
                           batch_size=settings.batch_size, seed=seed, model_options={"width": settings.width},
                           device=device, precision=precision, may_train=preset.train_teachers,
                           progress=progress)
            for seed in range(settings.teachers)
        ]  # fmt: skip
        train = sized.train
        if settings.student_images is not None and settings.student_images < len(train):
            train = train.subset(settings.student_images, seed=0)
        return cls(preset, settings, DataSplits(train, sized.val, sized.test), device, precision, progress,
                   sized.train, teachers)  # fmt: skip

    def build(self) -> nn.Module:
        data = self.splits.train
        return create_model(self.settings.student, data.num_classes, in_channels=data.image_shape[0],
                            width=self.settings.width)  # fmt: skip

    def complete(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        if "chain" in spec:
            route = spec["chain"]
            if route not in (*CHAIN_ROUTES.values(), "intermediate"):
                raise ValueError(
                    f"Unknown chain route {route!r}; the routes are {list(CHAIN_ROUTES.values())}."
                )
            return {"chain": route}
        return dataclasses.asdict(Ablation(**spec))

    def train_job(self, spec: dict[str, Any], seed: int) -> StudentRun:
        if "chain" in spec:
            return self._chain_run(spec["chain"], seed)
        setting, s = Ablation(**spec), self.settings
        common = {"seed": seed, "lr": s.lr, "batch_size": s.batch_size, "augment": s.augment, "cache": self.cache,
                  "device": self.device, "precision": self.precision}  # fmt: skip
        teachers = [teacher.model for teacher in self.teachers[: setting.num_teachers]]
        if setting.num_teachers == 0:
            return train_student(
                self.build, None, self.splits, epochs=s.gram_epochs + s.task_epochs, **common
            )
        if setting.hinton:
            return train_student(self.build, lambda student: HintonKD(student, teachers[0]), self.splits,
                                 epochs=s.gram_epochs + s.task_epochs, **common)  # fmt: skip
        method = lambda student: CrossLayerDistiller(
            student, teachers, gram_epochs=s.gram_epochs if setting.gram else 0, gram_lr=s.gram_lr, k=setting.k,
            mode=setting.mode, use_kl=setting.use_kl, kl_mode=setting.kl_mode, ensemble=setting.ensemble, seed=seed,
        )  # fmt: skip
        # Every row trains as many epochs in all: a row without phase A gets its epochs in phase B.
        epochs = s.task_epochs if setting.gram else s.gram_epochs + s.task_epochs
        return train_student(self.build, method, self.splits, epochs=epochs, **common)

    def grid(self, settings: Sequence[Ablation]) -> pd.DataFrame:
        """Every setting over the lesson's seeds: one tidy table."""
        jobs = {setting.label: dataclasses.asdict(setting) for setting in dict.fromkeys(settings)}
        return self.table(jobs, self.settings.seeds)

    def headline_settings(self) -> list[Ablation]:
        return [STUDENT_ALONE, P1_P2_P3.replace(num_teachers=self.settings.teachers)]

    def _chain_model(self, arch: str) -> Callable[[], nn.Module]:
        data = self.splits.train
        return lambda: create_model(arch, data.num_classes, in_channels=data.image_shape[0],
                                    base_width=self.settings.chain["base_width"])  # fmt: skip

    def teacher_models(self) -> dict[str, TrainedModel]:
        return {f"ensemble teacher {index + 1}": teacher for index, teacher in enumerate(self.teachers)}

    def trained_models(self) -> dict[str, TrainedModel]:
        r50, adapted = self.chain_teachers()
        return {
            **self.teacher_models(),
            "chain teacher (ResNet-50)": r50,
            "chain teacher with 1x1 adapters": adapted,
        }

    @property
    def student_epochs(self) -> int:
        return self.settings.gram_epochs + self.settings.task_epochs

    def chain_teachers(self) -> tuple[TrainedModel, TrainedModel]:
        """The chain's ResNet-50 teacher (trained on the teachers' split) and its copy with 1x1 adapters to
        ResNet-10's widths, fine-tuned (both cached; shipped for quick and lab). Loaded once per runner."""
        if getattr(self, "_chain_teachers", None) is None:
            self._chain_teachers = self._load_chain_teachers()
        return self._chain_teachers

    def _load_chain_teachers(self) -> tuple[TrainedModel, TrainedModel]:
        s, chain = self.settings, self.settings.chain
        sized = DataSplits(self.full_train, self.splits.val, self.splits.test)
        common = {"lr": s.lr, "batch_size": s.batch_size, "device": self.device, "precision": self.precision,
                  "may_train": self.preset.train_teachers, "progress": self.progress}  # fmt: skip
        r50 = cached_teacher("resnet50_cifar", sized, epochs=chain["teacher_epochs"],
                             model_options={"base_width": chain["base_width"]}, **common)  # fmt: skip
        adapted = cached_adapted_teacher(
            r50.model, self._chain_model("resnet10_cifar")(), sized, epochs=chain["adapter_epochs"], **common
        )
        return r50, adapted

    def notebook_teachers(self) -> None:
        """Train (once) the teachers the notebook uses beyond :meth:`prepare`'s: the chain's (section 6)."""
        self.chain_teachers()

    def _distil(self, teacher: nn.Module, seed: int) -> Callable[[nn.Module], nn.Module]:
        s = self.settings
        return lambda student: CrossLayerDistiller(student, teacher, gram_epochs=s.gram_epochs, gram_lr=s.gram_lr,
                                                   k=P1_P2.k, use_kl=P1_P2.use_kl, seed=seed)  # fmt: skip

    def _chain_run(self, route: str, seed: int) -> StudentRun:
        s = self.settings
        common = {"seed": seed, "lr": s.lr, "batch_size": s.batch_size, "augment": s.augment, "cache": self.cache,
                  "device": self.device, "precision": self.precision}  # fmt: skip
        if route == "alone":
            return train_student(self._chain_model("resnet10_cifar"), None, self.splits,
                                 epochs=s.gram_epochs + s.task_epochs, **common)  # fmt: skip
        adapted = self.chain_teachers()[1].model
        if route == "intermediate":
            return train_student(self._chain_model("resnet18_cifar"), self._distil(adapted, seed), self.splits,
                                 epochs=s.task_epochs, **common)  # fmt: skip
        teacher = adapted if route == "adapters" else self.chain_intermediate()
        return train_student(self._chain_model("resnet10_cifar"), self._distil(teacher, seed), self.splits,
                             epochs=s.task_epochs, **common)  # fmt: skip

    def chain_intermediate(self) -> nn.Module:
        """The two-step route's ResNet-18: distilled from the adapted ResNet-50 (first seed), then frozen."""
        return freeze(self.job({"chain": "intermediate"}, self.settings.seeds[0]).model)

    def chain(self) -> tuple[pd.DataFrame, dict[str, float]]:
        """Tables 19-20: ResNet-50 -> ResNet-10 through 1x1 adapters, and ResNet-50 -> ResNet-18 -> ResNet-10.

        Returns the runs of the three routes over the first three seeds (the student alone, the direct
        route, the two-step route) and the validation accuracy (percent) of the teachers along the way.
        """
        runs = self.table({label: {"chain": route} for label, route in CHAIN_ROUTES.items()},
                          self.settings.seeds[:3])  # fmt: skip
        r50, adapted = self.chain_teachers()
        val_loader = TensorLoader(self.splits.val, 512, train=False, device=self.device)
        teachers = {name: evaluate(model, val_loader, device=self.device)["accuracy"]
                    for name, model in (("ResNet-50", r50.model), ("ResNet-50 with 1x1 adapters", adapted.model),
                                        ("ResNet-18 (distilled from it)", self.chain_intermediate()))}  # fmt: skip
        return runs, teachers
