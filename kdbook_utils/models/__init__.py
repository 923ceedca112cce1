"""The model zoo: ``create_model(name, num_classes, **options)`` and ``list_models()``.

Every model names its feature points (``model.feature_points``, e.g. ``("stem", "stage1", "stage2",
"stage3")``): each is the path of a submodule whose output is that feature map, so methods read features
with forward hooks (:class:`kdbook_utils.features.FeatureExtractor`) and never edit the model.
Lessons add their own architectures with :func:`register_model`.
"""

from __future__ import annotations

import importlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdbook_utils.errors import Seen, check_int, check_keywords, closest, describe, must_be

ModelBuilder = Callable[..., nn.Module]


class ZooModel(nn.Sequential):
    """A zoo CNN: an ``nn.Sequential`` of named stages, read top to bottom like the paper's table.

    ``forward`` checks the input (:meth:`check_input`), then runs the named children in order (``stem``,
    ``stage1``, ..., ``pool``, ``classifier``), so a method can take the stages after a feature point (as
    multi-exit heads do) without editing the model. ``feature_points`` names, in forward order, the
    children whose outputs are feature maps.

    ``in_channels`` is read from the first convolution; ``min_input_size`` is the smallest height and width
    that passes through the model's downsampling (the builder computes it from its layout; ``None`` means
    unknown, and then the size is not checked).
    """

    def __init__(
        self,
        stages: OrderedDict[str, nn.Module],
        feature_points: Sequence[str],
        min_input_size: int | None = None,
    ) -> None:
        super().__init__(stages)
        missing = [name for name in feature_points if name not in stages]
        if missing:
            raise ValueError(f"Feature points {missing} are not stages of this model: {list(stages)}.")
        self.feature_points: tuple[str, ...] = tuple(feature_points)
        first_conv = next((module for module in self.modules() if isinstance(module, nn.Conv2d)), None)
        self.in_channels: int | None = first_conv.in_channels if first_conv is not None else None
        if min_input_size is not None:
            check_int("min_input_size", min_input_size, minimum=1)
        self.min_input_size: int | None = min_input_size

    def forward(self, images: Tensor) -> Tensor:
        self.check_input(images)
        for stage in self:
            images = stage(images)
        return images

    def check_input(self, images: Tensor) -> None:
        """Raise a clear error unless ``images`` is a float batch ``(N, C, H, W)`` this model can take.

        Checks the type, the rank, the dtype (uint8 images must be normalised first), the channel count
        the model was built for and the smallest spatial size (:attr:`min_input_size`). It reads only the
        shape and dtype, never the values, so it costs microseconds. Code that runs the stages one by one
        can call it first.
        """
        name = f"The input of {getattr(self, 'arch', type(self).__name__)}"
        if not isinstance(images, Tensor):
            raise TypeError(
                must_be(
                    name,
                    "a torch.Tensor of images (N, C, H, W)",
                    Seen(describe(images) if hasattr(images, "shape") else f"a {type(images).__name__}"),
                    "Convert it with torch.as_tensor(...) and normalise it, or batch a data set with "
                    "kdbook_utils.data.TensorLoader.",
                )
            )
        if self.in_channels is None:  # not a CNN: nothing more to check
            return
        shape = tuple(images.shape)
        if images.dim() != 4:
            fixes = {
                2: "For one grey image (H, W), use images[None, None].",
                3: "For one image (C, H, W), add a batch dimension: images.unsqueeze(0).",
            }
            raise ValueError(
                must_be(
                    name,
                    "a 4-D batch of images (N, C, H, W)",
                    Seen(f"a {images.dim()}-D tensor of shape {shape}"),
                    fixes.get(images.dim(), "Reshape it to (N, C, H, W)."),
                )
            )
        if not images.is_floating_point():
            fix = (
                "uint8 images (0-255) must be converted to float and normalised first: "
                "kdbook_utils.data.TensorLoader does both (or use images.float() / 255, then subtract the "
                "data set's mean and divide by its std)."
                if images.dtype == torch.uint8
                else "Convert it with images.float()."
            )
            raise TypeError(
                must_be(name, "a floating-point tensor", Seen(f"dtype {images.dtype} (shape {shape})"), fix)
            )
        channels = shape[1]
        if channels != self.in_channels:
            arch = getattr(self, "arch", None)
            if shape[3] == self.in_channels:
                fix = "The channels seem to come last (N, H, W, C): use images.permute(0, 3, 1, 2)."
            else:
                fix = (
                    f"Create the model for {channels}-channel images (create_model({arch!r}, num_classes, "
                    f"in_channels={channels}))"
                    if arch
                    else f"Build the model for {channels}-channel images"
                )
                if channels == 1 and self.in_channels == 3:
                    fix += ", or repeat the grey channel: images.expand(-1, 3, -1, -1)"
                fix += "."
            raise ValueError(
                must_be(
                    name,
                    f"a batch with {self.in_channels} channels, (N, {self.in_channels}, H, W)",
                    Seen(f"{channels} channel{'s' if channels != 1 else ''} (shape {shape})"),
                    fix,
                )
            )
        smallest = self.min_input_size
        if smallest is not None and (shape[2] < smallest or shape[3] < smallest):
            raise ValueError(
                must_be(
                    name,
                    f"at least {smallest}x{smallest} pixels, the smallest size that passes through its "
                    "downsampling",
                    Seen(f"{shape[2]}x{shape[3]} images (shape {shape})"),
                    f"Upsample the images, e.g. torch.nn.functional.interpolate(images, size=({smallest}, "
                    f"{smallest})), or use a model that downsamples less.",
                )
            )


_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make ``builder(num_classes, in_channels=3, **options)`` available as ``name``."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"A model called {name!r} is already registered.")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _import_zoo()
    return sorted(_REGISTRY)


def model_options(name: str) -> dict[str, Any]:
    """The options ``create_model(name, num_classes, **options)`` accepts, with their defaults."""
    builder = _builder(name)
    parameters = list(inspect.signature(builder).parameters.values())[1:]  # after num_classes
    return {
        parameter.name: parameter.default
        for parameter in parameters
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _builder(name: str) -> ModelBuilder:
    _import_zoo()
    if name not in _REGISTRY:
        registered = sorted(_REGISTRY)
        raise ValueError(
            must_be(
                "The model name",
                "a registered model",
                name,
                f"Registered models: {', '.join(registered)}.{closest(name, registered)}",
            )
        )
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet8", 10, in_channels=1)``.

    An unknown name lists the registered models; an unknown option lists the options of that model
    (:func:`model_options`).
    """
    builder = _builder(name)
    check_int("num_classes", num_classes, minimum=1, fix="It is the number of classes, e.g. 10 for CIFAR-10.")
    takes_any = any(
        parameter.kind == inspect.Parameter.VAR_KEYWORD
        for parameter in inspect.signature(builder).parameters.values()
    )
    if not takes_any:
        check_keywords(f"create_model({name!r})", options, model_options(name))
    if "in_channels" in options:
        check_int("in_channels", options["in_channels"], minimum=1, fix="Use 1 for grey images, 3 for RGB.")
    model = builder(num_classes, **options)
    model.arch = name  # recorded in checkpoints, so a checkpoint of another architecture is refused
    model.num_classes = num_classes
    if not getattr(model, "feature_points", None):
        raise TypeError(f"Model {name!r} does not declare its feature points (model.feature_points).")
    return model


# Modules that register architectures; a lesson that adds a file adds its line here.
ZOO_MODULES: tuple[str, ...] = (
    "kdbook_utils.models.resnet",
    "kdbook_utils.models.vgg",
    "kdbook_utils.models.small_cnn",
    "kdbook_utils.models.torchvision_zoo",
    "kdbook_utils.models.resnetv2",
    "kdbook_utils.models.wrn",
    "kdbook_utils.models.alexnet_lsl",
    "kdbook_utils.models.crosslayer_nets",
    "kdbook_utils.models.gpt",
)


def _import_zoo() -> None:
    """Import the modules that register architectures (lazily, to keep imports cheap and acyclic)."""
    for module in ZOO_MODULES:
        importlib.import_module(module)
