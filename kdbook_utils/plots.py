"""Figures for the lessons: training curves, heatmap grids, image grids and result bars.

Every function returns a :class:`matplotlib.figure.Figure` and never calls ``plt.show()``, so a figure can
be saved (``fig.savefig("curves.png")``) or embedded anywhere. In a notebook, end the line with ``;`` or
assign the figure (``fig = plot_history(history)``): Jupyter's inline backend shows every open figure
once, and a figure left as the cell's last value would be shown a second time.

Tensors are accepted wherever arrays are (they are detached and moved to the CPU first).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kdbook_utils.errors import Seen, describe, must_be

__all__ = ["heatmap_grid", "image_grid", "plot_history", "plot_paired_runs", "results_bar", "summarize_runs"]

#: Tick labels shown at most on one heatmap axis before they are thinned to every k-th label.
MAX_TICK_LABELS = 15

_CORRECT_COLOUR = "#1a7f37"
_WRONG_COLOUR = "#cf222e"


#: Resolution of every figure: crisp in a notebook and in the rendered book, and small files.
DPI = 100
#: The widest figure, in inches: a wider one is shrunk below legibility at the book's column width.
MAX_FIGURE_WIDTH = 10.0


@contextmanager
def _style(style: str = "whitegrid") -> Iterator[None]:
    """Seaborn's look for the axes made inside; only seaborn's style keys are restored afterwards.

    (Not ``plt.rc_context``: it restores *every* rcParam, including the ``interactive`` flag that
    Jupyter's inline backend switches on when the first figure of a session is created, and losing
    that flag stops the notebook from showing any later figure.)
    """
    with sns.axes_style(style):
        yield


def _to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of an array-like or a tensor (detached, on the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


# --------------------------------------------------------------------------------------------- history


def _history_stems(history: pd.DataFrame) -> list[str]:
    """Metric names a history can plot: ``loss`` for ``train_loss``/``val_loss``, plain columns too."""
    stems: list[str] = []
    for column in history.columns:
        stem = column.split("_", 1)[1] if column.startswith(("train_", "val_")) else column
        if stem not in stems and column not in ("epoch", "seconds"):
            stems.append(stem)
    return stems


def _is_accuracy(metric: str) -> bool:
    return metric in ("acc", "accuracy") or metric.endswith(("_acc", "_accuracy"))


def plot_history(
    histories: pd.DataFrame | Mapping[str, pd.DataFrame],
    metrics: Sequence[str] = ("loss", "acc"),
    *,
    title: str | None = None,
    height: float = 3.0,
) -> Figure:
    """Training curves: one panel per metric, train (dashed) and validation (solid) against the epoch.

    ``histories`` is one history from :func:`kdbook_utils.train.fit` or a ``{label: history}`` dict, e.g.
    ``{"student alone": h1, "student + KD": h2}``: each run gets one colour. A metric ``m`` plots the
    columns ``train_m`` and ``val_m`` (``"loss"``, ``"acc"``, or a loss term such as ``"kd"``); a plain
    column such as ``"lr"`` is plotted as it is. Accuracies are percentages (as ``fit`` logs them) on a
    0-100 axis; a loss that spans more than a factor of 30 is drawn on a log axis, so one early spike does
    not flatten the rest of the curve.
    """
    runs = {"": histories} if isinstance(histories, pd.DataFrame) else dict(histories)
    if not runs:
        raise ValueError(
            "plot_history needs at least one history (a DataFrame or a {label: DataFrame} dict)."
        )
    if isinstance(metrics, str):
        metrics = (metrics,)
    for label, history in runs.items():
        if not isinstance(history, pd.DataFrame):
            raise TypeError(f"History {label!r} is a {type(history).__name__}; expected a pandas DataFrame.")
        for metric in metrics:
            if not any(column in history.columns for column in (f"train_{metric}", f"val_{metric}", metric)):
                raise ValueError(
                    f"History {label or '(unnamed)'} has no column for metric {metric!r}. "
                    f"Metrics it can plot: {', '.join(_history_stems(history))}."
                )

    palette = sns.color_palette("colorblind", n_colors=max(len(runs), 1))
    with _style():
        fig, axes = plt.subplots(
            1,
            len(metrics),
            figsize=(min(3.7 * len(metrics), MAX_FIGURE_WIDTH), height),
            layout="constrained",
            squeeze=False,
            dpi=DPI,
        )
    for ax, metric in zip(axes[0], metrics):
        plotted: list[float] = []
        for colour, (label, history) in zip(palette, runs.items()):
            epochs = history["epoch"] if "epoch" in history.columns else pd.RangeIndex(1, len(history) + 1)
            curves = [(f"train_{metric}", "train", "--"), (f"val_{metric}", "val", "-")]
            if f"train_{metric}" not in history.columns and f"val_{metric}" not in history.columns:
                curves = [(metric, "", "-")]
            for column, split, linestyle in curves:
                if column not in history.columns or history[column].isna().all():
                    continue
                values = history[column].astype(float)
                plotted += [value for value in values if np.isfinite(value)]
                name = " · ".join(part for part in (label, split) if part)
                ax.plot(
                    epochs, values, linestyle=linestyle, marker="o", markersize=3, color=colour, label=name
                )
        ax.set_xlabel("epoch")
        names = {"acc": "accuracy", "loss": "loss", "lr": "learning rate"}
        ax.set_ylabel("accuracy (%)" if _is_accuracy(metric) else names.get(metric, f"{metric} loss"))
        ax.set_title(names.get(metric, metric))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if _is_accuracy(metric):
            ax.set_ylim(0, 100)
        elif plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 30:
            ax.set_yscale("log")
        if metric == "lr" and ax.get_yscale() == "linear":  # a log axis already writes powers of ten
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


# -------------------------------------------------------------------------------------------- heatmaps


def _as_matrix_list(matrices: Any) -> tuple[list[np.ndarray], int | None]:
    """Flatten the accepted inputs to a list of 2-D arrays (and the column count a 4-D input implies)."""
    if isinstance(matrices, Mapping):
        raise TypeError(
            "heatmap_grid takes a sequence of matrices; pass titles=list(d) and list(d.values())."
        )
    implied_columns = None
    if isinstance(matrices, np.ndarray) or hasattr(matrices, "detach"):
        array = _to_numpy(matrices)
        if array.ndim == 2:
            return [array], None
        if array.ndim == 3:
            return list(array), None
        if array.ndim == 4:
            implied_columns = array.shape[1]
            return [matrix for row in array for matrix in row], implied_columns
        raise ValueError(
            must_be(
                "The matrices of heatmap_grid",
                "an array shaped (H, W), (N, H, W) or (rows, cols, H, W)",
                Seen(f"shape {tuple(array.shape)}"),
                "Average over the batch or pick one sample first.",
            )
        )
    flat: list[np.ndarray] = []
    for index, matrix in enumerate(matrices):
        array = _to_numpy(matrix)
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]  # a batch of one, e.g. a Gram matrix kept as (1, C_a, C_b)
        if array.ndim != 2:
            raise ValueError(
                must_be(
                    f"Matrix {index}",
                    "2-D (H, W)",
                    Seen(f"shape {tuple(array.shape)}"),
                    "Average over the batch or pick one sample first.",
                )
            )
        flat.append(array.astype(float, copy=False))
    return flat, implied_columns


def _tick_positions(count: int, max_labels: int = MAX_TICK_LABELS) -> np.ndarray:
    """Every label when there are few, otherwise every k-th so that at most ``max_labels`` remain."""
    step = max(1, math.ceil(count / max_labels))
    return np.arange(0, count, step)


def _check_labels(labels: Sequence[str] | None, size: int, which: str, index: int) -> None:
    if labels is not None and len(labels) != size:
        kind = which.split("_")[0]
        raise ValueError(
            must_be(
                which,
                f"one name per {kind} of matrix {index} ({size} {kind}s)",
                Seen(f"{len(labels)} names"),
                f"Pass {size} names (e.g. the data set's classes), or leave {which} out.",
            )
        )


def _check_finite_limit(name: str, value: float | None) -> None:
    if value is not None and not np.isfinite(value):
        raise ValueError(must_be(name, "a finite number or None", value, "Leave it out to fit the data."))


def heatmap_grid(
    matrices: Any,
    titles: Sequence[str] | None = None,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    ncols: int | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    center: float | None = None,
    shared_scale: bool = True,
    colorbar_label: str | None = None,
    suptitle: str | None = None,
    panel_size: float = 2.6,
) -> Figure:
    """A grid of heatmaps (Gram / FSP matrices, confusion matrices) with one shared colour bar.

    ``matrices`` is a sequence of 2-D arrays or tensors (shapes may differ), an ``(N, H, W)`` array, or a
    ``(rows, cols, H, W)`` array laid out as given. With ``shared_scale`` (the default) every panel uses
    the same colour normalisation, so equal colours mean equal values across panels, and one colour bar
    serves the grid; otherwise each panel gets its own bar. ``center`` makes the scale symmetric about a
    value (use it with a diverging ``cmap`` such as ``"RdBu_r"`` for differences). ``row_labels`` and
    ``col_labels`` (e.g. class names) label the rows and columns of every panel and are thinned to every
    k-th label when there are more than :data:`MAX_TICK_LABELS`.
    """
    flat, implied_columns = _as_matrix_list(matrices)
    if not flat:
        raise ValueError(
            must_be("matrices", "at least one matrix", matrices, "Pass e.g. [gram_teacher, gram_student].")
        )
    count = len(flat)
    if titles is not None and len(titles) != count:
        raise ValueError(
            must_be(
                "titles",
                f"one title per matrix ({count})",
                Seen(f"{len(titles)} title{'s' if len(titles) != 1 else ''}"),
                "Pass one title for each matrix, or leave titles out.",
            )
        )
    for index, matrix in enumerate(flat):
        _check_labels(row_labels, matrix.shape[0], "row_labels", index)
        _check_labels(col_labels, matrix.shape[1], "col_labels", index)
        infinite = np.isinf(matrix)
        if infinite.any():
            row, column = np.argwhere(infinite)[0]
            raise ValueError(
                must_be(
                    f"Matrix {index}",
                    "finite or NaN (NaN cells are left blank), since an infinity has no colour",
                    Seen(
                        f"{matrix[row, column]} at [{row}, {column}] ({int(infinite.sum())} infinite in all)"
                    ),
                    "Replace them, e.g. torch.nan_to_num(m, posinf=float('nan')), or clip the values.",
                )
            )
    for name, limit in (("vmin", vmin), ("vmax", vmax), ("center", center)):
        _check_finite_limit(name, limit)
    if vmin is not None and vmax is not None and vmin >= vmax:
        raise ValueError(
            must_be("vmin", f"smaller than vmax ({vmax})", vmin, "Swap them or widen the range.")
        )
    columns = ncols or implied_columns or min(count, 4)
    if columns < 1:
        raise ValueError(must_be("ncols", "at least 1", ncols, "Leave it out to fit up to 4 panels per row."))
    rows = math.ceil(count / columns)

    def norm_for(values: list[np.ndarray]) -> colors.Normalize:
        finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values] or [np.zeros(1)])
        low = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        high = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        if center is not None:
            half_range = max(abs(high - center), abs(center - low)) or 1.0
            low, high = center - half_range, center + half_range
        if high <= low:
            high = low + 1.0  # a constant matrix: any non-empty range shows it as one colour
        return colors.Normalize(vmin=low, vmax=high)

    shared_norm = norm_for(flat) if shared_scale else None
    same_shape = all(matrix.shape == flat[0].shape for matrix in flat)
    # Room for what surrounds the panels: rotated class names below, titles above, colour bars beside.
    label_room = 0.9 if col_labels is not None and max(len(str(c)) for c in col_labels) > 3 else 0.35
    row_height = panel_size + 0.3 * (titles is not None) + (label_room if not same_shape else 0.0)
    height = row_height * rows + (label_room if same_shape else 0.0) + 0.4 * bool(suptitle) + 0.2
    width = (
        panel_size * columns
        + (0.9 if row_labels is not None else 0.5)
        + (1.0 if shared_scale else 0.9 * columns)
    )
    with _style("white"):
        fig, axes = plt.subplots(
            rows,
            columns,
            figsize=(width, height),
            layout="constrained",
            dpi=DPI,
            squeeze=False,
        )
    used_axes: list[Axes] = []
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.set_axis_off()
            continue
        matrix = flat[index]
        norm = shared_norm or norm_for([matrix])
        image = ax.imshow(matrix, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_box_aspect(1)
        used_axes.append(ax)
        if titles is not None:
            ax.set_title(titles[index], fontsize="medium")
        column = index % columns
        left_column, bottom_of_column = column == 0, index + columns >= count
        if ylabel and left_column:
            ax.set_ylabel(ylabel)
        if xlabel and bottom_of_column:
            ax.set_xlabel(xlabel)
        _label_ticks(ax, matrix.shape, row_labels, col_labels)
        if same_shape:  # like sharex/sharey: name rows and columns on the outer panels only
            ax.tick_params(labelleft=left_column, labelbottom=bottom_of_column)
        if not shared_scale:
            bar = fig.colorbar(image, ax=ax, shrink=0.8)
            if colorbar_label:
                bar.set_label(colorbar_label)
    if shared_scale and image is not None:
        bar = fig.colorbar(image, ax=used_axes, shrink=0.8 if rows > 1 else 0.9, aspect=25)
        if colorbar_label:
            bar.set_label(colorbar_label)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def _label_ticks(
    ax: Axes, shape: tuple[int, ...], row_labels: Sequence[str] | None, col_labels: Sequence[str] | None
) -> None:
    """Name the rows/columns (thinned when there are many); otherwise integer index ticks."""
    if col_labels is not None:
        positions = _tick_positions(shape[1])
        long_labels = max(len(str(label)) for label in col_labels) > 3
        ax.set_xticks(positions, [str(col_labels[i]) for i in positions], rotation=90 if long_labels else 0)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    if row_labels is not None:
        positions = _tick_positions(shape[0])
        ax.set_yticks(positions, [str(row_labels[i]) for i in positions])
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.tick_params(labelsize="small", length=2)


# ---------------------------------------------------------------------------------------------- images


def _displayable(images: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] from uint8 or normalised float images in (N, C, H, W) or (N, H, W)."""
    array = _to_numpy(images)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(
            must_be(
                "images",
                "shaped (N, C, H, W) or (N, H, W)",
                Seen(f"shape {tuple(array.shape)}"),
                "For one image, add a batch dimension: images[None].",
            )
        )
    if array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # channels-last input
    if array.shape[1] not in (1, 3):
        raise ValueError(
            must_be(
                "images",
                "grey or RGB (1 or 3 channels)",
                Seen(f"shape {tuple(array.shape)}"),
                "Pick the channels to show, e.g. images[:, :3], or show feature maps with heatmap_grid.",
            )
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.argwhere(~np.isfinite(array))[0][0])
        raise ValueError(
            must_be(
                "images",
                "finite (a NaN or infinite pixel cannot be drawn)",
                Seen(f"a non-finite value in image {bad}"),
                "Check the data or the model that made them; torch.nan_to_num shows them anyway.",
            )
        )
    if array.dtype == np.uint8:
        pixels = array.astype(np.float32) / 255.0
    else:
        pixels = array.astype(np.float32)
        if (mean is None) != (std is None):
            raise ValueError("Give both mean and std to undo the normalisation, or neither.")
        if mean is not None and std is not None:
            channel_shape = (1, -1, 1, 1)
            mean_array = np.asarray(mean, dtype=np.float32).reshape(channel_shape)
            std_array = np.asarray(std, dtype=np.float32).reshape(channel_shape)
            if mean_array.shape[1] not in (1, pixels.shape[1]):
                raise ValueError(
                    f"mean/std have {mean_array.shape[1]} values for {pixels.shape[1]}-channel images."
                )
            pixels = pixels * std_array + mean_array
        elif pixels.size and (pixels.min() < 0.0 or pixels.max() > 1.0):
            # Normalised images without their statistics: stretch each image to [0, 1] so it stays visible.
            low = pixels.min(axis=(1, 2, 3), keepdims=True)
            high = pixels.max(axis=(1, 2, 3), keepdims=True)
            pixels = (pixels - low) / np.maximum(high - low, 1e-12)
    return np.clip(pixels, 0.0, 1.0).transpose(0, 2, 3, 1)


def _class_indices(name: str, values: Any) -> np.ndarray:
    """Integer class indices (a flat array) from labels or predictions; fractions and negatives refused."""
    array = _to_numpy(values).ravel()
    if array.size and (array.dtype.kind not in "iuf" or not np.all(np.isfinite(array))):
        raise TypeError(
            must_be(name, "class indices (integers)", values, "Pass integer labels, e.g. labels.long().")
        )
    if array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise ValueError(
            must_be(
                name,
                "whole numbers (class indices)",
                values,
                "Pass class indices, not scores or probabilities.",
            )
        )
    if array.size and array.min() < 0:
        raise ValueError(
            must_be(
                f"Every one of the {name}", "a class index >= 0", array.min(), "Class indices start at 0."
            )
        )
    return array.astype(int)


def image_grid(
    images: Any,
    labels: Any = None,
    classes: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    predictions: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    suptitle: str | None = None,
    panel_size: float = 1.1,
) -> Figure:
    """A grid of images titled with their class names.

    ``images`` are uint8 ``(N, C, H, W)`` (as stored in :class:`kdbook_utils.data.ImageDataset`) or float
    tensors from a loader; pass the dataset's ``mean`` and ``std`` to undo the normalisation. With
    ``predictions`` each title is the predicted class, green when it matches the label and red (with the
    true class underneath) when it does not.
    """
    pixels = _displayable(images, mean, std)
    count = len(pixels)
    if count == 0:
        raise ValueError(must_be("images", "at least one image", Seen("an empty batch"), "Pass a batch."))
    label_array = None if labels is None else _class_indices("labels", labels)
    predicted = None
    if predictions is not None:
        predicted = _to_numpy(predictions)
        if predicted.ndim == 2:  # logits or probabilities: one column per class
            if classes is not None and predicted.shape[1] != len(classes):
                raise ValueError(
                    must_be(
                        "classes",
                        f"one name per column of the predictions ({predicted.shape[1]} classes)",
                        Seen(f"{len(classes)} names"),
                        "Pass the data set's class names (e.g. dataset.classes).",
                    )
                )
            predicted = predicted.argmax(axis=1)
        else:
            predicted = _class_indices("predictions", predicted)
    for name, values in (("labels", label_array), ("predictions", predicted)):
        if values is not None and len(values) != count:
            raise ValueError(
                must_be(
                    name,
                    f"one per image ({count})",
                    Seen(f"{len(values)} {name}"),
                    f"Pass the {name} of the same images, e.g. images[:n] with {name}[:n].",
                )
            )
    if predicted is not None and label_array is None:
        raise ValueError(
            must_be(
                "labels",
                "given with predictions",
                None,
                "Predictions are coloured by comparing them with labels: pass labels too.",
            )
        )
    if classes is not None:
        for name, values in (("labels", label_array), ("predictions", predicted)):
            if values is not None and values.size and values.max() >= len(classes):
                raise ValueError(
                    must_be(
                        f"Every one of the {name}",
                        f"an index into classes (0 to {len(classes) - 1})",
                        Seen(f"{values.max()}, which has no name in the {len(classes)} classes given"),
                        "Pass every class name of the data set (e.g. dataset.classes).",
                    )
                )

    def name_of(index: int) -> str:
        return str(classes[index]) if classes is not None else str(index)

    columns = max(1, min(ncols, count))
    rows = math.ceil(count / columns)
    # Many columns make smaller panels, not a wider figure.
    panel_size = min(panel_size, MAX_FIGURE_WIDTH / columns)
    title_lines = 2 if predicted is not None else 1
    with _style("white"):
        fig, axes = plt.subplots(
            rows,
            columns,
            figsize=(panel_size * columns, (panel_size + 0.18 * title_lines) * rows),
            layout="constrained",
            dpi=DPI,
            squeeze=False,
        )
    grey = pixels.shape[-1] == 1
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= count:
            continue
        ax.imshow(
            pixels[index, ..., 0] if grey else pixels[index], cmap="gray" if grey else None, vmin=0, vmax=1
        )
        if label_array is None:
            continue
        if predicted is None:
            ax.set_title(name_of(label_array[index]), fontsize="small")
        else:
            correct = int(predicted[index]) == int(label_array[index])
            text = name_of(int(predicted[index])) + (
                "" if correct else f"\n(true: {name_of(label_array[index])})"
            )
            ax.set_title(text, fontsize="small", color=_CORRECT_COLOUR if correct else _WRONG_COLOUR)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


# --------------------------------------------------------------------------------------------- results


def summarize_runs(
    runs: pd.DataFrame, value: str = "accuracy", by: str | Sequence[str] = "method"
) -> pd.DataFrame:
    """Mean, standard deviation (over seeds, ddof=1) and run count of ``value`` per group ``by``.

    ``runs`` has one row per run, e.g. columns ``method, seed, accuracy``; groups keep their first-seen
    order so a table reads in the order the lesson ran the methods. A NaN or infinite value (a diverged
    run) is an error rather than a run silently left out of the mean.
    """
    keys = [by] if isinstance(by, str) else list(by)
    missing = [column for column in [*keys, value] if column not in runs.columns]
    if missing:
        raise ValueError(f"runs has no column(s) {missing}; its columns are {list(runs.columns)}.")
    numbers = pd.to_numeric(runs[value], errors="coerce")
    bad = runs[~np.isfinite(numbers.to_numpy(float))]
    if len(bad):
        groups = ", ".join(dict.fromkeys(str(group) for group in bad[keys[0]]))
        raise ValueError(
            must_be(
                f"Every {value}",
                "a finite number (a mean that skipped it would look fine and be wrong)",
                Seen(f"{describe(bad[value].iloc[0])} in {len(bad)} run(s) of {groups}"),
                f"Fix those runs, or drop them on purpose: runs.dropna(subset=[{value!r}]).",
            )
        )
    grouped = runs.groupby(keys, sort=False)[value]
    summary = grouped.agg(mean="mean", std="std", n="count")
    summary["std"] = summary["std"].fillna(0.0)  # a single run has no spread to show
    return summary


def results_bar(
    table: pd.DataFrame,
    value: str = "mean",
    error: str | None = "std",
    *,
    by: str | None = None,
    label: str | None = None,
    kind: str = "bar",
    ylabel: str | None = None,
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
    annotate: bool = True,
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Accuracies (or any score) as mean ± std, one bar per method.

    Two inputs work:

    * a summary, one row per method, with ``value`` and ``error`` columns (e.g. from
      :func:`summarize_runs`); bar names come from the ``label`` column or the index;
    * raw runs, one row per (method, seed): pass ``by="method"`` and ``value="accuracy"``; the mean and
      std are computed here and every run is drawn as a dot over its bar.

    ``kind="point"`` draws points with error bars on a zoomed axis, easier to read when methods differ
    by less than a point; bars always start at zero. ``reference`` draws horizontal lines, e.g.
    ``{"teacher": 93.0}``. A method with a single run gets no error bar (there is no spread to show).
    """
    if kind not in ("bar", "point"):
        raise ValueError(must_be("kind", "'bar' or 'point'", kind, "'point' zooms in on close results."))
    raw: pd.DataFrame | None = None
    if by is not None:
        raw = table
        summary = summarize_runs(table, value=value, by=by)
        names = [str(name) for name in summary.index]
        means, errors = summary["mean"].to_numpy(float), summary["std"].to_numpy(float)
        errors = np.where(summary["n"].to_numpy() > 1, errors, 0.0)
    else:
        if value not in table.columns:
            raise ValueError(
                f"table has no column {value!r} (columns: {list(table.columns)}). "
                "For one row per run, pass by='<group column>' and value='<score column>'."
            )
        if error is not None and error not in table.columns:
            raise ValueError(f"table has no error column {error!r}; pass error=None to draw no error bars.")
        names = [str(name) for name in (table[label] if label else table.index)]
        means = table[value].to_numpy(float)
        errors = table[error].to_numpy(float) if error is not None else np.zeros_like(means)
    if not len(names):
        raise ValueError(
            must_be("table", "at least one row", Seen("an empty table"), "Pass one row per method.")
        )
    for what, values in ((value, means), (error or "std", errors)):
        bad = [name for name, number in zip(names, values) if not np.isfinite(number)]
        if bad:
            raise ValueError(
                must_be(
                    f"Every {what} to draw",
                    "a finite number",
                    Seen(f"NaN or infinity for {', '.join(repr(name) for name in bad)}"),
                    "Drop those rows, or fix the runs that produced them (a diverged run has NaN loss).",
                )
            )
    if (errors < 0).any():
        raise ValueError(
            must_be(f"Every {error}", "non-negative (a spread)", errors.min(), "Pass standard deviations.")
        )
    for name, level in (reference or {}).items():
        if not np.isfinite(level):
            raise ValueError(
                must_be(f"reference {name!r}", "a finite number", level, "Leave it out or fix it.")
            )
    palette = sns.color_palette("colorblind", n_colors=len(names))
    positions = np.arange(len(names))

    with _style():
        fig, ax = plt.subplots(figsize=(max(3.5, 0.9 * len(names) + 1.5), 3.4), layout="constrained", dpi=DPI)
    if kind == "bar":
        ax.bar(positions, means, yerr=errors, color=palette, capsize=4, width=0.65, zorder=2)
    else:
        for position, mean, err, colour in zip(positions, means, errors, palette):
            ax.errorbar(position, mean, yerr=err, fmt="o", color=colour, capsize=5, markersize=7)
    if raw is not None and by is not None:
        for position, (_, group) in zip(positions, raw.groupby(by, sort=False)):
            values = group[value].to_numpy(float)
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(
                position + jitter,
                values,
                color="black",
                s=12,
                zorder=3,
                alpha=0.7,
                label="single runs" if position == 0 else None,
            )
    line_styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for (name, level), style in zip((reference or {}).items(), line_styles * 4):
        ax.axhline(level, color="dimgrey", linestyle=style, linewidth=1.2, zorder=1, label=name)
    if annotate:
        for position, mean, err in zip(positions, means, errors):
            text = f"{mean:.1f}" + (f" ± {err:.1f}" if err > 0 else "")
            if kind == "bar":
                ax.annotate(
                    text,
                    (position, (mean + err)),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize="small",
                )
            else:
                ax.annotate(
                    text,
                    (position, mean),
                    xytext=(9, 0),
                    textcoords="offset points",
                    ha="left",
                    va="center",
                    fontsize="small",
                )
    if reference or raw is not None:
        ax.legend(loc="lower right", fontsize="small", framealpha=0.9)
    long_names = max((len(name) for name in names), default=0) > 10
    ax.set_xticks(positions, names, rotation=25 if long_names else 0, ha="right" if long_names else "center")
    ax.set_ylabel(ylabel or ("accuracy (%)" if value == "mean" or _is_accuracy(value) else value))
    if ylim is not None:
        ax.set_ylim(*ylim)
    elif kind == "bar":
        ax.set_ylim(0, max(float(np.nanmax(means + errors)) * 1.12, 1e-9))
    else:
        ax.margins(y=0.25)
        ax.set_xlim(-0.5, len(names) - 0.5 + (0.45 if annotate else 0.0))
    ax.grid(axis="x", visible=False)
    if title:
        ax.set_title(title)
    return fig


def plot_paired_runs(
    runs: pd.DataFrame,
    methods: Sequence[str] | None = None,
    *,
    split: str = "test",
    output: str | None = None,
    value: str = "accuracy",
    title: str | None = None,
) -> Figure:
    """Every run as a dot, methods side by side, each seed's runs joined by a grey line: the pairing the
    comparison uses. A black bar marks each method's mean; a failed run is a red cross.

    ``runs`` is a tidy table (one row per method, seed, split and output, as ``run_seeds`` makes it);
    ``methods`` picks and orders them (default: first-seen order). ``output`` picks one output of
    multi-exit students (default ``"final"`` where there is one). The axis is zoomed to the data: read
    positions, not heights.
    """
    table = runs[runs["split"] == split] if "split" in runs.columns else runs
    if "output" in table.columns:
        wanted = output or "final"
        chosen = {
            m: (wanted if wanted in outs else outs[-1])
            for m, outs in table.groupby("method")["output"].unique().items()
        }
        table = table[[chosen[m] == o for m, o in zip(table["method"], table["output"])]]
    names = list(methods) if methods is not None else list(dict.fromkeys(table["method"]))
    missing = [name for name in names if name not in set(table["method"])]
    if missing or not names:
        raise ValueError(must_be("methods", f"names of methods in runs ({sorted(set(table['method']))})",
                                 missing or names, "Pass methods that ran on this split."))  # fmt: skip
    failed = (
        table["failed"].astype(bool) if "failed" in table.columns else pd.Series(False, index=table.index)
    )
    with _style():
        fig, ax = plt.subplots(figsize=(max(5.0, 1.7 * len(names) + 1.5), 3.6), layout="constrained", dpi=DPI)
    positions = {name: index for index, name in enumerate(names)}
    for _, seed_runs in table[table["method"].isin(names)].groupby("seed"):
        ordered = seed_runs.assign(position=seed_runs["method"].map(positions)).sort_values("position")
        ax.plot(ordered["position"], ordered[value], color="grey", alpha=0.5, linewidth=1, zorder=1)
    palette = sns.color_palette("colorblind", n_colors=len(names))
    for name, colour in zip(names, palette):
        mine = table[table["method"] == name]
        good, bad = mine[~failed[mine.index]], mine[failed[mine.index]]
        x = positions[name]
        ax.scatter([x] * len(good), good[value], color=colour, s=28, zorder=3)
        if len(bad):
            ax.scatter([x] * len(bad), bad[value], color="crimson", marker="x", s=60, zorder=3,
                       label="failed run (left out)")  # fmt: skip
        if len(good):
            ax.hlines(good[value].mean(), x - 0.22, x + 0.22, color="black", linewidth=2, zorder=4)
    ax.set_xticks(range(len(names)), names, rotation=15 if max(len(n) for n in names) > 14 else 0)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel(f"{split} accuracy (%)" if _is_accuracy(value) else value)
    ax.margins(y=0.15)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], loc="best", fontsize="small")
    ax.set_title(title or f"Each seed's runs joined by a line; black: means over {table['seed'].nunique()} seeds",
                 fontsize="medium")  # fmt: skip
    return fig
