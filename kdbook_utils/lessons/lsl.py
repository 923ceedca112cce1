"""Lesson 2 (LSL): its settings per preset, the paper's tables (as the paper's) and the lesson's figures."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from kdbook_utils.data import DataSplits, ImageDataset, TensorLoader
from kdbook_utils.experiments import (
    StudentRun,
    TrainedModel,
    best_on_validation,
    cached_teacher,
    train_student,
)
from kdbook_utils.features import layer_table
from kdbook_utils.lessons import LessonRunner, Stage
from kdbook_utils.methods.crosslayer import CrossLayerDistiller
from kdbook_utils.methods.hinton import HintonKD
from kdbook_utils.methods.lsl import (
    PAPER_BINDINGS,
    ASLDistiller,
    Binding,
    LayerGrams,
    layer_grams,
    lsp_table,
    select_layers,
)
from kdbook_utils.models import create_model
from kdbook_utils.plots import DPI, heatmap_grid
from kdbook_utils.presets import Preset
from kdbook_utils.train import DeviceLike


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
                     teacher_epochs=15, student_images=1000, epochs=20, batch_size=32, lr=0.02,
                     projection_dim=512, reduction="mean", alphas=(0.1, 0.3, 1.0), seeds=(0, 1, 2)),
    "paper": LSLLesson(teacher="alexnet_lsl_teacher", student="alexnet_lsl_student", teacher_epochs=100,
                       student_images=None, epochs=100, batch_size=32, lr=0.02, projection_dim=2048,
                       reduction="sum", alphas=(1.0,), seeds=(0, 1, 2)),
    "smoke": LSLLesson(teacher="alexnet_lsl_teacher_eighth", student="alexnet_lsl_student_eighth",
                       teacher_epochs=1, student_images=60, epochs=1, batch_size=16, lr=0.01,
                       projection_dim=32, reduction="mean", alphas=(0.3,), seeds=(0, 1)),
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
        (
            "8",
            "conv4->conv2 + conv5->conv3 + fc1->fc1",
            "not given / 41.0",
            "not given / 48.0",
            "not given / 87.2",
        ),
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
    teacher: LayerGrams,
    student: LayerGrams,
    class_names: Sequence[str] | None = None,
    panel_size: float = 3.2,
) -> Figure:
    """The LSP matrices of one binding: inter-class Grams (top, class names on the axes) and inter-layer
    Grams (bottom) of the teacher layer (left) and the student layer (right), on one [0, 1] colour scale."""
    fig, axes = plt.subplots(
        2, 2, figsize=(2 * panel_size + 1.6, 2 * panel_size + 1.0), layout="constrained", dpi=DPI
    )
    image = None
    for column, (role, grams) in enumerate((("teacher", teacher), ("student", student))):
        top, bottom = axes[0, column], axes[1, column]
        image = top.imshow(
            grams.inter_class.cpu().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
        )
        top.set_title(
            f"{role} {grams.layer}: inter-class H\nH_class = {grams.h_class:.3f}", fontsize="medium"
        )
        if class_names is not None:
            ticks = range(len(class_names))
            long_names = max(len(str(name)) for name in class_names) > 3
            top.set_xticks(ticks, [str(name) for name in class_names], rotation=90 if long_names else 0)
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
    fig.suptitle(
        f"LSP = {teacher.lsp:.3f} (teacher {teacher.layer}), {student.lsp:.3f} (student {student.layer})"
    )
    return fig


# --------------------------------------------------------------------------------------------------------
# What the lesson runs
# --------------------------------------------------------------------------------------------------------

ALONE = "student alone"
HINTON = "Hinton KD"
FSP = "FSP"
LSL = "LSL"

TABLE4 = [(("conv2", "conv3"),), (("conv3", "conv3"),), (("conv4", "conv3"),), (("conv5", "conv3"),)]
TABLE5 = [(("conv4", "conv3"), ("conv5", "fc1")), (("conv5", "conv3"), ("fc1", "fc1"))]
TABLE6 = [(("conv5", "conv3"), ("fc1", "fc1"), ("fc2", "fc2")), PAPER_BINDINGS]
"""Bindings after the paper's Tables 4-6 and 8 (teacher layer, student layer)."""


def binding_label(bindings: Sequence[Binding]) -> str:
    return " + ".join(f"{t}->{s}" for t, s in bindings)


LSP_IMAGES = 10_000
"""LSP scores a network on at most this many of the teacher's training images (a stratified subset)."""

LSP_BINDINGS = "LSL (LSP's bindings)"
"""The comparison's row for LSL with the bindings LSP itself selects on this run's networks."""


@dataclass
class LSLRunner(LessonRunner):
    """What lesson 2 runs, written once for the notebook, the results recorder and the command line.

    A job is ``{"method": name}`` with ``name`` one of ``ALONE``, ``HINTON``, ``FSP``, ``LSL``; an LSL job
    also takes ``"bindings"`` (``[[teacher layer, student layer], ...]``, default the paper's Table 8) and
    ``"alpha"`` (the alignment weight, default the settings' first).
    """

    STAGES: ClassVar[dict[str, Stage]] = {
        "sweep": Stage("LSL with each alignment weight alpha of the settings, on the first seed", (),
                       lambda runner: runner.choose_alpha()[1]),
        "final": Stage("student alone, Hinton KD, FSP, LSL with the paper's bindings and LSL with the bindings "
                       "LSP selects (at the sweep's best alpha), over the seeds",
                       ("sweep",), lambda runner: runner.comparison(runner.choose_alpha()[0]), split="test"),
    }  # fmt: skip
    SETTINGS: ClassVar[Mapping[str, LSLLesson]] = SETTINGS
    lesson: ClassVar[str] = "lsl"

    full_train: ImageDataset  # the teacher's training split (LSP scores run over it)
    teacher: TrainedModel

    def __post_init__(self) -> None:
        super().__post_init__()
        self._lsp_grams: tuple[dict[str, LayerGrams], dict[str, LayerGrams]] | None = None

    @classmethod
    def prepare(
        cls,
        preset: Preset,
        splits: DataSplits,
        *,
        device: DeviceLike = None,
        progress: bool = True,
        settings: LSLLesson | None = None,
    ) -> LSLRunner:
        """Load the lesson's teacher (shipped, cached, or trained where the preset allows); cut the students'
        images from the training split."""
        settings = cls.settings_for(preset, settings)
        device, precision = cls.runtime(preset, device)
        teacher = cached_teacher(settings.teacher, splits, epochs=settings.teacher_epochs, lr=preset.lr,
                                 batch_size=preset.batch_size, device=device, precision=precision,
                                 may_train=preset.train_teachers, progress=progress)  # fmt: skip
        train = splits.train
        if settings.student_images is not None and settings.student_images < len(train):
            train = train.subset(settings.student_images, seed=0)
        return cls(preset, settings, DataSplits(train, splits.val, splits.test), device, precision, progress,
                   splits.train, teacher)  # fmt: skip

    def teacher_models(self) -> dict[str, TrainedModel]:
        return {"teacher": self.teacher}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.splits.train.image_shape

    def build(self) -> nn.Module:
        return create_model(
            self.settings.student, self.splits.train.num_classes, in_channels=self.input_shape[0]
        )

    def complete(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        name = spec.get("method")
        if name not in (ALONE, HINTON, FSP, LSL):
            raise ValueError(
                f"Unknown method {name!r}; choose one of {ALONE!r}, {HINTON!r}, {FSP!r}, {LSL!r}."
            )
        if name != LSL:
            return {"method": name}
        bindings = spec.get("bindings", PAPER_BINDINGS)
        alpha = spec.get("alpha")
        return {"method": LSL, "bindings": [[str(t), str(s)] for t, s in bindings],
                "alpha": float(self.settings.alphas[0] if alpha is None else alpha)}  # fmt: skip

    def method(self, spec: Mapping[str, Any]) -> Callable[[nn.Module], nn.Module] | None:
        """The method that trains a fresh student for a complete job ``spec``."""
        s, teacher = self.settings, self.teacher.model
        if spec["method"] == ALONE:
            return None
        if spec["method"] == HINTON:
            return lambda student: HintonKD(student, teacher)
        if spec["method"] == FSP:  # FSP's two stages: a Gram phase (a quarter of the epochs), then the task
            return lambda student: CrossLayerDistiller(
                student, teacher, gram_epochs=max(1, s.epochs // 4), k=1, use_kl=False,
                student_points=["conv2", "conv3"], teacher_points=["conv4", "conv5"])  # fmt: skip
        bindings = [tuple(pair) for pair in spec["bindings"]]
        return lambda student: ASLDistiller(student, teacher, bindings, input_shape=self.input_shape,
                                            projection_dim=s.projection_dim, reduction=s.reduction,
                                            alpha=spec["alpha"])  # fmt: skip

    def train_job(self, spec: dict[str, Any], seed: int) -> StudentRun:
        s = self.settings
        # FSP: as many epochs in all (a Gram phase, then at least one task epoch)
        epochs = max(1, s.epochs - max(1, s.epochs // 4)) if spec["method"] == FSP else s.epochs
        return train_student(self.build, self.method(spec), self.splits, seed=seed, epochs=epochs, lr=s.lr,
                             batch_size=s.batch_size, cache=self.cache, device=self.device,
                             precision=self.precision)  # fmt: skip

    def choose_alpha(self) -> tuple[float, pd.DataFrame]:
        """The alignment weight with the best mean validation accuracy (the paper's bindings, the first seed)."""
        jobs = {f"LSL (alpha={a:g})": {"method": LSL, "alpha": a} for a in self.settings.alphas}
        runs = self.table(jobs, self.settings.seeds[:1])
        best = best_on_validation(runs, "method", "alignment weight")
        return float(jobs[best]["alpha"]), runs

    def lsp_grams(self) -> tuple[dict[str, LayerGrams], dict[str, LayerGrams]]:
        """Both LSP matrices of every scored layer of the teacher and of the student trained alone (first
        seed), over the teacher's training images in order, without augmentation (at most
        :data:`LSP_IMAGES` of them); computed once."""
        if self._lsp_grams is None:
            data = self.full_train
            if len(data) > LSP_IMAGES:
                data = data.subset(LSP_IMAGES, seed=0)
            loader = TensorLoader(data, 256, train=False, device=self.device)
            trained_student = self.job({"method": ALONE}, self.settings.seeds[0]).model
            self._lsp_grams = (layer_grams(self.teacher.model, loader), layer_grams(trained_student, loader))
        return self._lsp_grams

    def lsp_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """LSP's tables (the paper's Table 3) of the teacher and of the student (:meth:`lsp_grams`)."""
        teacher_grams, student_grams = self.lsp_grams()
        return lsp_table(teacher_grams), lsp_table(student_grams)

    def lsp_bindings(self, count: int = 3) -> list[Binding]:
        """The ``count`` bindings LSP selects: the lowest-scoring layers of each network, in forward order."""
        teacher_table, student_table = self.lsp_tables()
        return list(zip(select_layers(teacher_table, count), select_layers(student_table, count)))

    def bindings(self, tables: Sequence[Sequence[Binding]], alpha: float) -> pd.DataFrame:
        """LSL with each binding of the paper's tables, one seed (validation accuracy of the student)."""
        jobs = {binding_label(b): {"method": LSL, "bindings": b, "alpha": alpha} for b in tables}
        return self.table(jobs, self.settings.seeds[:1])

    def comparison(self, alpha: float) -> pd.DataFrame:
        """The paper's Table 8, and LSL with the bindings LSP selects on these networks, over the seeds."""
        jobs: dict[str, dict[str, Any]] = {name: {"method": name} for name in (ALONE, HINTON, FSP)}
        jobs[LSL] = {"method": LSL, "alpha": alpha}
        jobs[LSP_BINDINGS] = {"method": LSL, "alpha": alpha, "bindings": self.lsp_bindings()}
        return self.table(jobs, self.settings.seeds)


def lsp_with_paper(table: pd.DataFrame, role: str, count: int = 3) -> pd.DataFrame:
    """Our LSP table beside the paper's Table 3 (its scale, its rank), with LSP's picks marked."""
    chosen = set(table["LSP"].nsmallest(count).index)
    shown = table.drop(columns=["output_shape", "previous"]).copy()
    shown["paper's LSP (PPMI)"] = [PAPER_TABLE3[role].get(layer) for layer in table.index]
    shown["paper's rank"] = shown["paper's LSP (PPMI)"].rank().astype("Int64")
    shown["LSP binds"] = ["yes" if layer in chosen else "" for layer in table.index]
    return shown


def plot_lsp_scores(teacher_table: pd.DataFrame, student_table: pd.DataFrame) -> Figure:
    """Each layer's LSP score as stacked bars (G_diversity + H_class), teacher and student side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), layout="constrained", dpi=DPI, sharey=True,
                             gridspec_kw={"width_ratios": [len(teacher_table), len(student_table)]})  # fmt: skip
    for ax, (role, table) in zip(axes, (("teacher", teacher_table), ("student", student_table))):
        positions = range(len(table))
        ax.bar(positions, table["G_diversity"], color="#4c72b0", label="G_diversity (Eq. 5)")
        ax.bar(
            positions, table["H_class"], bottom=table["G_diversity"], color="#dd8452", label="H_class (Eq. 6)"
        )
        lowest = set(table["LSP"].nsmallest(3).index)
        ax.set_xticks(list(positions), [f"{layer}\n(binds)" if layer in lowest else layer for layer in table.index],
                      fontsize="small")  # fmt: skip
        ax.set_title(f"{role}: LSP = G_diversity + H_class", fontsize="medium")
    axes[0].set_ylabel("LSP score (lower binds first)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    return fig


def plot_inter_class(
    grams: dict[str, LayerGrams], layers: Sequence[str], classes: Sequence[str], role: str
) -> Figure:
    """The inter-class Gram matrices H of a few layers of one network, on one [0, 1] colour scale."""
    return heatmap_grid([grams[layer].inter_class for layer in layers],
                        [f"{role} {layer}\nH_class = {grams[layer].h_class:.3f}" for layer in layers],
                        row_labels=list(classes), col_labels=list(classes), ncols=len(layers), vmin=0, vmax=1,
                        xlabel="class", ylabel="class", colorbar_label="cosine of the class means",
                        panel_size=2.6)  # fmt: skip


def plot_lsp_vs_accuracy(tried: pd.DataFrame, alone: float) -> Figure:
    """Validation accuracy of each binding (one seed) against its LSP score; colours give the number of
    bound pairs (a confound: the lowest scores belong to the FC layers, bound in the longer lists)."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0), layout="constrained", dpi=DPI)
    for pairs, group in tried.groupby("pairs"):
        ax.scatter(group["LSP score"], group["accuracy"], label=f"{pairs} bound pair(s)", s=40)
    for number, (score, accuracy) in enumerate(zip(tried["LSP score"], tried["accuracy"]), start=1):
        ax.annotate(str(number), (score, accuracy), fontsize="small", xytext=(4, 2 + 7 * (number % 2)),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(alone, color="grey", linestyle="--", label="student alone (same seed)")
    ax.set_xlabel("binding's LSP score (mean teacher LSP + mean student LSP)")
    ax.set_ylabel("student's validation accuracy (%)")
    ax.legend(loc="best", fontsize="small")
    ax.set_title("Lower LSP, better student? One seed per binding", fontsize="medium")
    return fig
