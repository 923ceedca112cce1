"""Read intermediate feature maps with forward hooks, never by editing a model.

Feature-based distillation (FitNets, FSP, attention transfer, the cross-layer Gram methods of this book)
compares what teacher and student compute *inside* the network. PyTorch lets us watch any submodule: a
*forward hook* registered on it is called with the module's output every time it runs. A
:class:`FeatureExtractor` registers one hook per requested layer (a module path such as ``"stage2"`` or
``"stage2.0.conv1"``, as printed by ``model.named_modules()``), runs the model and hands back
``{layer: output}``::

    with FeatureExtractor(teacher, teacher.feature_points, detach=True) as extractor:
        logits, features = extractor.forward_with_features(images)
        features["stage3"].shape  # torch.Size([batch, 64, 8, 8]) for resnet8 at 32 px

The hooks only record while the extractor itself runs the model, so calling ``model(x)`` directly is
unaffected, and :meth:`FeatureExtractor.remove` (or leaving the ``with`` block) takes them off again.
:func:`layer_table` lists every layer with its output shape and parameter count.
"""

from __future__ import annotations

import difflib
import operator
import textwrap
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdbook_utils.errors import Seen, must_be

if TYPE_CHECKING:
    from typing_extensions import Self

# What nn.Module.register_forward_hook expects: hook(module, inputs, output).
ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], None]

# Error messages list every module path up to this many; deeper models get a shorter, guided list.
_MAX_LISTED_PATHS = 120


def module_paths(model: nn.Module) -> list[str]:
    """Every submodule's path in definition order (``"stem"``, ``"stem.conv"``, ...), the root excluded."""
    return [name for name, _ in model.named_modules() if name]


def _per_image_shape(output: Any) -> Any:
    """Shape of a hooked output without its batch dimension (a tuple of shapes for tuple outputs)."""
    if isinstance(output, Tensor):
        return tuple(output.shape[1:])
    if isinstance(output, (tuple, list)):
        return tuple(_per_image_shape(item) for item in output)
    return None


def _detached(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(item) for item in output)
    return output


def batch_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``(C, H, W)`` -> ``(1, C, H, W)``; a shape that already has a batch dimension is kept."""
    rule = "(C, H, W) or (N, C, H, W) with positive integer sizes"
    fix = "For 32x32 RGB images use (3, 32, 32)."
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__len__"):
        raise TypeError(must_be("input_shape", rule, input_shape, fix))
    try:
        shape = tuple(operator.index(size) for size in input_shape if not isinstance(size, bool))
    except TypeError:
        raise TypeError(must_be("input_shape", rule, input_shape, fix)) from None
    if len(shape) != len(input_shape):  # a bool among the sizes
        raise TypeError(must_be("input_shape", rule, input_shape, fix))
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(must_be("input_shape", rule, input_shape, fix))
    return shape


def zeros_input(model: nn.Module, input_shape: Sequence[int]) -> Tensor:
    """A batch of zeros of ``input_shape`` (``(C, H, W)`` or ``(N, C, H, W)``) on the model's device."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.zeros(batch_shape(input_shape), device=device)


class TrainingModeFeaturesWarning(UserWarning):
    """Features read from a model in training mode outside training: batch norm uses the batch's own
    statistics (and updates its running ones) and dropout drops, so they are not the model's features."""


_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
_WARNED_TRAINING_MODE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _warn_if_reading_in_training_mode(model: nn.Module, detach: bool) -> None:
    """Warn once per model when features are *read* (not trained on) while ``model`` is in training mode.

    Reading means no gradient can reach the model: gradients off (``torch.no_grad()``), ``detach=True``,
    or no parameter that requires a gradient (a frozen or loaded model). A student whose features a
    method trains on is in training mode on purpose and gets no warning."""
    if not model.training or model in _WARNED_TRAINING_MODE:
        return
    trains = torch.is_grad_enabled() and not detach and any(p.requires_grad for p in model.parameters())
    if trains:
        return
    changing = sorted({type(module).__name__ for module in model.modules() if isinstance(module, _MODE_DEPENDENT)
                       and module.training})  # fmt: skip
    if not changing:
        return
    _WARNED_TRAINING_MODE.add(model)
    warnings.warn(
        f"Reading features from {getattr(model, 'arch', type(model).__name__)} in training mode: its "
        f"{', '.join(changing)} layers behave as in training (batch norm normalises with each batch's own "
        "statistics and updates its running ones; dropout drops), so the features are not the trained "
        "model's and the model itself changes. Call model.eval() first (or read them inside "
        "`with eval_mode(model):`).",
        TrainingModeFeaturesWarning,
        stacklevel=4,
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside a ``with`` block and restore its training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def unknown_layer_message(model: nn.Module, layer: str) -> str:
    """Explain that ``layer`` is not a module path of ``model`` and list the valid ones.

    Feature points come first, then every module path; for very deep models (hundreds of paths) the list
    is cut to the stages and blocks plus the modules under the longest valid prefix of ``layer``.
    """
    paths = module_paths(model)
    lines = [f"Unknown layer {layer!r} for {getattr(model, 'arch', type(model).__name__)}."]
    close = difflib.get_close_matches(layer, paths, n=3)
    if close:
        lines.append(f"Did you mean {' or '.join(repr(name) for name in close)}?")
    feature_points = getattr(model, "feature_points", ())
    if feature_points:
        lines.append(f"Feature points: {', '.join(feature_points)}.")
    if len(paths) <= _MAX_LISTED_PATHS:
        lines.append(f"All module paths ({len(paths)}):")
        lines.append(textwrap.fill(", ".join(paths), width=100, initial_indent="  ", subsequent_indent="  "))
    else:
        shallow = [path for path in paths if path.count(".") <= 1]
        lines.append(f"Stages and blocks ({len(shallow)} of {len(paths)} module paths):")
        lines.append(
            textwrap.fill(", ".join(shallow), width=100, initial_indent="  ", subsequent_indent="  ")
        )
        prefix = layer
        while prefix and prefix not in paths:
            prefix = prefix.rpartition(".")[0]
        if prefix:
            inside = [path for path in paths if path.startswith(prefix + ".")]
            lines.append(f"Modules inside {prefix!r}: {', '.join(inside)}.")
        lines.append("layer_table(model, input_shape) lists every module with its output shape.")
    return "\n".join(lines)


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The submodule at path ``layer``; a ``ValueError`` listing the valid paths if there is none."""
    if not isinstance(layer, str) or not layer:
        error = ValueError if isinstance(layer, str) else TypeError
        raise error(
            must_be(
                "A layer",
                "a module path such as 'stage2' or 'stage2.0.conv1'",
                layer if isinstance(layer, str) else Seen(f"a {type(layer).__name__}"),
                "model.feature_points lists the usual ones; layer_table(model) lists them all.",
            )
        )
    try:
        return model.get_submodule(layer)
    except AttributeError:
        raise ValueError(unknown_layer_message(model, layer)) from None


class FeatureExtractor:
    """Forward hooks that capture the outputs of chosen layers of ``model`` in one forward pass.

    ``layers`` are module paths (``model.feature_points`` or any entry of ``model.named_modules()``);
    ``detach=True`` returns outputs cut from the autograd graph (for a frozen teacher). Call the
    extractor for ``{layer: output}`` or :meth:`forward_with_features` for ``(logits, {layer: output})``;
    the dict follows the order of ``layers``. Use it as a context manager, or call :meth:`remove`, to
    take the hooks off the model.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | str, detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                must_be(
                    "model",
                    "a torch.nn.Module",
                    Seen(f"a {type(model).__name__}"),
                    "Pass the network itself.",
                )
            )
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if not layers:
            raise ValueError(
                must_be(
                    "layers",
                    "at least one layer",
                    layers,
                    "Give at least one layer, e.g. FeatureExtractor(model, model.feature_points).",
                )
            )
        duplicates = sorted({str(layer) for layer in layers if layers.count(layer) > 1})
        if duplicates:
            raise ValueError(
                must_be(
                    "Each layer",
                    "requested once",
                    Seen(f"repeated: {', '.join(duplicates)}"),
                    "Remove the repeats: each feature is returned once under its name.",
                )
            )
        modules = [resolve_layer(model, layer) for layer in layers]  # validate all before hooking any
        self.model = model
        self.layers: tuple[str, ...] = layers
        self.detach = detach
        self._recording = False
        self._captured: dict[str, list[Any]] = {}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._make_hook(layer)) for layer, module in zip(layers, modules)
        ]

    def _make_hook(self, layer: str) -> ForwardHook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if self._recording:
                self._captured.setdefault(layer, []).append(_detached(output) if self.detach else output)

        return hook

    @property
    def active(self) -> bool:
        """Whether the hooks are still on the model (``False`` after :meth:`remove`)."""
        return bool(self._handles)

    def forward_with_features(self, x: Tensor) -> tuple[Any, dict[str, Any]]:
        """Run the model once on ``x``: its output (the logits) and ``{layer: output}``."""
        if not self.active:
            raise RuntimeError("This FeatureExtractor was removed; create a new one to read features again.")
        if not isinstance(x, Tensor):
            raise TypeError(
                must_be(
                    "The input of a FeatureExtractor",
                    "a torch.Tensor batch, e.g. images (N, C, H, W)",
                    Seen(f"a {type(x).__name__}"),
                    "Stack the images first, e.g. torch.stack(images), or batch them with a TensorLoader.",
                )
            )
        _warn_if_reading_in_training_mode(self.model, self.detach)
        self._captured = {}
        self._recording = True
        try:
            logits = self.model(x)
            captured = self._captured
        finally:
            self._recording = False
            self._captured = {}  # hold no references to activations between calls
        features = {}
        for layer in self.layers:
            outputs = captured.get(layer, [])
            if len(outputs) != 1:
                how = (
                    "a module that did not run" if not outputs else f"a module that ran {len(outputs)} times"
                )
                fix = (
                    "Pick a module on the forward path, e.g. one of model.feature_points (a module that is "
                    "defined but never called, such as an unused head, records nothing)."
                    if not outputs
                    else "Hook a module that runs exactly once (a module reused in several places, such as "
                    "one shared ReLU, has several outputs)."
                )
                raise RuntimeError(
                    must_be(
                        f"Layer {layer!r}",
                        "a module that runs exactly once per forward pass",
                        Seen(how),
                        fix,
                    )
                )
            features[layer] = outputs[0]
        return logits, features

    def __call__(self, x: Tensor) -> dict[str, Any]:
        """``{layer: output}`` for input ``x`` (the model's own output is discarded)."""
        return self.forward_with_features(x)[1]

    def feature_shapes(self, input_shape: Sequence[int]) -> dict[str, Any]:
        """``{layer: shape per image}`` for an input of ``input_shape`` = ``(C, H, W)`` or ``(N, C, H, W)``.

        Runs one forward pass on zeros in eval mode without gradients and restores the training mode.
        """
        with eval_mode(self.model), torch.no_grad():
            features = self(zeros_input(self.model, input_shape))
        return {layer: _per_image_shape(output) for layer, output in features.items()}

    def remove(self) -> None:
        """Take every hook off the model (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"FeatureExtractor({type(self.model).__name__}, layers={list(self.layers)}, {state})"


def layer_table(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> pd.DataFrame:
    """One row per layer: the named stages and every leaf module, in definition order.

    Columns: ``layer`` (module path, usable with :class:`FeatureExtractor`), ``type``, ``output_shape``
    (per image, without the batch dimension; ``None`` if the module did not run), ``params`` (the
    module's own parameters, so the column sums to the model's total) and ``feature_point``.
    ``input_shape`` is ``(C, H, W)`` or ``(N, C, H, W)``. The model runs once on zeros in eval mode
    without gradients; its training mode is restored.
    """
    feature_points = set(getattr(model, "feature_points", ()))
    stages = {name for name, _ in model.named_children()}
    rows = [
        (path, module)
        for path, module in model.named_modules()
        if path and (path in stages or next(module.children(), None) is None)
    ]
    shapes: dict[str, Any] = {}

    def make_hook(path: str) -> ForwardHook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            shapes.setdefault(path, _per_image_shape(output))  # first call if a module is reused

        return hook

    handles = [module.register_forward_hook(make_hook(path)) for path, module in rows]
    try:
        with eval_mode(model), torch.no_grad():
            model(zeros_input(model, input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return pd.DataFrame(
        {
            "layer": [path for path, _ in rows],
            "type": [type(module).__name__ for _, module in rows],
            "output_shape": [shapes.get(path) for path, _ in rows],
            "params": [sum(p.numel() for p in module.parameters(recurse=False)) for _, module in rows],
            "feature_point": [path in feature_points for path, _ in rows],
        }
    )
