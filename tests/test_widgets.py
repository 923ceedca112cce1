"""Widgets driven from tests: controls are built right, changing a value redraws, errors are shown."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from torch import nn

from kdbook_utils import widgets as kd_widgets
from kdbook_utils.models import create_model
from kdbook_utils.widgets import InteractiveFigure, interactive_figure, layer_dropdown, make_control


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    yield
    plt.close("all")


class RecordingPlot:
    """A plot function that remembers its calls and draws a line whose height is ``scale``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, scale: float = 1.0, label: str = "a") -> Figure:
        self.calls.append({"scale": scale, "label": label})
        if label == "broken":
            raise ZeroDivisionError("cannot draw 'broken'")
        fig, ax = plt.subplots()
        ax.plot([0, 1], [scale, scale], label=label)
        return fig


def height(figure: Figure) -> float:
    return float(figure.axes[0].get_lines()[0].get_ydata()[0])


# ------------------------------------------------------------------------------------------ make_control


def test_make_control_follows_the_interact_abbreviations() -> None:
    dropdown = make_control("layer", ["stage1", "stage2"])
    assert isinstance(dropdown, widgets.Dropdown) and dropdown.value == "stage1"
    labelled = make_control("T", [("T = 1", 1), ("T = 4", 4)])
    assert labelled.value == 1 and labelled.label == "T = 1"
    integer = make_control("epochs", (1, 9))
    assert isinstance(integer, widgets.IntSlider) and (integer.min, integer.max, integer.value) == (1, 9, 5)
    assert integer.continuous_update is False, "redraw when the slider is released, not while dragging"
    real = make_control("alpha", (0.0, 1.0, 0.1))
    assert isinstance(real, widgets.FloatSlider) and real.value == pytest.approx(0.5)
    assert make_control("T", (1, 20, 1, 4)).value == 4
    checkbox = make_control("normalise", True)
    assert isinstance(checkbox, widgets.Checkbox) and checkbox.value is True
    ready = widgets.IntText(value=3)
    assert make_control("n", ready) is ready and ready.description == "n"


def test_make_control_rejects_what_it_cannot_build() -> None:
    with pytest.raises(TypeError, match=r"Control 'x' must be a widget, a list of options.*got \{'a': 1\}"):
        make_control("x", {"a": 1})
    with pytest.raises(ValueError, match=r"The option list of control 'x' must be non-empty; got \[\]"):
        make_control("x", [])
    with pytest.raises(ValueError, match=r"must be max > min; got \(5, 1\)\. Swap them: \(1, 5\)"):
        make_control("x", (5, 1))


def test_a_dropdown_can_start_at_a_chosen_default() -> None:
    dropdown = make_control("layer", (["stage1", "stage2", "stage3"], "stage2"))
    assert isinstance(dropdown, widgets.Dropdown) and dropdown.value == "stage2"
    labelled = make_control("T", ([("T = 1", 1), ("T = 4", 4)], 4))
    assert labelled.value == 4 and labelled.label == "T = 4"
    with pytest.raises(
        ValueError, match=r"default of control 'x' must be one of its options \['a', 'b'\]; got 'c'"
    ):
        make_control("x", (["a", "b"], "c"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ((1, 20, 1, 25), r"default of control 'x' must be within the slider's range \[1, 20\]; got 25"),
        (
            (0.0, 1.0, 0.1, -0.5),
            r"default of control 'x' must be within the slider's range \[0.0, 1.0\]; got -0.5",
        ),
        ((1, 5, 10), r"step of control 'x' must be > 0 and at most the range max - min = 4; got 10"),
        ((0.0, 1.0, 0.0), r"step of control 'x' must be > 0 .*; got 0.0"),
        ((float("nan"), 1.0), r"The min of control 'x' must be a finite number; got nan"),
        ((0.0, float("inf")), r"The max of control 'x' must be a finite number; got inf"),
    ],
)
def test_slider_values_ipywidgets_would_silently_clamp_are_refused(spec: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_control("x", spec)


def test_controls_must_match_the_plot_function() -> None:
    with pytest.raises(
        TypeError, match=r"a parameter of RecordingPlot.*\(scale, label\); got 'scal'.*'scale'"
    ):
        interactive_figure(RecordingPlot(), scal=(0.0, 4.0))

    def needs_layer(layer: str, scale: float = 1.0) -> Figure:
        return RecordingPlot()(scale)

    with pytest.raises(
        TypeError, match=r"without a default must be given a control; got no control for 'layer'"
    ):
        interactive_figure(needs_layer, scale=(0.0, 2.0))
    with pytest.raises(TypeError, match="plot_fn must be a function"):
        interactive_figure("not a function", scale=(0.0, 2.0))  # type: ignore[arg-type]
    assert interactive_figure(lambda **values: RecordingPlot()(**values), scale=(0.0, 2.0)).draws == 1


# ------------------------------------------------------------------------------------- interactive_figure


def test_interactive_figure_draws_the_default_at_once() -> None:
    plot = RecordingPlot()
    box = interactive_figure(plot, scale=(0.0, 4.0, 0.5, 2.0), label=["a", "b"])
    assert isinstance(box, widgets.VBox) and isinstance(box, InteractiveFigure)
    assert plot.calls == [{"scale": 2.0, "label": "a"}]
    assert box.draws == 1 and height(box.figure) == 2.0
    assert set(box.controls) == {"scale", "label"}
    assert box.controls["label"] in box.children[0].children, "the controls are inside the box"


def test_setting_a_control_redraws_with_the_new_value() -> None:
    plot = RecordingPlot()
    box = interactive_figure(plot, scale=(0.0, 4.0, 0.5, 2.0), label=["a", "b"])
    first = box.figure
    box.controls["scale"].value = 3.5
    assert plot.calls[-1] == {"scale": 3.5, "label": "a"}
    assert box.figure is not first and height(box.figure) == 3.5
    box.controls["label"].value = "b"
    assert box.figure.axes[0].get_lines()[0].get_label() == "b"
    assert box.draws == 3
    assert box.values == {"scale": 3.5, "label": "b"}


def test_a_failing_redraw_is_shown_and_keeps_the_last_figure() -> None:
    plot = RecordingPlot()
    box = interactive_figure(plot, label=["a", "broken", "c"])
    before = box.figure
    box.controls["label"].value = "broken"  # must not raise inside the widget callback
    assert box.figure is before
    assert "ZeroDivisionError" in box.message.value and "broken" in box.message.value
    assert box.error is not None
    box.controls["label"].value = "c"
    assert box.error is None and box.message.value == ""
    assert box.figure.axes[0].get_lines()[0].get_label() == "c"


def test_a_failing_default_is_an_error_at_once() -> None:
    with pytest.raises(RuntimeError, match="default values .*broken"):
        interactive_figure(RecordingPlot(), label=["broken", "a"])
    with pytest.raises(ValueError, match="at least one control"):
        interactive_figure(RecordingPlot())


def test_plot_functions_may_return_axes_but_nothing_else() -> None:
    def axes_plot(n: int) -> Any:
        _, ax = plt.subplots()
        ax.plot(range(n))
        return ax

    box = interactive_figure(axes_plot, n=(2, 6))
    assert isinstance(box.figure, Figure)
    with pytest.raises(TypeError, match="must return a Matplotlib Figure"):
        interactive_figure(lambda n: None, n=(2, 6))
    box = interactive_figure(lambda n: axes_plot(n) if n < 5 else "oops", n=(2, 6, 1, 3))
    before = box.figure
    box.controls["n"].value = 6  # inside a widget callback: shown, not raised
    assert box.figure is before and "must return a Matplotlib Figure" in box.message.value


def test_display_shows_controls_then_an_updatable_static_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[tuple[Any, dict[str, Any]]] = []

    class Handle:
        def __init__(self) -> None:
            self.updates: list[Any] = []

        def update(self, obj: Any) -> None:
            self.updates.append(obj)

    handle = Handle()

    def fake_display(obj: Any, **kwargs: Any) -> Handle | None:
        shown.append((obj, kwargs))
        return handle if kwargs.get("display_id") else None

    monkeypatch.setattr(kd_widgets, "display", fake_display)
    box = interactive_figure(RecordingPlot(), scale=(0.0, 4.0, 0.5, 1.0))
    box._ipython_display_()
    (controls, controls_kwargs), (figure, figure_kwargs) = shown
    assert "application/vnd.jupyter.widget-view+json" in controls and controls_kwargs == {"raw": True}
    assert figure is box.figure and figure_kwargs == {"display_id": True}, "a plain image for static pages"
    box.controls["scale"].value = 3.0
    assert handle.updates == [box.figure] and height(handle.updates[0]) == 3.0
    assert plt.get_fignums() == [], "figures are closed so the inline backend does not show them again"


# ----------------------------------------------------------------------------------------- layer_dropdown


def test_layer_dropdown_labels_feature_points_with_shapes() -> None:
    model = create_model("resnet20", 10)
    dropdown = layer_dropdown(model, (3, 32, 32))
    assert [label for label, _ in dropdown.options] == [
        "stem (16x32x32)",
        "stage1 (16x32x32)",
        "stage2 (32x16x16)",
        "stage3 (64x8x8)",
    ]
    assert dropdown.value == "stem"
    dropdown.value = "stage2"
    assert dropdown.label == "stage2 (32x16x16)"
    assert layer_dropdown(model, (3, 64, 64), value="stage3").label == "stage3 (64x16x16)"
    every_layer = layer_dropdown(model, (1, 3, 32, 32), feature_points_only=False)
    assert "stem.conv" in [name for _, name in every_layer.options]


def test_layer_dropdown_errors_name_the_choices() -> None:
    model = create_model("resnet20", 10)
    with pytest.raises(ValueError, match="one of the choices: stem, stage1, stage2, stage3; got 'stage9'"):
        layer_dropdown(model, (3, 32, 32), value="stage9")
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no feature points"):
        layer_dropdown(plain, (3, 8, 8))
