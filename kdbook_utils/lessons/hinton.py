"""Lesson 1 (Hinton KD): its settings per preset, figures and tables."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn import functional as F

from kdbook_utils.data import DataSplits
from kdbook_utils.experiments import (
    StudentRun,
    TrainedModel,
    best_on_validation,
    cached_teacher,
    train_student,
)
from kdbook_utils.lessons import LessonRunner, Stage
from kdbook_utils.methods.hinton import (
    HintonKD,
    check_logits,
    kd_loss,
    logit_matching_limit,
    soft_cross_entropy,
    soft_targets,
)
from kdbook_utils.models import create_model
from kdbook_utils.models.small_cnn import SMALL_CNN_FAMILY
from kdbook_utils.models.torchvision_zoo import PretrainedWeightsUnavailable
from kdbook_utils.plots import DPI
from kdbook_utils.presets import Preset
from kdbook_utils.train import DeviceLike

# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HintonSettings:
    """What lesson 1 runs in one preset."""

    teacher: str
    teacher_epochs: int
    student: str  # a member of kdbook_utils.models.small_cnn.SMALL_CNN_FAMILY
    student_images: int | None  # training images the students see (None: the whole training split)
    epochs: int
    batch_size: int
    lr: float
    temperatures: tuple[float, ...]  # the sweep, judged on the validation split
    alphas: tuple[float, ...]
    sweep_seeds: tuple[int, ...]
    seeds: tuple[int, ...]  # the final comparison on the test split
    students: tuple[str, ...]  # the student-size sweep
    omitted_class: int = 3  # the class left out of the students' images (section 3 of the paper: a 3)
    omitted_T: float = 20.0  # the paper's temperature for that experiment
    omitted_alpha: float = 0.0  # soft targets alone: the labels would teach the student never to answer it
    pretrained_teacher: str | None = None  # an ImageNet-pretrained torchvision teacher (preset paper)


SETTINGS: dict[str, HintonSettings] = {
    "quick": HintonSettings(
        teacher="resnet20", teacher_epochs=8, student="cnn-3x16", student_images=300, epochs=15, batch_size=32,
        lr=0.05, temperatures=(1.0, 4.0, 16.0), alphas=(0.1, 0.5, 0.9), sweep_seeds=(0,), seeds=(0, 1, 2, 3, 4),
        students=("cnn-1x8", "cnn-2x8", "cnn-2x16", "cnn-3x16"),
    ),
    "lab": HintonSettings(
        teacher="resnet20", teacher_epochs=15, student="cnn-3x16", student_images=10_000, epochs=15, batch_size=128,
        lr=0.05, temperatures=(1.0, 4.0, 16.0), alphas=(0.1, 0.5, 0.9), sweep_seeds=(0,), seeds=(0, 1, 2),
        students=("cnn-1x8", "cnn-2x16", "cnn-3x16"),
    ),
    "paper": HintonSettings(
        teacher="resnet56", teacher_epochs=240, student="cnn-3x16", student_images=None, epochs=240, batch_size=64,
        lr=0.05, temperatures=(1.0, 2.0, 4.0, 8.0, 16.0), alphas=(0.0, 0.1, 0.5, 0.9), sweep_seeds=(0, 1, 2),
        seeds=(0, 1, 2), students=("cnn-1x8", "cnn-2x8", "cnn-2x16", "cnn-3x16"),
        pretrained_teacher="torchvision_resnet50",
    ),
    "smoke": HintonSettings(
        teacher="resnet8", teacher_epochs=1, student="cnn-2x8", student_images=100, epochs=1, batch_size=32,
        lr=0.05, temperatures=(4.0,), alphas=(0.1, 0.5), sweep_seeds=(0,), seeds=(0, 1),
        students=("cnn-1x8", "cnn-2x8"),
    ),
}  # fmt: skip


ALONE = "student alone"
KD = "KD"


def kd_name(temperature: float, alpha: float) -> str:
    """The name of a KD run in the lesson's tables, e.g. ``"KD (T=4, alpha=0.1)"``."""
    return f"KD (T={temperature:g}, alpha={alpha:g})"


@dataclass
class HintonLesson(LessonRunner):
    """What lesson 1 runs, written once for the notebook, the results recorder and the command line.

    A job is ``{"method": ALONE}`` or ``{"method": KD, "temperature": T, "alpha": a}``, optionally with
    ``"student"`` (a member of the small-CNN family; default: the lesson's student), ``"images"`` (train on
    a stratified subset of that many of the students' images; default all), ``"omit"`` (a class index left
    out of the student's training images: the paper's section 3 experiment) and ``"loss"`` (a function
    replacing ``kd_loss``, e.g. a learner's own).
    """

    STAGES: ClassVar[dict[str, Stage]] = {
        "sweep": Stage("every (T, alpha) of the settings and the student alone, on the sweep seeds", (),
                       lambda runner: runner.sweep()),
        "final": Stage("the student alone and with KD at the sweep's best (T, alpha) on the validation split, "
                       "over the seeds", ("sweep",), lambda runner: runner.headline(*runner.choose(runner.sweep())),
                       split="test"),
        "omitted": Stage("a class left out of the students' images: the student alone and with KD, over the "
                         "seeds (accuracy on that class, its bias chosen on validation)", (),
                         lambda runner: runner.omitted_class(), split="test",
                         output="omitted class, bias chosen on validation"),
    }  # fmt: skip
    SETTINGS: ClassVar[Mapping[str, HintonSettings]] = SETTINGS
    lesson: ClassVar[str] = "hinton"

    teacher: TrainedModel

    @classmethod
    def prepare(
        cls,
        preset: Preset,
        splits: DataSplits,
        *,
        device: DeviceLike = None,
        progress: bool = True,
        settings: HintonSettings | None = None,
    ) -> HintonLesson:
        """Load the lesson's teacher (shipped, cached, or trained once where the preset allows) and cut the
        students' images from the training split."""
        settings = cls.settings_for(preset, settings)
        device, precision = cls.runtime(preset, device)
        teacher = cls.load_teacher(preset, settings, splits, device, precision, progress)
        train = splits.train
        if settings.student_images is not None and settings.student_images < len(train):
            train = train.subset(settings.student_images, seed=0)
        return cls(preset, settings, DataSplits(train, splits.val, splits.test), device, precision, progress,
                   teacher)  # fmt: skip

    @staticmethod
    def load_teacher(
        preset: Preset,
        settings: HintonSettings,
        splits: DataSplits,
        device: torch.device,
        precision: torch.dtype | None,
        progress: bool = True,
    ) -> TrainedModel:
        """The lesson's teacher, trained on the whole training split (cached; shipped for quick and lab)."""
        common = {"lr": preset.lr, "batch_size": preset.batch_size, "device": device, "precision": precision,
                  "progress": progress, "may_train": preset.train_teachers}  # fmt: skip
        if settings.pretrained_teacher:  # the paper preset: an ImageNet-pretrained teacher, fine-tuned
            try:
                return cached_teacher(settings.pretrained_teacher, splits, epochs=settings.teacher_epochs,
                                      pretrained=True, download=True, **common)  # fmt: skip
            except PretrainedWeightsUnavailable as error:
                print(f"The ImageNet-pretrained teacher is not available here ({error}); training "
                      f"{settings.teacher} from scratch instead.")  # fmt: skip
        return cached_teacher(settings.teacher, splits, epochs=settings.teacher_epochs, **common)

    def teacher_models(self) -> dict[str, TrainedModel]:
        return {"teacher": self.teacher}

    def build(self, student: str | None = None) -> Callable[[], torch.nn.Module]:
        """A function making a fresh student of the small-CNN family (default: the lesson's student)."""
        options = SMALL_CNN_FAMILY[student or self.settings.student]
        data = self.splits.train
        return lambda: create_model("small_cnn", data.num_classes, in_channels=data.image_shape[0], **options)

    def complete(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        full = {"student": self.settings.student, "images": None, "omit": None, **spec}
        if full.get("method") not in (ALONE, KD):
            raise ValueError(
                f"A lesson-1 job's method must be {ALONE!r} or {KD!r}; got {full.get('method')!r}."
            )
        if full["method"] == KD:
            full = {"temperature": 4.0, "alpha": 0.1, "loss": None, **full}
        images = full["images"]
        if images is not None and not (isinstance(images, int) and 10 <= images <= len(self.splits.train)):
            raise ValueError(f"A job's 'images' must be a whole number from 10 to {len(self.splits.train)} (the "
                             f"students' images); got {images!r}.")  # fmt: skip
        if full["student"] not in SMALL_CNN_FAMILY:
            raise ValueError(f"Unknown student {full['student']!r}; the small-CNN family is "
                             f"{list(SMALL_CNN_FAMILY)}.")  # fmt: skip
        return full

    def train_job(self, spec: dict[str, Any], seed: int) -> StudentRun:
        method = None
        if spec["method"] == KD:
            teacher = self.teacher.model
            method = lambda s: HintonKD(s, teacher, temperature=spec["temperature"], alpha=spec["alpha"],
                                        loss=spec["loss"])  # fmt: skip
        splits = self.splits
        if spec["images"] is not None and spec["images"] < len(splits.train):
            splits = DataSplits(splits.train.subset(spec["images"], seed=0), splits.val, splits.test)
        if spec["omit"] is not None:
            splits = DataSplits(splits.train.without_classes([spec["omit"]]), splits.val, splits.test)
        run = train_student(
            self.build(spec["student"]), method, splits, seed=seed, epochs=self.settings.epochs,
            lr=self.settings.lr, batch_size=self.settings.batch_size, cache=self.cache, device=self.device,
            precision=self.precision, keep_logits=spec["omit"] is not None,
        )  # fmt: skip
        if spec["omit"] is not None:  # the accuracy on the images of the class the student never saw
            shift = best_bias_shift(*run.logits["val"], spec["omit"])
            for split, (logits, labels) in run.logits.items():
                extra = {OMITTED: class_accuracy(logits, labels, spec["omit"]),
                         OMITTED_ADJUSTED: class_accuracy(logits, labels, spec["omit"], shift)}  # fmt: skip
                run.accuracy[split] = pd.concat([run.accuracy[split], pd.Series(extra)])
            run.logits = {}
        return run

    def sweep(self) -> pd.DataFrame:
        """Every (T, alpha) of the settings, and the student alone, over the sweep seeds (one tidy table)."""
        jobs: dict[str, dict] = {ALONE: {"method": ALONE}}
        for temperature in self.settings.temperatures:
            for alpha in self.settings.alphas:
                jobs[kd_name(temperature, alpha)] = {"method": KD, "temperature": temperature, "alpha": alpha}
        runs = self.table(jobs, self.settings.sweep_seeds)
        runs["T"] = runs["method"].map(lambda m: jobs[m].get("temperature"))
        runs["alpha"] = runs["method"].map(lambda m: jobs[m].get("alpha"))
        return runs

    @staticmethod
    def choose(sweep: pd.DataFrame) -> tuple[float, float]:
        """The (T, alpha) with the best mean *validation* accuracy (:func:`best_on_validation`)."""
        best = best_on_validation(sweep, ["T", "alpha"], "temperature and weight")
        return float(best[0]), float(best[1])

    def headline(self, temperature: float, alpha: float) -> pd.DataFrame:
        """The final comparison: the student alone and with KD at the chosen setting, over the seeds."""
        jobs = {
            ALONE: {"method": ALONE},
            kd_name(temperature, alpha): {"method": KD, "temperature": temperature, "alpha": alpha},
        }
        return self.table(jobs, self.settings.seeds)

    def omitted_class(self) -> pd.DataFrame:
        """Hinton et al.'s section 3: the students never see class ``settings.omitted_class``; the student
        alone and the student with KD (at the settings' ``omitted_T`` and ``omitted_alpha``) over the seeds.
        The rows with ``output`` "omitted class" hold the accuracy on that class's images."""
        s = self.settings
        jobs = {
            ALONE: {"method": ALONE, "omit": s.omitted_class},
            kd_name(s.omitted_T, s.omitted_alpha): {"method": KD, "temperature": s.omitted_T,
                                                    "alpha": s.omitted_alpha, "omit": s.omitted_class},
        }  # fmt: skip
        return self.table(jobs, s.seeds)

    def sizes(self, temperature: float, alpha: float) -> pd.DataFrame:
        """Every student size, alone and with KD, on the first sweep seed (validation accuracy)."""
        seed = self.settings.sweep_seeds[0]
        rows = []
        for student in self.settings.students:
            parameters = sum(p.numel() for p in self.build(student)().parameters())
            for spec in ({"method": ALONE}, {"method": KD, "temperature": temperature, "alpha": alpha}):
                run = self.job({**spec, "student": student}, seed)
                rows.append({"student": student, "parameters": parameters, "kd": spec["method"] == KD,
                             "accuracy": float(run.accuracy["val"]["final"]), "failed": run.failed})  # fmt: skip
        return pd.DataFrame(rows)


OMITTED = "omitted class"
"""The output name of the accuracy on the class left out of the students' images."""
OMITTED_ADJUSTED = "omitted class, bias chosen on validation"
"""The same, with that class's output bias raised by :func:`best_bias_shift` (chosen on validation)."""

BIAS_SHIFTS = tuple(step * 0.25 for step in range(41))
"""The bias shifts tried for the left-out class: 0 to 10 in steps of 0.25."""

PAPER_OMITTED_DIGIT = pd.DataFrame(
    {"test 3s correct (%)": [100 * (1010 - 133) / 1010, 100 * (1010 - 14) / 1010],
     "test errors (of 10,000)": [206, 109], "errors on the 1,010 test 3s": [133, 14]},
    index=pd.Index(["distilled, no 3 in its transfer set", "the same, bias of 3 raised by 3.5"], name="paper"),
)  # fmt: skip
"""Hinton et al. section 3 (MNIST): the distilled net that never saw a 3, before and after raising the bias
of its 3 output by 3.5 (chosen by the paper on its test set). Accuracies computed from the reported error
counts."""


def class_accuracy(logits: Tensor, labels: Tensor, label: int, shift: float = 0.0) -> float:
    """Accuracy (percent) on the images of class ``label``, with ``shift`` added to that class's logit."""
    adjusted = logits.clone()
    adjusted[:, label] += shift
    members = labels == label
    return 100.0 * (adjusted[members].argmax(1) == label).double().mean().item()


def best_bias_shift(logits: Tensor, labels: Tensor, label: int) -> float:
    """The bias shift of class ``label`` (from :data:`BIAS_SHIFTS`) that gives the best accuracy over all
    classes of these logits (the validation split's); the smallest such shift on a tie."""

    def overall(shift: float) -> float:
        adjusted = logits.clone()
        adjusted[:, label] += shift
        return (adjusted.argmax(1) == labels).double().mean().item()

    scores = [overall(shift) for shift in BIAS_SHIFTS]
    return BIAS_SHIFTS[scores.index(max(scores))]


# --------------------------------------------------------------------------------------------------------
# The loss, looked at closely
# --------------------------------------------------------------------------------------------------------


def kd_loss_conventions(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> pd.DataFrame:
    """The same logits under four KD-loss conventions found in widely used code, as a table.

    * ``batchmean KL x T^2``: :func:`~kdbook_utils.methods.hinton.kd_loss` (RepDistiller, mdistiller,
      torchdistill with alpha > 0);
    * ``per-element mean KL x T^2``: ``kl_div(..., reduction="mean")`` averages over batch *and* classes,
      so it is the first divided by the number of classes;
    * ``KL without T^2``: batchmean KL alone (torchdistill with alpha = 0 or None; some TF code);
    * ``soft cross-entropy x T^2``: the paper's form, the first plus ``T^2`` times the teacher's entropy.
    """
    check_logits(student_logits, teacher_logits)
    with torch.no_grad():
        log_q = F.log_softmax(student_logits / temperature, dim=1)
        log_p = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True).item()
        per_element = F.kl_div(log_q, log_p, reduction="none", log_target=True).mean().item()
        soft_ce = soft_cross_entropy(student_logits, teacher_logits, temperature).item()
    squared = temperature**2
    classes = student_logits.shape[1]
    rows = [
        ("batchmean KL x T^2", "T^2/B sum_b sum_c p log(p/q)", "RepDistiller, mdistiller, torchdistill",
         kl * squared, "the reference"),
        ("per-element mean KL x T^2", "T^2/(B C) sum_b sum_c p log(p/q)", "kl_div(reduction='mean')",
         per_element * squared, f"x 1/C = 1/{classes}: a smaller weight on the KD term"),
        ("KL without T^2", "1/B sum_b sum_c p log(p/q)", "torchdistill with alpha = 0; some TF code",
         kl, f"x 1/T^2 = 1/{squared:g}: soft gradients shrink as T grows"),
        ("soft cross-entropy x T^2", "-T^2/B sum_b sum_c p log q", "Hinton et al. (as written)",
         soft_ce * squared, "+ T^2 H(p): a constant, the gradient is the same"),
    ]  # fmt: skip
    return pd.DataFrame(
        rows, columns=["convention", "formula", "found in", "value", "relative to the reference"]
    )


WHICH_LOSS_EXAMPLE: dict[str, object] = {
    "temperature": 4.0,
    # A teacher sure of "7" that keeps some probability on "9" and "1" (its dark knowledge) ...
    "teacher_logits": [-0.98, 1.96, -0.49, 0.49, 0.98, -0.78, -1.47, 5.87, 0.29, 2.45],
    # ... and an early student that still thinks "9", then "3".
    "student_logits": [2.33, 2.03, -1.34, 6.30, -2.33, 2.20, -2.36, 1.06, 0.81, 8.44],
}
"""One image's logits (10 classes) to compare the four conventions of :func:`kd_loss_conventions` on."""


def high_temperature_table(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Iterable[float]
) -> pd.DataFrame:
    """Per temperature: the teacher's largest soft-target probability, the KL divergence alone,
    ``kd_loss`` (KL x T^2) and its high-temperature limit (``logit_matching_limit``)."""
    # float64: at T = 10^4 the KL divergence is ~1e-7, below float32's resolution of the log-ratios.
    student_logits, teacher_logits = student_logits.double(), teacher_logits.double()
    limit = logit_matching_limit(student_logits, teacher_logits).item()
    rows = []
    with torch.no_grad():
        for temperature in temperatures:
            loss = kd_loss(student_logits, teacher_logits, temperature).item()
            largest = soft_targets(teacher_logits, temperature).max(dim=1).values.mean().item()
            rows.append({"T": float(temperature), "teacher max prob": largest,
                         "uniform 1/C": 1 / teacher_logits.shape[1], "KL": loss / temperature**2,
                         "KL x T^2 (kd_loss)": loss, "logit-matching limit": limit})  # fmt: skip
    return pd.DataFrame(rows)


def kd_gradient_norms(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Iterable[float]
) -> pd.DataFrame:
    """Per temperature, the norm of the soft term's gradient on the student's logits: d KL / dz (falls like
    ``1 / T^2``) and d (T^2 KL) / dz (levels off, so the soft term keeps its weight whatever ``T`` is)."""
    rows = []
    for temperature in temperatures:
        logits = student_logits.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(kd_loss(logits, teacher_logits.detach(), temperature), logits)
        norm = gradient.norm().item()
        rows.append(
            {"T": float(temperature), "grad norm, KL": norm / temperature**2, "grad norm, KL x T^2": norm}
        )
    return pd.DataFrame(rows)


def plot_gradient_norms(norms: pd.DataFrame) -> Figure:
    """The two columns of :func:`kd_gradient_norms` against ``T`` on log-log axes."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6), layout="constrained", dpi=DPI)
    ax.loglog(norms["T"], norms["grad norm, KL"], "o-", label="KL alone: falls like 1/T²")
    ax.loglog(norms["T"], norms["grad norm, KL x T^2"], "s-", label="KL × T²: levels off")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("gradient norm on the student's logits")
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title("Why the soft term is multiplied by T²")
    return fig


# --------------------------------------------------------------------------------------------------------
# Soft targets
# --------------------------------------------------------------------------------------------------------


def plot_soft_targets(
    teacher_logits: Tensor,
    images: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    temperatures: Sequence[float] = (1, 2, 4, 8),
    *,
    log_scale: bool = False,
) -> Figure:
    """One row per image: the image, then the teacher's soft targets at each temperature as grouped bars.

    ``images`` are uint8 ``(N, C, H, W)`` as stored in an ``ImageDataset``; ``teacher_logits`` ``(N, classes)``.
    """
    count = teacher_logits.shape[0]
    if images.shape[0] != count or labels.shape[0] != count:
        raise ValueError(
            f"Got {count} rows of logits, {images.shape[0]} images and {labels.shape[0]} labels."
        )
    if teacher_logits.shape[1] != len(classes):
        raise ValueError(f"Got {len(classes)} class names for {teacher_logits.shape[1]} classes.")
    fig, axes = plt.subplots(count, 2, figsize=(9.0, 2.1 * count + 0.6), gridspec_kw={"width_ratios": [1, 6]},
                             squeeze=False, layout="constrained", dpi=DPI)  # fmt: skip
    positions = np.arange(len(classes))
    width = 0.8 / len(temperatures)
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, len(temperatures)))
    for row in range(count):
        picture = images[row].permute(1, 2, 0).cpu().numpy()
        axes[row, 0].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(f"true: {classes[int(labels[row])]}", fontsize="small")
        bars = axes[row, 1]
        for index, temperature in enumerate(temperatures):
            probabilities = soft_targets(teacher_logits[row].float(), float(temperature)).cpu().numpy()
            bars.bar(positions + (index - (len(temperatures) - 1) / 2) * width, probabilities, width,
                     color=colours[index], label=f"T = {temperature:g}")  # fmt: skip
        bars.set_xticks(positions, [str(name) for name in classes], fontsize="small")
        bars.set_ylabel("probability")
        if row == count - 1:
            bars.set_xlabel("class")
        if log_scale:
            bars.set_yscale("log")
            bars.set_ylim(1e-6, 1.0)
        else:
            bars.set_ylim(0, 1.0)
    handles, names = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper right", ncols=len(temperatures), fontsize="small")
    fig.suptitle("The teacher's soft targets", x=0.02, ha="left")
    return fig


def dark_knowledge_table(
    teacher_logits: Tensor, labels: Tensor, classes: Sequence[str], temperature: float = 4.0
) -> pd.DataFrame:
    """For each true class, the wrong class the teacher finds most similar (largest mean soft-target
    probability over that class's images) and that probability, in percent, at T = 1 and ``temperature``."""
    rows = []
    for label, name in enumerate(classes):
        members = labels == label
        if not members.any():
            continue
        cold = soft_targets(teacher_logits[members].float(), 1.0).mean(dim=0)
        warm = soft_targets(teacher_logits[members].float(), temperature).mean(dim=0)
        ranking = warm.clone()
        ranking[label] = -1.0
        nearest = int(ranking.argmax())
        rows.append({
            "class": str(name), "most similar wrong class": str(classes[nearest]),
            "its probability at T = 1 (%)": 100 * cold[nearest].item(),
            f"its probability at T = {temperature:g} (%)": 100 * warm[nearest].item(),
            f"true class at T = {temperature:g} (%)": 100 * warm[label].item(),
        })  # fmt: skip
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------


def plot_sweep(grid: pd.DataFrame, alone: float | None = None) -> Figure:
    """Validation accuracy (percent) over temperature (columns) and alpha (rows), each cell labelled."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8), layout="constrained", dpi=DPI)
    image = ax.imshow(grid.to_numpy(float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{t:g}" for t in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{a:g}" for a in grid.index])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("alpha (weight of the labels)")
    for row in range(grid.shape[0]):
        for column in range(grid.shape[1]):
            ax.text(column, row, f"{grid.iat[row, column]:.1f}", ha="center", va="center", fontsize="small",
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})  # fmt: skip
    fig.colorbar(image, ax=ax, label="validation accuracy (%)")
    title = "Student + KD, validation accuracy"
    ax.set_title(title + (f" (student alone: {alone:.1f} %)" if alone is not None else ""), fontsize="medium")
    return fig


def plot_student_sizes(summary: pd.DataFrame, teacher_accuracy: float, teacher_name: str) -> Figure:
    """Accuracy against student size, with and without KD. ``summary`` has columns ``student``,
    ``parameters``, ``kd`` (bool), ``accuracy`` and ``failed``; failed runs are drawn as crosses."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained", dpi=DPI)
    for kd, label, marker in ((False, "student alone", "o"), (True, "student + KD", "s")):
        rows = summary[summary["kd"] == kd].sort_values("parameters")
        ok = rows[~rows["failed"].astype(bool)]
        ax.plot(ok["parameters"], ok["accuracy"], marker=marker, label=label)
        bad = rows[rows["failed"].astype(bool)]
        if len(bad):
            ax.scatter(bad["parameters"], bad["accuracy"], marker="x", s=70, color="crimson", zorder=3,
                       label="failed run (not interpreted)" if kd else None)  # fmt: skip
    for student, rows in summary.groupby("student", sort=False):
        top = rows["accuracy"].max()
        ax.annotate(student, (rows["parameters"].iloc[0], top), fontsize="x-small", textcoords="offset points",
                    xytext=(-10, 8))  # fmt: skip
    ax.axhline(teacher_accuracy, color="grey", linestyle="--", label=f"teacher ({teacher_name})")
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("student parameters (log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("Accuracy against student size, one seed", fontsize="medium")
    return fig
