"""Small widget helpers for the lessons: a figure with controls, and a layer picker.

:func:`interactive_figure` draws a figure for the default control values as an ordinary image output, so
a rendered page (the book, GitHub, a notebook opened without a kernel) is never blank, and shows the
controls above it; in a live kernel, changing a control redraws the figure in place. Leave the call as
the cell's last line to show it (like any widget), or pass the result to ``display``.

The helpers work with ipywidgets 7.7 (the version Colab ships) and 8, through one code path: they use
only what both versions have (``get_view_spec`` to show a widget, not 8's ``_repr_mimebundle_`` or 7's
``_ipython_display_``).
"""

from __future__ import annotations

import html
import inspect
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, Union

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import DisplayHandle, display
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from kdbook_utils.errors import Seen, closest, must_be
from kdbook_utils.features import layer_table

__all__ = ["InteractiveFigure", "interactive_figure", "layer_dropdown", "layer_options", "make_control"]

PlotFunction = Callable[..., Union[Figure, Axes]]


def make_control(name: str, spec: Any) -> widgets.ValueWidget:
    """Turn a short control description into a widget (the abbreviations follow ``ipywidgets.interact``).

    * a widget: used as it is;
    * a list of values, or of ``(label, value)`` pairs: a dropdown starting at the first;
    * ``(options, default)`` with ``options`` a list: a dropdown starting at ``default``;
    * ``(min, max)``, ``(min, max, step)`` or ``(min, max, step, value)`` numbers: a slider (integer
      when all are integers) starting at ``value`` or the middle;
    * ``True`` / ``False``: a checkbox.

    A default outside the slider's range, a step larger than the range, a bound that is NaN or infinite,
    an empty option list or a default that is not among the options is an error (ipywidgets would
    silently clamp or pick something else).
    """
    style = {"description_width": "initial"}
    if isinstance(spec, widgets.ValueWidget):
        if not spec.description:
            spec.description = name
        return spec
    if isinstance(spec, bool):
        return widgets.Checkbox(value=spec, description=name, indent=False)
    if (
        isinstance(spec, tuple)
        and 2 <= len(spec) <= 4
        and all(isinstance(part, Real) and not isinstance(part, bool) for part in spec)
    ):
        return _slider(name, spec, style)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], list):
        options, default = spec
        values = _option_values(name, options)
        if default not in values:
            raise ValueError(
                must_be(
                    f"The default of control {name!r}",
                    f"one of its options {values}",
                    default,
                    "Pick one of them, or add it to the list.",
                )
            )
        return widgets.Dropdown(options=options, value=default, description=name, style=style)
    if isinstance(spec, (list, tuple)):
        _option_values(name, list(spec))
        return widgets.Dropdown(options=list(spec), description=name, style=style)
    raise TypeError(
        must_be(
            f"Control {name!r}",
            "a widget, a list of options, (options, default), (min, max[, step[, value]]) or True/False",
            spec,
            "For example layer=['stage1', 'stage2'] or T=(1, 20, 1, 4).",
        )
    )


def _option_values(name: str, options: list[Any]) -> list[Any]:
    """The values of a dropdown's options (the second item of ``(label, value)`` pairs); never empty."""
    if not options:
        raise ValueError(
            must_be(f"The option list of control {name!r}", "non-empty", options, "Give at least one option.")
        )
    return [option[1] if isinstance(option, tuple) and len(option) == 2 else option for option in options]


def _slider(name: str, spec: tuple[Real, ...], style: dict[str, str]) -> widgets.ValueWidget:
    """An integer or float slider from ``(min, max[, step[, value]])``, every part checked."""
    for part_name, part in zip(("min", "max", "step", "default"), spec):
        if not math.isfinite(part):
            raise ValueError(
                must_be(
                    f"The {part_name} of control {name!r}",
                    "a finite number",
                    part,
                    "For example T=(1, 20, 1, 4).",
                )
            )
    low, high = spec[0], spec[1]
    if high <= low:
        raise ValueError(
            must_be(
                f"The slider range (min, max) of control {name!r}",
                "max > min",
                Seen(f"({low}, {high})"),
                f"Swap them: ({high}, {low})." if high < low else "Widen the range.",
            )
        )
    integer = all(isinstance(part, int) for part in spec)
    step = spec[2] if len(spec) >= 3 else (1 if integer else (high - low) / 100)
    if step <= 0 or step > high - low:
        raise ValueError(
            must_be(
                f"The step of control {name!r}",
                f"> 0 and at most the range max - min = {high - low}",
                step,
                f"For example ({low}, {high}, {1 if integer else (high - low) / 10}).",
            )
        )
    if len(spec) == 4:
        value = spec[3]
        if not low <= value <= high:
            raise ValueError(
                must_be(
                    f"The default of control {name!r}",
                    f"within the slider's range [{low}, {high}]",
                    value,
                    "Move it inside, or widen the range (a slider would silently clamp it).",
                )
            )
    else:
        value = low + round((high - low) / 2 / step) * step
    slider = widgets.IntSlider if integer else widgets.FloatSlider
    return slider(
        value=value, min=low, max=high, step=step, description=name, continuous_update=False, style=style
    )


class InteractiveFigure(widgets.VBox):
    """Controls that redraw a Matplotlib figure: ``plot_fn(**{name: control.value})``.

    ``controls`` maps each keyword of ``plot_fn`` to its widget; ``figure`` is the latest figure and
    ``draws`` counts redraws. An error while redrawing is shown under the controls (the previous figure
    stays), because errors raised inside widget callbacks never reach the notebook otherwise.
    """

    def __init__(self, plot_fn: PlotFunction, controls: Mapping[str, widgets.ValueWidget]) -> None:
        if not controls:
            raise ValueError(
                "interactive_figure needs at least one control, e.g. layer=['stage1', 'stage2']."
            )
        self.plot_fn = plot_fn
        self.controls: dict[str, widgets.ValueWidget] = dict(controls)
        self.message = widgets.HTML()
        super().__init__([widgets.HBox(list(self.controls.values())), self.message])
        self.figure: Figure | None = None
        self.draws = 0
        self.error: str | None = None
        self._handle: DisplayHandle | None = None
        self.redraw()  # the default figure: must work, so errors here are raised, not shown
        if self.error is not None:
            raise RuntimeError(f"plot function failed for the default values {self.values}:\n{self.error}")
        for control in self.controls.values():
            control.observe(self._on_change, names="value")

    @property
    def values(self) -> dict[str, Any]:
        """The current keyword arguments of the plot function."""
        return {name: control.value for name, control in self.controls.items()}

    def redraw(self) -> Figure | None:
        """Draw the figure for the current values; update the displayed image if there is one."""
        self.message.value = "<i>drawing…</i>"
        try:
            result = self.plot_fn(**self.values)
        except Exception:  # noqa: BLE001 (shown to the student: a callback's exception would vanish into the log)
            self.error = traceback.format_exc(limit=-3)
            self.message.value = (
                '<pre style="color:#cf222e;white-space:pre-wrap">'
                f"Could not draw for {html.escape(str(self.values))}:\n{html.escape(self.error)}</pre>"
            )
            return None
        figure = result.figure if isinstance(result, Axes) else result
        if not isinstance(figure, Figure):
            problem = f"The plot function must return a Matplotlib Figure (or Axes), got {type(result)}."
            if self.figure is None:  # the default draw: a programming error, raise it
                raise TypeError(problem)
            self.error = problem
            self.message.value = f'<pre style="color:#cf222e">{html.escape(problem)}</pre>'
            return None
        if self.figure is not None and self.figure is not figure:
            plt.close(self.figure)
        self.figure, self.error = figure, None
        self.draws += 1
        self.message.value = ""
        plt.close(figure)  # we display it ourselves; stops the inline backend showing it a second time
        if self._handle is not None:
            self._handle.update(figure)
        return figure

    def _on_change(self, change: dict[str, Any]) -> None:
        self.redraw()

    def _ipython_display_(self) -> None:
        """Show the controls, then the current figure as an ordinary image that redraws update in place."""
        controls = {
            "text/plain": f"{type(self).__name__}({', '.join(self.controls)})",
            "application/vnd.jupyter.widget-view+json": self.get_view_spec(),
        }
        display(controls, raw=True)
        self._handle = display(self.figure, display_id=True)


def interactive_figure(plot_fn: PlotFunction, **controls: Any) -> InteractiveFigure:
    """A figure with controls: ``interactive_figure(plot_fn, layer=["stage1", "stage2"], T=(1, 20, 1, 4))``.

    Each keyword names an argument of ``plot_fn`` and describes its control (see :func:`make_control`).
    The figure for the default values is drawn at once; leave the call as the cell's last line (or
    ``display`` the result) to show the controls and the figure.
    """
    _check_plot_function(plot_fn, controls)
    built = {name: make_control(name, spec) for name, spec in controls.items()}
    return InteractiveFigure(plot_fn, built)


def _function_name(function: Any) -> str:
    return getattr(function, "__name__", type(function).__name__)


def _check_plot_function(plot_fn: PlotFunction, controls: Mapping[str, Any]) -> None:
    """Every control names a parameter of ``plot_fn``, and every parameter without a default has one."""
    if not callable(plot_fn):
        raise TypeError(
            must_be("plot_fn", "a function that draws a figure", Seen(f"a {type(plot_fn).__name__}"))
        )
    try:
        parameters = inspect.signature(plot_fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    kinds = {parameter.kind for parameter in parameters.values()}
    keywords = [
        name
        for name, parameter in parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        for name in controls:
            if name not in keywords:
                raise TypeError(
                    must_be(
                        "Each control",
                        f"a parameter of {_function_name(plot_fn)} ({', '.join(keywords)})",
                        name,
                        f"Rename the control or add the parameter.{closest(name, keywords)}",
                    )
                )
    missing = [
        name
        for name in keywords
        if parameters[name].default is inspect.Parameter.empty and name not in controls
    ]
    if missing:
        raise TypeError(
            must_be(
                f"Every parameter of {_function_name(plot_fn)} without a default",
                "given a control",
                Seen(f"no control for {', '.join(repr(name) for name in missing)}"),
                f"Add e.g. {missing[0]}=[...] or give the parameter a default value.",
            )
        )


def _shape_text(shape: Any) -> str:
    """A per-image shape ``(32, 16, 16)`` -> ``"32x16x16"``; a tuple of shapes joined with commas."""
    if shape is None:
        return "not run"
    if isinstance(shape, str):
        return shape
    if any(isinstance(part, (tuple, list)) for part in shape):
        return ", ".join(_shape_text(part) for part in shape)
    return "x".join(str(int(size)) for size in shape)


def layer_options(
    model: nn.Module, input_shape: Sequence[int], feature_points_only: bool = True
) -> list[tuple[str, str]]:
    """``[("stage2 (32x16x16)", "stage2"), ...]``: the model's layers labelled with their output shapes."""
    table = layer_table(model, input_shape)
    if feature_points_only:
        table = table[table["feature_point"].astype(bool)]
    if table.empty:
        raise ValueError(
            f"{type(model).__name__} has no {'feature points' if feature_points_only else 'layers'} to choose "
            "from; pass feature_points_only=False to list every layer."
        )
    return [
        (f"{row.layer} ({_shape_text(row.output_shape)})", str(row.layer))
        for row in table.itertuples(index=False)
    ]


def layer_dropdown(
    model: nn.Module,
    input_shape: Sequence[int],
    feature_points_only: bool = True,
    *,
    value: str | None = None,
    description: str = "layer",
) -> widgets.Dropdown:
    """A dropdown of the model's feature points labelled with shapes, e.g. "stage2 (32x16x16)".

    Its ``value`` is the layer name to hand to :class:`kdbook_utils.features.FeatureExtractor`.
    """
    options = layer_options(model, input_shape, feature_points_only)
    names = [name for _, name in options]
    if value is not None and value not in names:
        raise ValueError(
            must_be(
                "The layer_dropdown value",
                f"one of the choices: {', '.join(names)}",
                value,
                f"Pick one of them, or pass feature_points_only=False for every layer.{closest(value, names)}",
            )
        )
    return widgets.Dropdown(
        options=options,
        value=value if value is not None else names[0],
        description=description,
        style={"description_width": "initial"},
    )
