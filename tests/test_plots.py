"""Figures: structure (axes, colour bars, tick labels, colours), numbers drawn, errors, and PNG rendering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import colors
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from kdbook_utils.plots import (
    MAX_FIGURE_WIDTH,
    MAX_TICK_LABELS,
    heatmap_grid,
    image_grid,
    plot_history,
    results_bar,
    summarize_runs,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def render(fig: Figure, tmp_path: Path, name: str) -> Path:
    """Save as PNG and check it decodes to a non-trivial image."""
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=100)
    image = plt.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01, "the rendered figure is blank"
    return path


def history(epochs: int = 5, shift: float = 0.0, terms: tuple[str, ...] = ("ce",)) -> pd.DataFrame:
    """A history with the columns of kdbook_utils.train.fit."""
    epoch = np.arange(1, epochs + 1)
    frame = {"epoch": epoch}
    for term in terms:
        frame[f"train_{term}"] = 1.0 / epoch + shift
    frame |= {
        "train_loss": len(terms) / epoch + shift,
        "train_acc": 100 * (1 - 0.5 / epoch),  # percent, as fit logs it
        "val_loss": 1.2 / epoch + shift,
        "val_acc": 100 * (0.9 - 0.5 / epoch - shift),
        "lr": 0.05 * (1 - epoch / (epochs + 1)),
        "seconds": np.full(epochs, 2.0),
    }
    return pd.DataFrame(frame)


def colourbars(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def images_of(fig: Figure) -> list[AxesImage]:
    return [image for ax in fig.axes for image in ax.get_images() if ax.get_label() != "<colorbar>"]


# ------------------------------------------------------------------------------------------ plot_history


def test_history_one_run_draws_train_and_val_per_metric(tmp_path: Path) -> None:
    frame = history()
    fig = plot_history(frame)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    loss_ax, acc_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"train", "val"}
    np.testing.assert_allclose(lines["train"].get_xdata(), frame["epoch"])
    np.testing.assert_allclose(lines["val"].get_ydata(), frame["val_loss"])
    assert lines["train"].get_linestyle() == "--" and lines["val"].get_linestyle() == "-"
    assert loss_ax.get_xlabel() == "epoch" and loss_ax.get_ylabel() == "loss"
    assert acc_ax.get_ylabel() == "accuracy (%)"
    assert acc_ax.get_ylim() == (0, 100)  # accuracy on its whole scale
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["train", "val"]
    render(fig, tmp_path, "history")


def test_history_dict_gives_one_colour_per_run() -> None:
    fig = plot_history({"student alone": history(shift=0.1), "student + KD": history()})
    for ax in fig.axes:
        by_label = {line.get_label(): line.get_color() for line in ax.get_lines()}
        assert len(by_label) == 4
        assert by_label["student alone · train"] == by_label["student alone · val"]
        assert by_label["student alone · val"] != by_label["student + KD · val"]


def test_history_plots_loss_terms_and_plain_columns() -> None:
    frame = history(terms=("ce", "kd"))
    fig = plot_history(frame, metrics=("kd", "lr"))
    kd_ax, lr_ax = fig.axes
    (kd_line,) = kd_ax.get_lines()  # only train_kd exists
    np.testing.assert_allclose(kd_line.get_ydata(), frame["train_kd"])
    (lr_line,) = lr_ax.get_lines()
    np.testing.assert_allclose(lr_line.get_ydata(), frame["lr"])


def test_history_a_decaying_learning_rate_is_drawn_on_a_log_axis(tmp_path: Path) -> None:
    frame = history(epochs=30)
    frame["lr"] = 0.05 * 0.5 * (1 + np.cos(np.pi * np.arange(30) / 30))  # a 30-epoch cosine schedule
    assert frame["lr"].max() / frame["lr"].min() > 30
    fig = plot_history(frame, metrics=("loss", "lr"))
    lr_ax = fig.axes[1]
    assert lr_ax.get_yscale() == "log" and lr_ax.get_ylabel() == "learning rate"
    render(fig, tmp_path, "history_lr")


def test_history_unknown_metric_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"no column for metric 'kd'.*loss, acc"):
        plot_history(history(), metrics=("kd",))
    with pytest.raises(TypeError, match="DataFrame"):
        plot_history({"run": [1, 2, 3]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="at least one history"):
        plot_history({})


# ------------------------------------------------------------------------------------------ heatmap_grid


def test_heatmap_grid_shares_one_norm_and_one_colourbar(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.rand(10, 10, generator=generator) * scale for scale in (1.0, 2.0, 3.0)]
    fig = heatmap_grid(matrices, ["teacher", "student", "student + KD"], row_labels=CLASSES, col_labels=CLASSES,
                       xlabel="class", ylabel="class", ncols=2)  # fmt: skip
    images = images_of(fig)
    assert len(images) == 3
    assert len(colourbars(fig)) == 1
    norms = {id(image.norm) for image in images}
    assert len(norms) == 1, "every panel must use the same colour normalisation"
    assert images[0].norm.vmin == pytest.approx(min(float(m.min()) for m in matrices))
    assert images[0].norm.vmax == pytest.approx(max(float(m.max()) for m in matrices))
    np.testing.assert_allclose(images[1].get_array(), matrices[1].numpy())
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["teacher", "student", "student + KD"]
    assert len([ax for ax in fig.axes if not ax.axison]) == 1, "the unused fourth slot is hidden"
    assert [t.get_text() for t in panels[0].get_yticklabels()] == CLASSES
    assert [t.get_text() for t in panels[2].get_xticklabels()] == CLASSES
    assert panels[0].get_ylabel() == "class" and panels[2].get_xlabel() == "class"
    render(fig, tmp_path, "heatmaps")


def test_heatmap_grid_separate_scales_get_one_colourbar_each() -> None:
    matrices = [np.arange(4.0).reshape(2, 2), 10 + np.arange(6.0).reshape(2, 3)]
    fig = heatmap_grid(matrices, shared_scale=False)
    assert len(colourbars(fig)) == 2
    first, second = images_of(fig)
    assert (first.norm.vmin, first.norm.vmax) == (0.0, 3.0)
    assert (second.norm.vmin, second.norm.vmax) == (10.0, 15.0)


def test_heatmap_grid_center_and_limits() -> None:
    fig = heatmap_grid([np.array([[-1.0, 3.0], [0.5, 0.0]])], center=0.0, cmap="RdBu_r")
    (image,) = images_of(fig)
    assert (image.norm.vmin, image.norm.vmax) == (-3.0, 3.0)
    fig = heatmap_grid([np.ones((3, 3))], vmin=0.0, vmax=2.0)  # a constant matrix is fine too
    (image,) = images_of(fig)
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 2.0)
    assert isinstance(image.norm, colors.Normalize)


def test_heatmap_grid_accepts_a_4d_array_as_rows_and_columns() -> None:
    fig = heatmap_grid(torch.rand(2, 3, 4, 4))
    grid_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(grid_axes) == 6
    assert grid_axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 3)


def test_heatmap_grid_thins_many_tick_labels() -> None:
    names = [f"class{i}" for i in range(100)]
    fig = heatmap_grid([np.random.default_rng(0).random((100, 100))], row_labels=names, col_labels=names)
    (ax,) = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    shown = ax.get_yticks()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 2 <= len(labels) <= MAX_TICK_LABELS
    assert labels == [names[int(position)] for position in shown], "each label sits on its own row"


def test_heatmap_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"Matrix 1 must be 2-D \(H, W\); got shape \(2, 3, 4\)"):
        heatmap_grid([np.zeros((3, 3)), np.zeros((2, 3, 4))])
    with pytest.raises(ValueError, match=r"titles must be one title per matrix \(2\); got 3 titles"):
        heatmap_grid([np.zeros((3, 3))] * 2, ["a", "b", "c"])
    with pytest.raises(
        ValueError, match=r"row_labels must be one name per row of matrix 0 \(4 rows\); got 10"
    ):
        heatmap_grid([np.zeros((4, 4))], row_labels=CLASSES)
    with pytest.raises(
        ValueError, match=r"col_labels must be one name per col of matrix 1 \(3 cols\); got 4"
    ):
        heatmap_grid([np.zeros((4, 4)), np.zeros((4, 3))], col_labels=CLASSES[:4])
    with pytest.raises(ValueError, match="at least one matrix"):
        heatmap_grid([])
    with pytest.raises(ValueError, match=r"Matrix 0 must be finite or NaN.*got inf at \[1, 2\]"):
        heatmap_grid([np.array([[0.0, 1.0, 2.0], [3.0, 4.0, np.inf]])])
    with pytest.raises(ValueError, match="vmax must be a finite number or None; got nan"):
        heatmap_grid([np.eye(3)], vmax=float("nan"))
    with pytest.raises(ValueError, match=r"vmin must be smaller than vmax \(0.0\); got 1.0"):
        heatmap_grid([np.eye(3)], vmin=1.0, vmax=0.0)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 2, 2\)"):
        heatmap_grid(np.zeros((2, 2, 2, 2, 2)))


# -------------------------------------------------------------------------------------------- image_grid


def test_image_grid_uint8_titles_are_class_names(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(10)
    fig = image_grid(images, labels, CLASSES, ncols=5)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 10
    assert [ax.get_title() for ax in panels] == CLASSES
    np.testing.assert_allclose(
        panels[3].get_images()[0].get_array(), images[3].permute(1, 2, 0).numpy() / 255
    )
    render(fig, tmp_path, "images")


def test_image_grid_undoes_normalisation() -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pixels = torch.rand(4, 3, 8, 8)
    normalised = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    fig = image_grid(normalised, mean=mean, std=std)
    shown = fig.axes[2].get_images()[0].get_array()
    np.testing.assert_allclose(shown, pixels[2].permute(1, 2, 0).numpy(), atol=1e-6)


def test_image_grid_colours_predictions(tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 3])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 5, 2, 3]), 10).float()  # the second is wrong
    fig = image_grid(torch.rand(4, 1, 32, 32), labels, CLASSES, predictions=logits)
    panels = [ax for ax in fig.axes if ax.get_images()]
    titles = [ax.title for ax in panels]
    assert titles[1].get_text() == "dog\n(true: automobile)"
    assert titles[0].get_text() == "airplane"
    assert colors.to_hex(titles[0].get_color()) != colors.to_hex(titles[1].get_color())
    assert colors.to_rgb(titles[0].get_color())[1] > colors.to_rgb(titles[0].get_color())[0], (
        "correct is green"
    )
    assert colors.to_rgb(titles[1].get_color())[0] > colors.to_rgb(titles[1].get_color())[1], "wrong is red"
    assert panels[0].get_images()[0].get_cmap().name == "gray"
    render(fig, tmp_path, "predictions")


def test_image_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        image_grid(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        image_grid(np.zeros((2, 5, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"labels must be one per image \(2\); got 3 labels"):
        image_grid(np.zeros((2, 3, 8, 8), dtype=np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must be an index into classes \(0 to 1\); got 5"):
        image_grid(np.zeros((1, 3, 8, 8), dtype=np.uint8), [5], ["a", "b"])
    with pytest.raises(ValueError, match="pass labels too"):
        image_grid(np.zeros((1, 3, 8, 8), dtype=np.uint8), predictions=[0])
    with pytest.raises(
        ValueError, match=r"classes must be one name per column of the predictions \(10 classes\)"
    ):
        image_grid(
            np.zeros((2, 3, 8, 8), dtype=np.uint8), [0, 1], CLASSES[:9], predictions=torch.randn(2, 10)
        )
    with pytest.raises(ValueError, match=r"labels must be whole numbers"):
        image_grid(np.zeros((2, 3, 8, 8), dtype=np.uint8), [0.0, 1.5])
    with pytest.raises(ValueError, match="got -1"):
        image_grid(np.zeros((2, 3, 8, 8), dtype=np.uint8), [0, -1])
    with pytest.raises(ValueError, match="images must be finite.*image 1"):
        image_grid(torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), float("nan"))]))
    with pytest.raises(ValueError, match="both mean and std"):
        image_grid(np.zeros((1, 3, 8, 8), dtype=np.float32), mean=[0.5, 0.5, 0.5])


# ------------------------------------------------------------------------------------------------ results


def runs_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": ["student"] * 3 + ["KD"] * 3,
            "seed": [0, 1, 2] * 2,
            "accuracy": [90.0, 92.0, 91.0, 93.0, 95.0, 94.0],
        }
    )


def test_summarize_runs_mean_and_sample_std_in_first_seen_order() -> None:
    summary = summarize_runs(runs_table())
    assert list(summary.index) == ["student", "KD"]
    assert summary.loc["KD", "mean"] == pytest.approx(94.0)
    assert summary.loc["KD", "std"] == pytest.approx(np.std([93.0, 95.0, 94.0], ddof=1))
    assert list(summary["n"]) == [3, 3]
    with pytest.raises(ValueError, match="no column"):
        summarize_runs(runs_table(), value="top5")


def test_results_bar_from_summary_and_from_runs(tmp_path: Path) -> None:
    summary = summarize_runs(runs_table())
    fig = results_bar(summary)
    ax = fig.axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    np.testing.assert_allclose(heights, summary["mean"])
    assert ax.get_ylim()[0] == 0  # bars start at zero
    assert [t.get_text() for t in ax.get_xticklabels()] == ["student", "KD"]
    assert ax.get_ylabel() == "accuracy (%)"
    assert any("94.0 ± 1.0" in text.get_text() for text in ax.texts)
    render(fig, tmp_path, "bars")

    fig = results_bar(runs_table(), value="accuracy", by="method", reference={"teacher": 96.0})
    ax = fig.axes[0]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], summary["mean"])
    dots = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if isinstance(c, PathCollection)])
    assert sorted(np.round(dots, 6)) == sorted(np.round(runs_table()["accuracy"], 6))
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label() == "teacher"] == [96.0]
    render(fig, tmp_path, "bars_runs")

    one_run = runs_table().query("seed == 0")
    fig = results_bar(one_run, value="accuracy", by="method")
    assert not any(text.get_text().count("±") for text in fig.axes[0].texts)  # no spread from one run


def test_results_point_kind_and_errors(tmp_path: Path) -> None:
    fig = results_bar(summarize_runs(runs_table()), kind="point")
    assert not fig.axes[0].patches
    render(fig, tmp_path, "points")
    with pytest.raises(ValueError, match="kind must be"):
        results_bar(summarize_runs(runs_table()), kind="pie")
    with pytest.raises(ValueError, match="no column 'mean'.*by="):
        results_bar(runs_table())
    with pytest.raises(ValueError, match="no error column"):
        results_bar(summarize_runs(runs_table()), error="sem")
    diverged = runs_table()
    diverged.loc[4, "accuracy"] = float("nan")  # one KD run diverged
    with pytest.raises(
        ValueError, match=r"Every accuracy must be a finite number .*; got nan in 1 run\(s\) of KD.*dropna"
    ):
        results_bar(diverged, value="accuracy", by="method")
    with pytest.raises(ValueError, match="reference 'teacher' must be a finite number; got inf"):
        results_bar(summarize_runs(runs_table()), reference={"teacher": float("inf")})


def test_plots_leave_the_interactive_flag_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jupyter switches matplotlib's interactive mode on while the first figure of a session is created;
    a plot function must not undo that afterwards, or the notebook shows no later figure."""
    original_subplots = plt.subplots

    def subplots_as_in_a_fresh_kernel(*args: object, **kwargs: object) -> object:
        matplotlib.interactive(True)  # what the inline backend does on first use
        return original_subplots(*args, **kwargs)

    monkeypatch.setattr(plt, "subplots", subplots_as_in_a_fresh_kernel)
    was_interactive = matplotlib.is_interactive()
    try:
        for draw in (
            lambda: plot_history(history()),
            lambda: heatmap_grid([np.eye(3)]),
            lambda: image_grid(np.zeros((2, 3, 8, 8), dtype=np.uint8)),
            lambda: results_bar(summarize_runs(runs_table())),
        ):
            matplotlib.interactive(False)
            draw()
            assert matplotlib.is_interactive(), "the plot function restored rcParams['interactive']"
    finally:
        matplotlib.interactive(was_interactive)


def test_many_panels_or_images_never_make_a_figure_wider_than_the_book_shows() -> None:
    frame = history()
    frame["lr"] = 0.1
    assert plot_history(frame, metrics=("loss", "acc", "lr")).get_size_inches()[0] <= MAX_FIGURE_WIDTH
    images = torch.zeros(24, 3, 8, 8, dtype=torch.uint8)
    grid = image_grid(images, torch.zeros(24, dtype=torch.long), CLASSES, ncols=12)
    assert grid.get_size_inches()[0] <= MAX_FIGURE_WIDTH
