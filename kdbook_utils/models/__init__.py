"""The model zoo: ``create_model(name, num_classes, **options)`` and ``list_models()``.

Every model names its feature points (``model.feature_points``, e.g. ``("stem", "stage1", "stage2",
"stage3")``): each is the path of a submodule whose output is that feature map, so methods read features
with forward hooks (:class:`kdbook_utils.features.FeatureExtractor`) and never edit the model.
Lessons add their own architectures with :func:`register_model`.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

ModelBuilder = Callable[..., nn.Module]


class ZooModel(nn.Sequential):
    """A zoo CNN: an ``nn.Sequential`` of named stages, read top to bottom like the paper's table.

    ``forward`` runs the named children in order (``stem``, ``stage1``, ..., ``pool``, ``classifier``),
    so a method can take the stages after a feature point (as multi-exit heads do) without editing the
    model. ``feature_points`` names, in forward order, the children whose outputs are feature maps.
    """

    def __init__(self, stages: OrderedDict[str, nn.Module], feature_points: Sequence[str]) -> None:
        super().__init__(stages)
        missing = [name for name in feature_points if name not in stages]
        if missing:
            raise ValueError(f"Feature points {missing} are not stages of this model: {list(stages)}.")
        self.feature_points: tuple[str, ...] = tuple(feature_points)
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


def create_model(name: str, num_classes: int, **options: object) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet8", 10, in_channels=1)``."""
    _import_zoo()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Registered models: {', '.join(sorted(_REGISTRY))}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    model = _REGISTRY[name](num_classes, **options)
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
)


def _import_zoo() -> None:
    """Import the modules that register architectures (lazily, to keep imports cheap and acyclic)."""
    for module in ZOO_MODULES:
        importlib.import_module(module)
