"""Running experiments: teachers, students, seeds, grids, caches and comparisons, each job written once.

Every lesson runs the same few jobs, and they live here:

* :func:`cached_teacher` trains a teacher once and loads it from the cache afterwards (one naming rule
  for every cache file: :func:`cached_model`); :func:`cached_teacher_exits` and
  :func:`cached_adapted_teacher` do the same for the teachers lessons 3 and 4 derive from it;
* :class:`TeacherOutputCache` keeps the teachers' outputs (logits and feature maps) so that a sweep of
  students runs each teacher once per batch, not once per student;
* :func:`train_student` trains one student with any method and measures it on the validation and test
  splits; :func:`run_seeds` runs several methods over several seeds into one tidy table (accuracy in
  percent, one row per run, split and output), flagging runs that failed;
* :func:`compare` pairs runs by seed and tells a gain from seed noise (mean paired difference with its
  95 % confidence interval, and a verdict in words).

The notebooks call these with the preset's data and device; nothing here draws a figure.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdbook_utils import distributed
from kdbook_utils.checkpoints import cache_dir, load_checkpoint, load_or_train, save_checkpoint, shipped_model
from kdbook_utils.data import DataSplits, ImageDataset, TensorLoader
from kdbook_utils.errors import Seen, check_int, check_number, closest, must_be
from kdbook_utils.methods.crosslayer import adapt_teacher
from kdbook_utils.methods.mskd import ExitHeadsCrossEntropy, MultiExitCrossEntropy, exit_accuracies
from kdbook_utils.models import create_model, list_models
from kdbook_utils.models.multi_exit import MultiExit, reinitialise
from kdbook_utils.train import (
    DeviceLike,
    DivergedError,
    NonFiniteLossError,
    Precision,
    TeacherOutputs,
    as_method,
    fit,
    freeze,
    output_names,
    precision_name,
    predict,
    resolve_device,
    run_with_features,
    seed_everything,
)

__all__ = [
    "Comparison",
    "ResultsFileError",
    "StudentRun",
    "TeacherOutputCache",
    "TrainedModel",
    "cached_adapted_teacher",
    "cached_model",
    "cached_teacher",
    "cached_teacher_exits",
    "check_results_folder",
    "compare",
    "default_padding",
    "read_results",
    "run_seeds",
    "train_student",
    "write_results",
]

EVAL_BATCH_SIZE = 512


def default_padding(data: ImageDataset) -> int:
    """Crop padding for augmentation: 4 pixels at 32 px (CIFAR's usual), an eighth of the side in general."""
    return max(1, data.images.shape[-1] // 8)


def _loaders(
    data: ImageDataset, batch_size: int, seed: int, device: torch.device, augment: bool = True
) -> TensorLoader:
    return TensorLoader(data, batch_size, train=True, seed=seed, device=device, augment=augment,
                        padding=default_padding(data))  # fmt: skip


def _eval_loader(data: ImageDataset, device: torch.device) -> TensorLoader:
    return TensorLoader(data, EVAL_BATCH_SIZE, train=False, device=device)


# --------------------------------------------------------------------------------------------------------
# Cached models
# --------------------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A model from :func:`cached_model`: the network (eval mode), its training history (None if it was
    not recorded), the file it came from, and where that was: ``"trained"`` (in this call), ``"cache"``
    (trained before on this machine) or ``"shipped"`` (trained once by the course and shipped with the
    package; ``record`` then holds its manifest entry: what it was trained on, its precision, its test
    accuracy)."""

    model: nn.Module
    history: pd.DataFrame | None
    path: Path
    source: str
    recipe: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        """Whether the weights came from a file rather than from training in this call."""
        return self.source != "trained"


class TeacherNotTrainedError(RuntimeError):
    """A lesson asked for a teacher that is neither cached nor shipped, and may not train it itself."""


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """A short stable hash of a recipe (a dict of plain values): the tail of a cache file's name."""
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def model_file_name(name: str, recipe: Mapping[str, Any]) -> str:
    """The one naming rule for trained models: ``<name>_<hash>.pt``, ``hash`` the :func:`recipe_hash` of
    everything that made the model except the precision it trained in (see :func:`cached_model`)."""
    return f"{name}_{recipe_hash({k: v for k, v in recipe.items() if k != 'precision'})}.pt"


def cached_model(
    name: str,
    recipe: Mapping[str, Any],
    build: Callable[[bool], nn.Module],
    train: Callable[[nn.Module], pd.DataFrame | None],
    *,
    device: DeviceLike = None,
    may_train: bool = True,
    quiet: bool = False,
) -> TrainedModel:
    """Load a trained model from the cache or the package's shipped models, or build, train and cache it.

    ``name`` says what the model is (e.g. ``resnet20_digits32px_seed0``) and ``recipe`` is everything that
    made it: architecture, options, the training data's :meth:`~kdbook_utils.data.ImageDataset.identity`,
    epochs, learning rate, seed, and ``precision`` (the one it trains in). A change of any of them gives
    another model. Looked for, in order:

    1. the cache, ``<cache>/models/<name>_<hash>_<precision>.pt``: trained on this machine before, in this
       precision;
    2. the shipped models (:data:`kdbook_utils.checkpoints.SHIPPED`), ``<name>_<hash>.pt``: trained once
       by the course with the same recipe (``python -m kdbook_utils teachers``), in the precision its
       manifest names, and used whatever precision this run trains in: it is the course's teacher;
    3. otherwise it is trained here, if ``may_train``, else a :class:`TeacherNotTrainedError` says how to
       get it.

    ``build(will_train)`` makes the untrained network (``will_train`` is False when its weights will come
    from a file); ``train(model)`` trains it in place and returns its history. The model comes back
    frozen (:func:`~kdbook_utils.train.freeze`) on ``device``, with ``model.cache_key`` set to its file
    name (stem), which the recipes of models derived from it (exit heads, adapters) name.

    Under ``torchrun`` every process trains the model together (``fit`` splits the work); only process 0
    writes the file, and the others wait for it at a barrier, then load it.
    """
    if any(separator in name for separator in ("/", "\\")):
        raise ValueError(f"A cache name must not contain path separators; got {name!r}.")
    shipped_name = model_file_name(name, recipe)
    path = cache_dir() / "models" / shipped_name.replace(".pt", f"_{recipe.get('precision', 'float32')}.pt")
    device = resolve_device(device)
    shipped = None if path.is_file() else shipped_model(shipped_name)
    will_train = distributed.broadcast_object(not path.is_file() and shipped is None)  # process 0 decides
    if will_train and not may_train:
        raise TeacherNotTrainedError(
            f"{name} (recipe {shipped_name}) is neither in the cache ({path.parent}) nor shipped with the "
            "package, and this preset does not train teachers in a lesson (it would take a while on a CPU). "
            "To train it here, ask for it: PRESET = PRESET.replace(train_teachers=True) in the parameters "
            "cell, or train every teacher of a lesson once with `python -m kdbook_utils teachers LESSON "
            "--preset PRESET`."
        )
    model = build(will_train)
    started = time.perf_counter()
    record: dict[str, Any] = {}
    if shipped is not None:
        path, record = shipped
        history = load_checkpoint(model, path).get("history")
        history, source = (pd.DataFrame(history) if history is not None else None), "shipped"
    elif will_train and distributed.is_active():
        history = train(model)
        if distributed.is_main_process():
            save_checkpoint(model, path, recipe=dict(recipe), history=history)
        distributed.barrier()
        if not distributed.is_main_process():
            load_checkpoint(model, path)
        source = "trained"
    else:
        model, history, loaded = load_or_train(model, path, train, recipe=dict(recipe))
        source = "cache" if loaded else "trained"
    freeze(model.to(device))
    model.cache_key = shipped_name.removesuffix(".pt")
    if not quiet and distributed.is_main_process():
        if source == "trained":
            print(f"Trained {name} in {time.perf_counter() - started:.0f} s; saved to {path}")
        else:
            print(f"Loaded {name} from the {'package (shipped)' if source == 'shipped' else 'cache'}: {path}")
    return TrainedModel(model, history, path, source, dict(recipe), record)


def cached_teacher(
    arch: str,
    data: DataSplits | tuple[ImageDataset, ImageDataset],
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    model_options: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    download: bool = False,
    device: DeviceLike = None,
    precision: Precision = None,
    may_train: bool = True,
    progress: bool = True,
) -> TrainedModel:
    """The teacher ``arch`` trained with cross-entropy on ``data.train`` (validated on ``data.val``),
    loaded from the cache or the shipped models when it was trained before with the same recipe
    (:func:`cached_model`).

    ``data`` is the preset's :class:`~kdbook_utils.data.DataSplits` (or a ``(train, val)`` pair). The
    images are augmented with random crops (:func:`default_padding`) and, where it keeps the class, flips.
    ``precision`` is the precision it trains in (None: float32), ``device`` where. ``pretrained=True``
    starts from ImageNet weights (torchvision teachers only: they are looked for in the torch hub cache,
    downloaded only with ``download=True``) and fine-tunes them.
    """
    _check_teacher_call(arch, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    train_data, val_data = data[0], data[1]
    options = dict(model_options or {})
    if pretrained and arch == "torchvision_resnet50":
        options.setdefault("stem", "imagenet")  # the same layout whether built for training or loading
    device = resolve_device(device)
    loader = _loaders(train_data, batch_size, seed, device)
    recipe = {
        "kind": "teacher", "arch": arch, "options": options, "pretrained": pretrained, "epochs": epochs,
        "lr": lr, "batch_size": batch_size, "seed": seed, "train_data": loader.identity,
        "num_classes": train_data.num_classes, "precision": precision_name(precision),
    }  # fmt: skip

    def build(will_train: bool) -> nn.Module:
        seed_everything(seed)
        extra = {"pretrained": True, "download": download} if pretrained and will_train else {}
        return create_model(
            arch, train_data.num_classes, in_channels=train_data.image_shape[0], **options, **extra
        )

    def train(model: nn.Module) -> pd.DataFrame:
        return fit(model, loader, _eval_loader(val_data, device), epochs=epochs, lr=lr, device=device,
                   precision=precision, progress=progress, desc=f"teacher {arch}")  # fmt: skip

    size = train_data.image_shape[-1]
    name = f"{arch}_{train_data.name}{size}px_seed{seed}" + ("_imagenet" if pretrained else "")
    return cached_model(name, recipe, build, train, device=device, may_train=may_train)


def _check_teacher_call(
    arch: Any, data: Any, *, epochs: Any, lr: Any, batch_size: Any, seed: Any
) -> tuple[ImageDataset, ImageDataset]:
    """Refuse a wrong argument of :func:`cached_teacher` before any work, naming the value and the fix."""
    if not isinstance(arch, str):
        seen = Seen(_kind(arch))
        raise TypeError(must_be("cached_teacher's arch", "a model name such as 'resnet8'", seen,
                                "cached_teacher builds and trains the model itself; list_models() lists the "
                                "names. To train a model you built, use fit(model, loader, epochs=...)."))  # fmt: skip
    names = list_models()
    if arch not in names:
        raise ValueError(must_be("cached_teacher's arch", "a registered model name", arch,
                                 f"list_models() lists them.{closest(arch, names)}"))  # fmt: skip
    train, val = train_and_val(data, "cached_teacher")
    check_int("cached_teacher's epochs", epochs, minimum=1, fix="Use e.g. the preset's teacher_epochs.")
    check_number("cached_teacher's lr", lr, above=0.0, fix="It is the SGD learning rate, e.g. 0.05.")
    check_int("cached_teacher's batch_size", batch_size, minimum=1, fix="Use e.g. 128.")
    check_int("cached_teacher's seed", seed, minimum=0, fix="Use e.g. 0.")
    return train, val


def _kind(value: Any) -> str:
    """``"a model (resnet8)"`` for a zoo model, ``"a HintonKD"`` for another module, ``"a float"``..."""
    if isinstance(value, nn.Module) and getattr(value, "arch", None):
        return f"a model ({value.arch})"
    return f"a {type(value).__name__}"


def train_and_val(data: Any, where: str) -> tuple[ImageDataset, ImageDataset]:
    """``(train, val)`` of ``data`` (the preset's :class:`~kdbook_utils.data.DataSplits`, or a pair of
    :class:`~kdbook_utils.data.ImageDataset`); anything else is refused with the fix."""
    rule = "the preset's DataSplits or a (train, val) pair of ImageDatasets"
    fix = "Pass the splits: splits = preset_data(PRESET), then " + f"{where}(..., splits, ...)."
    if isinstance(data, ImageDataset):
        seen = Seen(f"one ImageDataset ({data.name!r} {data.split} split, {len(data)} images)")
        raise TypeError(
            must_be(f"{where}'s data", rule, seen, f"A teacher is validated on held-out images. {fix}")
        )
    if isinstance(data, str):
        raise TypeError(must_be(f"{where}'s data", rule, data, f"A preset's name is not its data. {fix}"))
    if not isinstance(data, (tuple, list)) or len(data) < 2 or not all(isinstance(part, ImageDataset)
                                                                        for part in data[:2]):  # fmt: skip
        kinds = ", ".join(type(part).__name__ for part in data) if isinstance(data, (tuple, list)) else ""
        seen = Seen(
            f"a {type(data).__name__}" + (f" of ({kinds})" if isinstance(data, (tuple, list)) else "")
        )
        raise TypeError(must_be(f"{where}'s data", rule, seen, fix))
    train, val = data[0], data[1]
    if train.num_classes != val.num_classes or train.image_shape != val.image_shape:
        seen = Seen(f"train {train!r} and val {val!r}")
        raise ValueError(must_be(f"{where}'s train and val splits", "of one data set (the same classes and "
                                 "image size)", seen, fix))  # fmt: skip
    return train, val


def _check_splits(data: Any, where: str) -> DataSplits:
    """``data`` if it has the three splits a student run needs (``train``, ``val``, ``test``)."""
    if isinstance(data, DataSplits) or all(isinstance(getattr(data, name, None), ImageDataset)
                                           for name in ("train", "val", "test")):  # fmt: skip
        return data
    seen = Seen(f"one ImageDataset ({data.name!r} {data.split} split)") if isinstance(data, ImageDataset) else (
        Seen(f"a {type(data).__name__} of {len(data)}") if isinstance(data, (tuple, list)) else data)  # fmt: skip
    raise TypeError(must_be(f"{where}'s data", "the preset's DataSplits (train, val and test)", seen,
                            "Pass splits = preset_data(PRESET), or DataSplits(train, val, test)."))  # fmt: skip


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's architecture name and every weight and buffer."""
    digest = hashlib.sha256(str(getattr(model, "arch", type(model).__name__)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def teacher_identity(teacher: nn.Module) -> str:
    """How the recipe of a model derived from ``teacher`` names it: its cache key when it came from
    :func:`cached_model` (the recipe that made it), else a fingerprint of its weights."""
    return str(getattr(teacher, "cache_key", None) or model_fingerprint(teacher))


def cached_teacher_exits(
    teacher: nn.Module,
    data: DataSplits | tuple[ImageDataset, ImageDataset],
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    exits: Sequence[str] | None = None,
    heads: str = "copy",
    joint_from_scratch: bool = False,
    device: DeviceLike = None,
    precision: Precision = None,
    may_train: bool = True,
    progress: bool = True,
) -> TrainedModel:
    """A multi-exit teacher for OtO (lesson 4), cached (its ``model`` is a ``MultiExit``).

    Default: exit heads are attached to a copy of the trained ``teacher`` and trained with cross-entropy
    while its backbone stays frozen (:class:`~kdbook_utils.methods.mskd.ExitHeadsCrossEntropy`), so the
    teacher's last exit is exactly the trained teacher. ``joint_from_scratch=True`` (OtO*): the teacher's
    architecture is re-initialised and backbone and exits are trained together from scratch.
    """
    train_data, val_data = train_and_val(data, "cached_teacher_exits")
    device = resolve_device(device)
    loader = _loaders(train_data, batch_size, seed, device)
    input_shape = train_data.image_shape
    recipe = {
        "kind": "teacher exits", "teacher": teacher_identity(teacher), "exits": list(exits or []),
        "heads": heads, "joint": joint_from_scratch, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "seed": seed, "train_data": loader.identity, "precision": precision_name(precision),
    }  # fmt: skip

    def build(will_train: bool) -> nn.Module:
        seed_everything(seed)
        network = MultiExit(copy.deepcopy(teacher), exits=exits, heads=heads, input_shape=input_shape)
        network.requires_grad_(True)
        if joint_from_scratch and will_train:
            reinitialise(network.backbone)
        return network

    def train(network: nn.Module) -> pd.DataFrame:
        method = MultiExitCrossEntropy(network) if joint_from_scratch else ExitHeadsCrossEntropy(network)
        return fit(method, loader, _eval_loader(val_data, device), epochs=epochs, lr=lr, device=device,
                   precision=precision, progress=progress, desc="teacher exits")  # fmt: skip

    variant = "joint" if joint_from_scratch else "frozen"
    name = f"{getattr(teacher, 'arch', 'teacher')}-exits-{heads}-{variant}_{train_data.name}_seed{seed}"
    return cached_model(name, recipe, build, train, device=device, may_train=may_train)


def cached_adapted_teacher(
    teacher: nn.Module,
    student: nn.Module,
    data: DataSplits | tuple[ImageDataset, ImageDataset],
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    device: DeviceLike = None,
    precision: Precision = None,
    may_train: bool = True,
    progress: bool = True,
) -> TrainedModel:
    """``teacher`` with 1x1-conv channel adapters to ``student``'s widths (lesson 3,
    :func:`~kdbook_utils.methods.crosslayer.adapt_teacher`), fine-tuned with cross-entropy so the
    reduced maps stay useful for the task, then frozen; cached."""
    train_data, val_data = train_and_val(data, "cached_adapted_teacher")
    device = resolve_device(device)
    loader = _loaders(train_data, batch_size, seed, device)
    recipe = {
        "kind": "adapted teacher", "teacher": teacher_identity(teacher), "student": str(getattr(student, "arch", "")),
        "student_points": list(student.feature_points), "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "seed": seed, "train_data": loader.identity, "precision": precision_name(precision),
    }  # fmt: skip

    def build(will_train: bool) -> nn.Module:
        seed_everything(seed)
        adapted = adapt_teacher(copy.deepcopy(teacher), student, train_data.image_shape)
        return adapted.requires_grad_(True)

    def train(adapted: nn.Module) -> pd.DataFrame:
        return fit(adapted, loader, _eval_loader(val_data, device), epochs=epochs, lr=lr, device=device,
                   precision=precision, progress=progress, desc="adapters")  # fmt: skip

    name = f"{getattr(teacher, 'arch', 'teacher')}+adapters_{train_data.name}_seed{seed}"
    return cached_model(name, recipe, build, train, device=device, may_train=may_train)


# --------------------------------------------------------------------------------------------------------
# The teacher-output cache
# --------------------------------------------------------------------------------------------------------


class TeacherCacheMismatch(RuntimeError):
    """A cached entry exists for this position, but the batch being trained on is a different one."""


@dataclass
class _BatchEntry:
    outputs: TeacherOutputs
    labels: Tensor
    image_sums: Tensor  # float64 per-image pixel sums: the guard against another batch under the same key
    bytes: int = 0  # what it counts against max_megabytes


@dataclass
class _ImageStore:
    """One teacher's outputs for every image of an un-augmented data set, filled as batches arrive: the
    logits of every image seen, and each layer's feature maps with their own record of which are filled."""

    logits: list[Tensor]
    labels: Tensor
    filled: Tensor
    image_sums: Tensor  # float64 pixel sum of each image as the loader gave it: the guard on every hit
    features: dict[str, Tensor] = field(default_factory=dict)
    features_filled: dict[str, Tensor] = field(default_factory=dict)
    bytes: int = 0  # what it counts against max_megabytes


def _nbytes(outputs: TeacherOutputs) -> int:
    logits = outputs.logits if isinstance(outputs.logits, list) else [outputs.logits]
    return sum(t.numel() * t.element_size() for t in [*logits, *outputs.features.values()])


def _detached_float(outputs: TeacherOutputs) -> TeacherOutputs:
    logits = outputs.logits
    logits = (
        [t.detach().float() for t in logits] if isinstance(logits, (list, tuple)) else logits.detach().float()
    )
    return TeacherOutputs(logits, {k: v.detach().float() for k, v in outputs.features.items()})


def _weights_state(model: nn.Module) -> tuple:
    """Which storage each weight and buffer of ``model`` uses and how often it was changed in place
    (PyTorch's version counter, bumped by ``load_state_dict``, ``copy_``, an optimiser step...). Equal
    states mean unchanged weights; no value is read, so checking it every batch costs microseconds."""
    state = []
    for tensor in (*model.parameters(), *model.buffers()):
        try:
            version = tensor._version
        except RuntimeError:  # an inference tensor: no version counter, and it cannot change in place
            version = -1
        state.append((tensor.data_ptr(), version))
    return tuple(state)


def _precision(device: torch.device) -> str:
    """The precision teacher outputs are computed in on ``device`` right now: the autocast dtype
    (``fit``'s mixed precision) or ``"float32"`` (the model's own dtypes, which its fingerprint names)."""
    if device.type in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(device.type):
        return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
    return "float32"


def _image_sums(images: Tensor) -> Tensor:
    return images.detach().reshape(images.shape[0], -1).sum(dim=1, dtype=torch.float64)


class TeacherOutputCache:
    """Teacher outputs (logits and feature maps) computed once and reused by every run of a sweep.

    When several students learn from the same frozen teachers on the same data (a sweep over seeds,
    temperatures, loss weights or students), the teachers give the same outputs for the same images, so
    each is computed once. Outputs are keyed by the teacher (a hash of its weights), the precision they
    were computed in (the autocast dtype of ``fit``'s mixed precision, or float32), the layers asked for,
    and the images as the training loader presents them:

    * a loader that does not augment presents each image as it is, so outputs are kept per image (the
      data set's checksum and the image's index) and shared by every seed and every epoch;
    * an augmenting loader presents a new crop every epoch, so outputs are kept per batch (the loader's
      fingerprint, which names data, augmentation, batch size and seed, then the epoch and batch index);
      runs with the same seed share them.

    **Correct by construction.** Every key is checked on every batch, cheaply: the teacher's weights by
    each tensor's storage and in-place version counter (no value read; the hash of the weights is
    computed again only when they changed), the data by the data set's checksum (computed again only when
    its tensors changed), the precision by the autocast state. When the teacher's weights change (a
    checkpoint loaded into it, say), its old outputs are dropped and new ones computed; other data or
    another precision simply are other keys. A guard checks every hit too: the batch's labels and a
    per-image checksum of the pixels must match what was cached, or :class:`TeacherCacheMismatch` is
    raised instead of training on wrong targets. Entries stay in memory, on the device they were computed
    on, up to ``max_megabytes``; beyond that, teachers simply run (a warning says so once).

    Use it through :func:`train_student` (``cache=``), or ``method.use_teacher_cache(cache.for_loader(
    train_loader))`` before ``fit``.
    """

    def __init__(self, max_megabytes: float = 2048) -> None:
        check_number("TeacherOutputCache's max_megabytes", max_megabytes, above=0.0,
                     fix="It is the memory the cache may hold, e.g. 2048 (2 GiB).")  # fmt: skip
        self.max_bytes = int(max_megabytes * 1024**2)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # entries dropped because their teacher's weights changed
        self._fingerprints: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._stores: dict[tuple, _ImageStore] = {}
        self._batches: dict[tuple, _BatchEntry] = {}
        self._warned = False

    def __repr__(self) -> str:
        return (f"TeacherOutputCache({self.bytes / 1024**2:.1f} MiB, {self.hits} hits, "
                f"{self.misses} teacher passes)")  # fmt: skip

    @property
    def teacher_passes(self) -> int:
        """How many batches a teacher had to be run on (cache misses)."""
        return self.misses

    def fingerprint(self, teacher: nn.Module) -> str:
        """The hash of ``teacher``'s weights (:func:`model_fingerprint`), computed again only when they
        changed; the outputs cached for its previous weights are then dropped."""
        state = _weights_state(teacher)
        known = self._fingerprints.get(teacher)
        if known is not None and known[0] == state:
            return known[1]
        fingerprint = model_fingerprint(teacher)
        self._fingerprints[teacher] = (state, fingerprint)
        if known is not None and known[1] != fingerprint:
            self._drop_teacher(known[1])
        return fingerprint

    def _drop_teacher(self, fingerprint: str) -> None:
        """Forget the outputs of weights that no teacher the cache knows has any more."""
        if any(known == fingerprint for _, known in self._fingerprints.values()):
            return
        for entries in (self._stores, self._batches):
            for key in [key for key in entries if key[0] == fingerprint]:
                self.bytes -= entries.pop(key).bytes
                self.dropped += 1

    def for_loader(self, loader: TensorLoader) -> _LoaderView:
        """The cache as seen by a training run over ``loader`` (pass it to ``use_teacher_cache``)."""
        if not isinstance(loader, TensorLoader):
            raise TypeError(must_be("The teacher cache's loader", "a TensorLoader (it knows each batch's images)",
                                    Seen(f"a {type(loader).__name__}"), "Pass the training loader, e.g. "
                                    "TensorLoader(splits.train, 128, train=True, seed=seed)."))  # fmt: skip
        return _LoaderView(self, loader)

    def _room_for(self, size: int) -> bool:
        if self.bytes + size <= self.max_bytes:
            self.bytes += size
            return True
        if not self._warned:
            warnings.warn(
                f"The teacher-output cache is full ({self.max_bytes / 1024**2:.0f} MiB): further teacher "
                "outputs are computed as training goes. Raise max_megabytes to cache more.",
                stacklevel=4,
            )
            self._warned = True
        return False


class _LoaderView:
    """:class:`TeacherOutputCache` for one training loader: finds each batch's images by position."""

    def __init__(self, cache: TeacherOutputCache, loader: TensorLoader) -> None:
        self.cache = cache
        self.loader = loader
        self._order: tuple[int, Tensor] | None = None

    def _indices(self, epoch: int, batch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.loader.epoch_plan(epoch).order.to(self.loader.labels.device))
        start = batch * self.loader.local_batch_size  # under torchrun: this process's slice of the batch
        return self._order[1][start : start + self.loader.local_batch_size]

    def outputs(
        self,
        teacher: nn.Module,
        images: Tensor,
        labels: Tensor,
        layers: tuple[str, ...],
        epoch: int,
        batch: int,
    ) -> TeacherOutputs:
        cache = self.cache
        teacher_id = cache.fingerprint(teacher)
        precision = _precision(images.device)
        if self.loader.augment:
            return self._per_batch(teacher, teacher_id, precision, images, labels, layers, epoch, batch)
        indices = self._indices(epoch, batch)
        key = (teacher_id, self.loader.dataset.digest(), precision)
        store = cache._stores.get(key)
        sums = _image_sums(images)
        if store is not None and len(indices) == len(labels):
            where = indices.to(store.labels.device)
            known = store.filled[where].all() and all(
                layer in store.features and store.features_filled[layer][where].all() for layer in layers
            )
            if bool(known):
                same_images = torch.allclose(sums.to(store.image_sums.device), store.image_sums[where],
                                             rtol=1e-5, atol=1e-3)  # fmt: skip
                if not (same_images and torch.equal(store.labels[where], labels.to(store.labels.device))):
                    raise TeacherCacheMismatch(
                        f"Batch {batch} of epoch {epoch} has other images or labels than the cached images at "
                        "its positions: train with the loader this cache view was made for "
                        "(cache.for_loader(train_loader)), and do not change the images behind PyTorch's "
                        "back (through a NumPy view): make a new data set instead."
                    )
                cache.hits += 1
                logits = [t[where] for t in store.logits]
                return TeacherOutputs(logits if len(logits) > 1 else logits[0],
                                      {layer: store.features[layer][where] for layer in layers})  # fmt: skip
        with torch.no_grad():
            outputs = _detached_float(run_with_features(teacher, images, layers))
        cache.misses += 1
        count = len(self.loader.dataset)
        if store is None:
            every = self._logit_list(outputs)
            size = sum(t[0].numel() * t.element_size() for t in every) * count
            if not cache._room_for(size):
                return outputs
            store = _ImageStore(
                logits=[torch.zeros((count, *t.shape[1:]), device=images.device) for t in every],
                labels=torch.full((count,), -1, dtype=torch.int64, device=images.device),
                filled=torch.zeros(count, dtype=torch.bool, device=images.device),
                image_sums=torch.zeros(count, dtype=torch.float64, device=images.device),
                bytes=size,
            )
            cache._stores[key] = store
        where = indices.to(store.labels.device)
        for target, values in zip(store.logits, self._logit_list(outputs)):
            target[where] = values
        store.labels[where] = labels.to(store.labels.device)
        store.image_sums[where] = sums.to(store.image_sums.device)
        store.filled[where] = True
        for layer, maps in outputs.features.items():
            if layer not in store.features:
                size = maps[0].numel() * maps.element_size() * count
                if not cache._room_for(size):
                    continue
                store.bytes += size
                store.features[layer] = torch.zeros((count, *maps.shape[1:]), device=maps.device)
                store.features_filled[layer] = torch.zeros(count, dtype=torch.bool, device=maps.device)
            store.features[layer][where] = maps
            store.features_filled[layer][where] = True
        return outputs

    @staticmethod
    def _logit_list(outputs: TeacherOutputs) -> list[Tensor]:
        return list(outputs.logits) if isinstance(outputs.logits, (list, tuple)) else [outputs.logits]

    def _per_batch(
        self, teacher: nn.Module, teacher_id: str, precision: str, images: Tensor, labels: Tensor,
        layers: tuple[str, ...], epoch: int, batch: int,
    ) -> TeacherOutputs:  # fmt: skip
        cache = self.cache
        key = (teacher_id, self.loader.fingerprint, precision, epoch, batch)
        sums = _image_sums(images)
        entry = cache._batches.get(key)
        if entry is not None and set(layers) <= set(entry.outputs.features):
            same = entry.labels.shape == labels.shape and torch.equal(
                entry.labels, labels.to(entry.labels.device)
            )
            if not (
                same
                and torch.allclose(sums.to(entry.image_sums.device), entry.image_sums, rtol=1e-5, atol=1e-3)
            ):
                raise TeacherCacheMismatch(
                    f"The teacher cache holds outputs for epoch {epoch}, batch {batch} of this loader, but this "
                    "batch has other images or labels. Train with the loader the cache view was made for."
                )
            cache.hits += 1
            return TeacherOutputs(
                entry.outputs.logits, {layer: entry.outputs.features[layer] for layer in layers}
            )
        with torch.no_grad():
            outputs = _detached_float(run_with_features(teacher, images, layers))
        cache.misses += 1
        size = _nbytes(outputs)
        if cache._room_for(size):
            if entry is not None:  # the same batch with more layers: the new entry replaces it
                cache.bytes -= entry.bytes
            cache._batches[key] = _BatchEntry(outputs, labels.detach().clone(), sums, size)
        return outputs


# --------------------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------------------

FAILED_IF_BELOW_CHANCE_TIMES = 1.5
"""A run whose final accuracy is below 1.5 x chance (15 % for 10 classes) is flagged as failed."""


@dataclass
class StudentRun:
    """One trained student: its network, training history, accuracy per split (and per output for a
    multi-exit student), training time, and whether the run failed (a non-finite loss, or an accuracy at
    or near chance)."""

    model: nn.Module
    history: pd.DataFrame
    accuracy: dict[str, pd.Series]  # split -> accuracy (percent) per output: "final", or exits + "ensemble"
    seconds: float
    failed: str = ""  # why the run failed, or "" if it did not
    logits: dict[str, Any] = field(default_factory=dict)  # split -> (logits or list of exit logits, labels)
    method: nn.Module | None = None  # what trained it (e.g. to read a jointly trained teacher afterwards)

    def rows(self, **labels: Any) -> list[dict[str, Any]]:
        """Tidy rows ``{**labels, split, output, accuracy, seconds, failed}``, one per split and output."""
        return [
            {**labels, "split": split, "output": output, "accuracy": float(value), "seconds": self.seconds,
             "failed": self.failed}
            for split, series in self.accuracy.items()
            for output, value in series.items()
        ]  # fmt: skip


MethodFactory = Callable[[nn.Module], nn.Module]
"""Builds the method that trains a fresh student: ``lambda student: HintonKD(student, teacher)``."""


def train_student(
    build_student: Callable[[], nn.Module],
    method: MethodFactory | None,
    data: DataSplits,
    *,
    seed: int,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    augment: bool = True,
    cache: TeacherOutputCache | None = None,
    splits: Sequence[str] = ("val", "test"),
    keep_logits: bool = False,
    device: DeviceLike = None,
    precision: Precision = None,
    progress: bool = False,
    **fit_options: Any,
) -> StudentRun:
    """Train a fresh student with ``method`` (None: cross-entropy alone) and measure it.

    ``seed`` fixes the student's initialisation and the loader's order and augmentation, so every method
    run with the same seed sees the same batches (a paired comparison), and a ``cache`` filled by one
    run serves the others. ``method(student)`` returns a :class:`~kdbook_utils.train.Distiller` (or the
    network itself for plain training); the trained network is the method's ``student`` (e.g. a
    ``MultiExit`` that the method wrapped around the plain student). The student is measured on
    ``splits`` of ``data``: accuracy in percent per output (a multi-exit student: every exit and their
    ensemble). A run whose loss became NaN or diverged is returned flagged as failed rather than raised.
    ``device`` and ``precision`` are where and how it trains (see :func:`~kdbook_utils.train.fit`); other
    ``fit_options`` go to ``fit`` too (e.g. ``grad_clip=1.0``).
    """
    _check_student_call(build_student, method, data, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                        cache=cache, splits=splits)  # fmt: skip
    device = resolve_device(device)
    loader = _loaders(data.train, batch_size, seed, device, augment=augment)
    seed_everything(seed)
    student = build_student()
    trainer = as_method(method(student) if method is not None else student)
    if cache is not None and len(trainer.teachers) and not trainer.teacher_trains:
        trainer.use_teacher_cache(cache.for_loader(loader))
    started = time.perf_counter()
    failed = ""
    try:
        history = fit(trainer, loader, epochs=epochs, lr=lr, device=device, precision=precision,
                      progress=progress, **fit_options)  # fmt: skip
    except NonFiniteLossError as error:  # NaN, or diverged
        history = getattr(error, "history", pd.DataFrame())
        failed = f"{'diverged' if isinstance(error, DivergedError) else 'non-finite loss'} ({error})"
    finally:
        trainer.use_teacher_cache(None)
    seconds = time.perf_counter() - started
    network = trainer.student
    accuracy, logits = {}, {}
    for split in splits:
        split_data = getattr(data, split)
        outputs, labels = predict(network, _eval_loader(split_data, device), device=device)
        if isinstance(outputs, list):
            accuracy[split] = exit_accuracies(outputs, labels, output_names(network, len(outputs)))
        else:
            accuracy[split] = pd.Series(
                {"final": 100.0 * (outputs.argmax(1) == labels).double().mean().item()}
            )
        if keep_logits:
            logits[split] = (outputs, labels)
    if not failed and splits:
        chance = 100.0 / data.train.num_classes
        final = float(accuracy[splits[0]]["final"])
        if not math.isfinite(final) or final < FAILED_IF_BELOW_CHANCE_TIMES * chance:
            failed = f"accuracy {final:.1f} % on {splits[0]} is at or near chance ({chance:.0f} %)"
    return StudentRun(network, history, accuracy, seconds, failed, logits, trainer)


SPLIT_NAMES = ("train", "val", "test")


def _check_student_call(
    build_student: Any, method: Any, data: Any, *, seed: Any, epochs: Any, lr: Any, batch_size: Any,
    cache: Any, splits: Any,
) -> None:  # fmt: skip
    """Refuse a wrong argument of :func:`train_student` before any work, naming the value and the fix."""
    if isinstance(build_student, nn.Module) or not callable(build_student):
        what = (
            ": every seed would go on training the same one" if isinstance(build_student, nn.Module) else ""
        )
        raise TypeError(must_be("train_student's build_student", "a function that makes a fresh student",
                                Seen(f"{_kind(build_student)}{what}"),
                                "Pass e.g. lambda: create_model('resnet8', 10)."))  # fmt: skip
    if method is not None and (isinstance(method, nn.Module) or not callable(method)):
        what = " (a method already built around one student)" if isinstance(method, nn.Module) else ""
        raise TypeError(must_be("train_student's method", "None (cross-entropy alone) or a function "
                                "student -> method", Seen(f"{_kind(method)}{what}"),
                                "Pass e.g. lambda student: HintonKD(student, teacher)."))  # fmt: skip
    _check_splits(data, "train_student")
    check_int("train_student's seed", seed, minimum=0, fix="Use e.g. 0; run_seeds runs several.")
    check_int("train_student's epochs", epochs, minimum=1, fix="Use e.g. the preset's student_epochs.")
    check_number("train_student's lr", lr, above=0.0, fix="It is the SGD learning rate, e.g. 0.05.")
    check_int("train_student's batch_size", batch_size, minimum=1, fix="Use e.g. 128.")
    if cache is not None and not isinstance(cache, TeacherOutputCache):
        raise TypeError(must_be("train_student's cache", "None or a TeacherOutputCache",
                                Seen(f"a {type(cache).__name__}"), "Pass cache=TeacherOutputCache()."))  # fmt: skip
    if (
        isinstance(splits, str)
        or not isinstance(splits, Sequence)
        or any(split not in SPLIT_NAMES for split in splits)
    ):
        raise (ValueError if isinstance(splits, Sequence) and not isinstance(splits, str) else TypeError)(
            must_be("train_student's splits", "a tuple of split names from 'train', 'val', 'test'", splits,
                    "Use e.g. ('val', 'test'), or () to measure nothing."))  # fmt: skip


def run_seeds(
    methods: Mapping[str, Callable[[int], StudentRun]],
    seeds: Sequence[int],
    *,
    progress: bool = True,
    keep: dict[tuple[str, int], StudentRun] | None = None,
    **labels: Any,
) -> pd.DataFrame:
    """Run every method once per seed: one tidy table, a row per (method, seed, split, output).

    ``methods`` maps a method's name to ``run(seed) -> StudentRun`` (usually a call of
    :func:`train_student`). Columns: ``labels`` (e.g. ``lesson="hinton"``), ``method``, ``seed``,
    ``split``, ``output``, ``accuracy`` (percent), ``seconds``, ``failed`` (why, or ""). With ``keep``, each
    run is also stored there under ``(method, seed)`` (to plot its history or reuse its network); a run
    already in ``keep`` is not repeated.
    """
    seeds = _check_run_seeds_call(methods, seeds, keep)
    jobs = [(name, seed) for seed in seeds for name in methods]
    rows: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="student runs", unit="run", disable=not progress)
    for name, seed in bar:
        bar.set_postfix_str(f"{name}, seed {seed}", refresh=False)
        run = keep.get((name, seed)) if keep is not None else None
        if run is None:
            run = methods[name](seed)
            if not callable(getattr(run, "rows", None)):  # a StudentRun, or a lesson's own run (lesson 5)
                raise TypeError(must_be(f"run_seeds' method {name!r}", "a function seed -> StudentRun",
                                        Seen(f"a function that returned a {type(run).__name__}"),
                                        "Return the run, e.g. lambda seed: train_student(..., seed=seed)."))  # fmt: skip
            if keep is not None:
                keep[(name, seed)] = run
        rows += run.rows(**labels, method=name, seed=seed)
    return pd.DataFrame(rows)


def _check_run_seeds_call(methods: Any, seeds: Any, keep: Any) -> list[int]:
    """The seeds of a :func:`run_seeds` call as a list, after refusing a wrong argument with the fix."""
    if not isinstance(methods, Mapping):
        raise TypeError(must_be("run_seeds' methods", "a dict {name: function seed -> StudentRun}",
                                Seen(f"a {type(methods).__name__}"), "Pass e.g. {'student alone': lambda seed: "
                                "train_student(build, None, splits, seed=seed, epochs=8)}."))  # fmt: skip
    if not methods:
        raise ValueError(
            must_be("run_seeds' methods", "a non-empty dict", methods, "Give at least one method.")
        )
    wrong = [name for name, run in methods.items() if not callable(run) or isinstance(run, StudentRun)]
    if wrong:
        raise TypeError(must_be(f"run_seeds' method {wrong[0]!r}", "a function seed -> StudentRun",
                                Seen(f"a {type(methods[wrong[0]]).__name__}"), "Wrap the call: lambda seed: "
                                "train_student(..., seed=seed), so that each seed trains its own run."))  # fmt: skip
    rule = "a sequence of seeds (non-negative integers)"
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, range)):
        fix = (
            f"Use e.g. seeds=(0, 1, 2) or seeds=range({seeds})."
            if isinstance(seeds, int)
            else "Use e.g. (0, 1, 2)."
        )
        raise TypeError(must_be("run_seeds' seeds", rule, seeds, fix))
    if len(seeds) == 0:
        raise ValueError(must_be("run_seeds' seeds", "at least one seed", seeds, "Use e.g. seeds=(0, 1, 2)."))
    checked = [
        check_int("each of run_seeds' seeds", seed, minimum=0, fix="Use e.g. (0, 1, 2).") for seed in seeds
    ]
    repeated = sorted({seed for seed in checked if checked.count(seed) > 1})
    if repeated:
        raise ValueError(must_be("run_seeds' seeds", "distinct (each seed once)", seeds,
                                 f"Remove the repeats of {repeated}: a comparison pairs runs by seed."))  # fmt: skip
    if keep is not None and not isinstance(keep, dict):
        raise TypeError(must_be("run_seeds' keep", "None or a dict", Seen(f"a {type(keep).__name__}"),
                                "Pass keep={} to collect the runs by (method, seed)."))  # fmt: skip
    return checked


# --------------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------------

VERDICTS = ("better", "worse", "inconclusive")


@dataclass
class Comparison:
    """Methods compared with a baseline over seeds (see :func:`compare`): ``table`` has one row per
    method, ``pairs`` the per-seed differences."""

    table: pd.DataFrame
    pairs: pd.DataFrame
    baseline: str
    metric: str
    split: str

    def verdict(self, method: str) -> str:
        """``"better"``, ``"worse"``, ``"inconclusive"``, ``"no verdict"`` (too few paired seeds) or
        ``"failed"`` for ``method`` against the baseline."""
        return str(self.table.loc[method, "verdict"])

    def sentence(self, method: str) -> str:
        """One Markdown sentence stating the comparison of ``method`` with the baseline, numbers included."""
        row = self.table.loc[method]
        base = self.table.loc[self.baseline]
        head = (f"**{method}** reached {row['mean']:.1f} ± {row['std']:.1f} % against "
                f"{base['mean']:.1f} ± {base['std']:.1f} % for **{self.baseline}**")  # fmt: skip
        verdict = row["verdict"]
        if verdict == "failed":
            return f"**{method}**: {row['failed']} run(s) failed ({row['why']}); its numbers are not interpreted."
        if verdict == "no verdict":
            if int(row["seeds"]) == 0:
                return (f"{head} ({self.split} split): there is no seed on which both ran without failing, so "
                        "there is no verdict.")  # fmt: skip
            return (f"{head} ({self.split} split, {int(row['seeds'])} paired seed): one seed cannot separate a "
                    "gain from seed noise, so there is no verdict.")  # fmt: skip
        interval = (f"mean paired difference {row['difference']:+.1f} points, 95 % interval "
                    f"[{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] over {int(row['seeds'])} seeds")  # fmt: skip
        width = row["ci_high"] - row["ci_low"]
        words = {
            "better": "better than the baseline: the whole interval lies above zero",
            "worse": "worse than the baseline: the whole interval lies below zero",
            "inconclusive": f"inconclusive: the interval, {width:.1f} points wide, contains zero, so the difference "
            "cannot be told apart from seed noise",
        }[verdict]
        return f"{head} on the {self.split} split; {interval}: **{words}**."

    def summary(self) -> str:
        """Markdown: one sentence per method other than the baseline."""
        return "\n".join(
            f"- {self.sentence(method)}" for method in self.table.index if method != self.baseline
        )


def _check_runs_table(runs: Any, function: str, columns: Sequence[str]) -> None:
    """``runs`` must be a non-empty table (a DataFrame) with ``columns``."""
    where = f"{function}'" if function.endswith("s") else f"{function}'s"
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(must_be(f"{where} runs", "a table of runs (a pandas DataFrame, as run_seeds makes)",
                                Seen(f"a {type(runs).__name__}"), "Pass the table run_seeds (or a lesson) returned."))  # fmt: skip
    if runs.empty:
        raise ValueError(must_be(f"{where} runs", "a table with at least one run",
                                 Seen(f"an empty table (columns {list(runs.columns)})"),
                                 "Run the experiment first (run_seeds, or the lesson's sweep), then pass its table."))  # fmt: skip
    missing = [column for column in columns if column not in runs.columns]
    if missing:
        raise ValueError(must_be(f"{where} runs", f"a table with the columns {list(columns)}",
                                 Seen(f"a table without {missing} (it has {list(runs.columns)})"),
                                 "Pass the table run_seeds returned, or name the columns to use."))  # fmt: skip


def best_on_validation(runs: pd.DataFrame, by: str | list[str], what: str) -> Any:
    """The value of ``by`` (a column, or a tuple of columns) whose runs have the best mean validation accuracy,
    failed runs left out: the way every lesson makes a choice, never on the test split.

    If every run failed, the choice means nothing: it warns, and takes the best of the failed runs only so
    that the lesson can run on (its tables flag those runs). ``what`` names the choice in messages."""
    columns = [by] if isinstance(by, str) else by
    if not isinstance(columns, (list, tuple)) or not columns or not all(isinstance(c, str) for c in columns):
        raise TypeError(must_be("best_on_validation's by", "a column name or a list of them", by,
                                "Use e.g. 'method', or ['T', 'alpha']."))  # fmt: skip
    _check_runs_table(runs, "best_on_validation", ["split", "accuracy", "failed", *columns])
    val = runs[(runs["split"] == "val") & runs[columns].notna().all(axis=1)]
    if val.empty:
        raise ValueError(f"There is no run on the validation split to choose the {what} from: give the runs "
                         "a validation split (a preset with val_size > 0).")  # fmt: skip
    if (val["failed"] == "").any():
        val = val[val["failed"] == ""]
    else:
        warnings.warn(
            f"Every run that could choose the {what} failed (see the 'failed' column), so the choice means "
            "nothing; the lesson runs on with the best of the failed runs. Train longer (a larger preset, "
            "more epochs) for a real choice.",
            RuntimeWarning,
            stacklevel=2,
        )
    means = val.groupby(by)["accuracy"].mean()
    if means.isna().all():
        raise ValueError(must_be(f"The validation accuracy to choose the {what} from", "a number for some run",
                                 Seen("NaN in every run"), "Flag diverged runs as failed (their 'failed' column "
                                 "says why) or drop them: runs.dropna(subset=['accuracy'])."))  # fmt: skip
    return means.idxmax()


def _check_compare_call(runs: Any, by: str, metric: str, confidence: Any, methods: Any) -> None:
    _check_runs_table(runs, "compare", [by, "seed", metric])
    if not pd.api.types.is_numeric_dtype(runs[metric]):
        example = next((value for value in runs[metric] if not isinstance(value, (int, float))), None)
        raise TypeError(must_be(f"compare's {metric} column", "numbers",
                                Seen(f"{runs[metric].dtype} values such as {example!r}"),
                                f"Convert it first, e.g. runs[{metric!r}] = pd.to_numeric(runs[{metric!r}]); "
                                "read results files with read_results, which checks them."))  # fmt: skip
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(must_be("compare's confidence", "a fraction between 0 and 1", confidence,
                                 "Use e.g. 0.95 for a 95 % interval."))  # fmt: skip
    if isinstance(methods, str):
        raise TypeError(
            must_be("compare's methods", "a list of method names", methods, f"Use [{methods!r}].")
        )


def _refuse_what_cannot_be_judged(
    table: pd.DataFrame, failed: pd.Series, names: list[str], baseline: Any, by: str, metric: str,
    everything: pd.DataFrame,
) -> None:  # fmt: skip
    """A comparison pairs one run per seed and method: refuse NaN results that are not flagged as failed,
    a seed that appears more than once for a method, and a method that shares no seed with the baseline."""
    chosen = table[table[by].isin(names)]
    values = chosen[metric].astype(float)
    unflagged = chosen[~failed[chosen.index] & ~values.apply(math.isfinite)]
    if not unflagged.empty:
        name = unflagged[by].iloc[0]
        mine = unflagged[unflagged[by] == name]
        seen = Seen(f"{mine[metric].iloc[0]} in {len(mine)} run(s) of {name!r} (seed(s) {sorted(mine['seed'])}), "
                    "not flagged as failed")  # fmt: skip
        raise ValueError(must_be(f"compare's {metric} of every run not flagged as failed", "a finite number", seen,
                                 "A verdict cannot come from NaN: flag such runs as failed (runs.loc[mask, 'failed'] "
                                 f"= 'diverged'), so they are counted and left out, or drop them: "
                                 f"runs.dropna(subset=[{metric!r}])."))  # fmt: skip
    counts = chosen.groupby([by, "seed"], sort=False).size()
    repeated = counts[counts > 1]
    if not repeated.empty:
        (name, seed), times = repeated.index[0], int(repeated.iloc[0])
        rows = chosen[(chosen[by] == name) & (chosen["seed"] == seed)]
        differing = [column for column in everything.columns
                     if column not in (metric, "seconds", "failed") and rows[column].nunique(dropna=False) > 1]  # fmt: skip
        if "stage" in differing:
            fix = (f"The table holds several stages ({', '.join(map(str, dict.fromkeys(everything['stage'])))}): "
                   "compare one, e.g. runs[runs['stage'] == 'final'].")  # fmt: skip
        elif differing:
            fix = f"Its rows differ in {differing}: select one value of each first, e.g. runs[runs[{differing[0]!r}] == ...]."
        else:
            fix = "Remove the repeated rows, e.g. runs.drop_duplicates()."
        raise ValueError(must_be("compare's runs", "one run per method and seed (runs are paired by seed)",
                                 Seen(f"seed {seed} of {name!r} {times} times"), fix))  # fmt: skip
    base_seeds = set(chosen.loc[chosen[by] == baseline, "seed"])
    for name in names:
        mine = set(chosen.loc[chosen[by] == name, "seed"])
        if name != baseline and not mine & base_seeds:
            seen = Seen(
                f"no seed in common: {name!r} ran seeds {sorted(mine)}, {baseline!r} ran {sorted(base_seeds)}"
            )
            raise ValueError(must_be(f"compare's runs of {name!r} and of the baseline", "paired by seed", seen,
                                     "Run both with the same seeds, e.g. run_seeds({...}, seeds=(0, 1, 2))."))  # fmt: skip


def compare(
    runs: pd.DataFrame,
    baseline: str,
    *,
    split: str = "test",
    output: str | None = None,
    methods: Sequence[str] | None = None,
    by: str = "method",
    metric: str = "accuracy",
    confidence: float = 0.95,
) -> Comparison:
    """Compare every method of ``runs`` with ``baseline``, pairing runs by seed.

    ``runs`` is a tidy table (:func:`run_seeds`). For ``split`` (and ``output``: default ``"final"`` where
    present, else each method's single output), each method gets its mean ± std over seeds; then, over
    the seeds both it and the baseline ran without failing, the mean paired difference
    ``d = method - baseline`` with its ``confidence`` interval from Student's t distribution
    (``mean(d) ± t_{n-1} * std(d) / sqrt(n)``), and a verdict in words chosen by the numbers: ``better``
    (the interval lies above zero), ``worse`` (below zero), ``inconclusive`` (it contains zero: the
    difference cannot be told apart from seed noise), ``no verdict`` (fewer than two paired seeds), or
    ``failed`` (every run of the method failed). Failed runs are counted and left out of the statistics.

    What cannot be judged is refused with an error rather than given a verdict: a NaN or infinite result
    in a run not flagged as failed, a seed that appears twice for one method (e.g. a table holding two
    stages of a lesson), and a method that shares no seed with the baseline.
    """
    _check_compare_call(runs, by, metric, confidence, methods)
    table = runs[runs["split"] == split] if "split" in runs.columns else runs
    if "output" in table.columns:
        wanted = output or "final"
        per_method = table.groupby(by)["output"].unique()
        chosen = {m: (wanted if wanted in outs else outs[-1]) for m, outs in per_method.items()}
        table = table[[chosen[m] == o for m, o in zip(table[by], table["output"])]]
    if table.empty:
        raise ValueError(
            f"No runs for split {split!r}; the runs have splits {sorted(runs.get('split', pd.Series()).unique())}."
        )
    table = table.reset_index(
        drop=True
    )  # rows are told apart by position (a concatenated table repeats labels)
    names = list(methods) if methods is not None else list(dict.fromkeys(table[by]))
    if baseline not in names:
        names.insert(0, baseline)
    known = set(table[by])
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"No runs of {missing}; the runs have {sorted(known)}.{closest(missing[0], known)}")
    failed = (
        table["failed"].astype(bool) if "failed" in table.columns else pd.Series(False, index=table.index)
    )
    _refuse_what_cannot_be_judged(table, failed, names, baseline, by, metric, runs)
    good = table[~failed]
    base = good[good[by] == baseline].set_index("seed")[metric]
    rows, pairs = {}, []
    for name in names:
        mine_all = table[table[by] == name]
        mine = good[good[by] == name].set_index("seed")[metric]
        row: dict[str, Any] = {"mean": mine.mean(), "std": mine.std(ddof=1) if len(mine) > 1 else 0.0,
                               "seeds": len(mine), "failed": int(failed[mine_all.index].sum()),
                               "why": "; ".join(sorted(set(mine_all.loc[failed[mine_all.index], "failed"])))
                               if "failed" in mine_all.columns else ""}  # fmt: skip
        if name == baseline:
            row.update(difference=0.0, ci_low=math.nan, ci_high=math.nan, verdict="baseline")
        elif len(mine) == 0:
            row.update(difference=math.nan, ci_low=math.nan, ci_high=math.nan, verdict="failed")
        else:
            common = mine.index.intersection(base.index)
            differences = (mine[common] - base[common]).astype(float)
            pairs += [{"method": name, "seed": seed, "difference": d} for seed, d in differences.items()]
            row.update(paired_interval(differences.to_numpy(), confidence))
            row["seeds"] = len(common)  # the paired seeds: what the interval is over
        rows[name] = row
    summary = pd.DataFrame.from_dict(rows, orient="index")
    summary.index.name = by
    return Comparison(
        summary, pd.DataFrame(pairs, columns=["method", "seed", "difference"]), baseline, metric, split
    )


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences, its two-sided t interval and the verdict (see :func:`compare`).

    Every difference must be a finite number (a verdict never comes from NaN)."""
    if isinstance(differences, (str, bytes)) or not hasattr(differences, "__len__"):
        raise TypeError(must_be("paired_interval's differences", "a sequence of numbers", differences,
                                "Pass one difference per seed, e.g. [1.2, 0.4, 2.0]."))  # fmt: skip
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(must_be("paired_interval's confidence", "a fraction between 0 and 1", confidence,
                                 "Use e.g. 0.95 for a 95 % interval."))  # fmt: skip
    values = [check_number("each of paired_interval's differences", d,
                           fix="A verdict cannot come from NaN: leave failed runs out first.") for d in differences]  # fmt: skip
    count = len(values)
    mean = sum(values) / count if count else math.nan
    if count < 2:
        return {"difference": mean, "ci_low": math.nan, "ci_high": math.nan, "verdict": "no verdict"}
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, count - 1)) * spread / math.sqrt(count)
    low, high = mean - half, mean + half
    verdict = "better" if low > 0 else "worse" if high < 0 else "inconclusive"
    return {"difference": mean, "ci_low": low, "ci_high": high, "verdict": verdict}


# --------------------------------------------------------------------------------------------------------
# Recorded results
# --------------------------------------------------------------------------------------------------------

RESULT_COLUMNS = ("lesson", "stage", "method", "seed", "split", "output", "accuracy", "seconds", "failed")
"""The columns every results file has (a lesson may add its own, e.g. a sweep's ``T`` and ``alpha``)."""


def machine_description() -> str:
    """The hardware a run used, in words: the CPU model and core count, and the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    description = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        description += f", GPU {torch.cuda.get_device_name(0)}"
    return description


def git_commit(folder: Path | None = None) -> str:
    """The repository's current commit (with ``+changes`` when the tree differs from it), or ``unknown``."""
    folder = folder or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


class ResultsFileError(ValueError):
    """A results file that cannot be trusted: cut short, re-saved by a spreadsheet, edited by hand, or not
    the table its provenance describes. The message names the file and what is wrong with it."""


def check_results_folder(folder: str | os.PathLike) -> Path:
    """``folder`` when results files can be written there (it may not exist yet), else a clear error.

    Called before an experiment runs, so that a wrong output path is refused in a second instead of after
    hours of training: ``NotADirectoryError`` when the path (or a folder above it) is a file,
    ``PermissionError`` when it (or the folder it would be made in) cannot be written. Nothing is created."""
    folder = Path(folder).expanduser()
    fix = "Choose a folder you can write, e.g. results/."
    existing = next(part for part in (folder, *folder.parents) if part.exists())
    if not existing.is_dir():
        where = "a file" if existing == folder else f"inside {existing}, which is a file"
        raise NotADirectoryError(
            must_be("The results folder", "a folder", Seen(f"{str(folder)!r} ({where})"), fix)
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f", inside {existing}"
        raise PermissionError(must_be("The results folder", "a folder you can write",
                                      Seen(f"{str(folder)!r} (read-only{where})"), fix))  # fmt: skip
    return folder


def _write_temporary(target: Path, data: bytes) -> Path:
    """``data`` written and flushed to disk in a temporary file beside ``target``; its path."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


TABLE_KEY = "results_table"
"""The provenance key describing its table: rows, columns and the SHA-256 of the CSV's bytes."""


def write_results(runs: pd.DataFrame, path: Path, provenance: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write a results table (``<path>.csv``, one row per run) and its provenance (``<path>.json``), each
    atomically. The table must have :data:`RESULT_COLUMNS`. Under ``torchrun`` only process 0 writes
    (the others wait until the files are there).

    Both files are written in full to temporary files first, then renamed over the old ones, so an
    interrupted write leaves the old files (or, if it stops between the two renames, a table that no
    longer matches its provenance, which :func:`read_results` refuses): the provenance records the
    table's rows, columns and SHA-256."""
    _check_runs_table(runs, "write_results", RESULT_COLUMNS)
    if not pd.api.types.is_numeric_dtype(runs["accuracy"]):
        raise TypeError(must_be("write_results' accuracy column", "numbers (percent)",
                                Seen(f"{runs['accuracy'].dtype} values"), "Convert it: pd.to_numeric(...)."))  # fmt: skip
    if not isinstance(provenance, Mapping):
        raise TypeError(must_be("write_results' provenance", "a dict", Seen(f"a {type(provenance).__name__}"),
                                "Pass e.g. run_provenance(...)."))  # fmt: skip
    path = Path(path)
    table_path, meta_path = path.with_suffix(".csv"), path.with_suffix(".json")
    if not distributed.is_main_process():
        distributed.barrier()
        return table_path, meta_path
    check_results_folder(path.parent).mkdir(parents=True, exist_ok=True)
    table = runs.to_csv(index=False, lineterminator="\n").encode()
    described = {**dict(provenance), TABLE_KEY: {"rows": len(runs), "columns": [str(c) for c in runs.columns],
                                                 "sha256": hashlib.sha256(table).hexdigest()}}  # fmt: skip
    meta = json.dumps(described, indent=1, sort_keys=True, default=str).encode()
    temporaries: list[tuple[Path, Path]] = []
    try:
        for target, data in ((table_path, table), (meta_path, meta)):
            temporaries.append((_write_temporary(target, data), target))
        for temporary, target in temporaries:
            os.replace(temporary, target)
    finally:
        for temporary, _ in temporaries:
            temporary.unlink(missing_ok=True)
    distributed.barrier()
    return table_path, meta_path


def read_results(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A results table and its provenance, as :func:`write_results` wrote them.

    Read strictly: a file that is missing raises ``FileNotFoundError``; one that is cut short (a last
    row without its line break or with missing fields), separated by ``;`` or tabs, has values that are
    not numbers (``81.0%``), misses or repeats columns, has columns or rows its provenance does not list,
    or differs from the bytes its provenance describes, raises :class:`ResultsFileError` naming the file
    and what is wrong. Nothing is guessed or filled in."""
    path = Path(path)
    table_path, meta_path = path.with_suffix(".csv"), path.with_suffix(".json")
    for needed in (table_path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"No recorded results at {needed}: write them with python -m kdbook_utils run "
                                    "LESSON --out FOLDER (or record).")  # fmt: skip
    try:
        provenance = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ResultsFileError(f"{meta_path} is not valid JSON ({error}): it was cut short or edited. Regenerate "
                               "the results with the command that wrote them.") from error  # fmt: skip
    if not isinstance(provenance, dict):
        raise ResultsFileError(f"{meta_path} holds a JSON {type(provenance).__name__}, not the provenance "
                               "object write_results writes. Regenerate the results.")  # fmt: skip
    command = provenance.get("command")
    regenerate = f"Regenerate it: {command}." if command else "Regenerate it with the command that wrote it."
    data = table_path.read_bytes()
    _check_table_text(table_path, data, provenance, regenerate)
    runs = pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""], dtype={"failed": str})
    _check_table_values(table_path, runs, regenerate)
    _check_table_bytes(table_path, data, provenance, regenerate)
    runs["failed"] = runs["failed"].fillna("").astype(str)
    runs["seed"] = runs["seed"].astype(int)
    return runs, provenance


def _check_table_text(table_path: Path, data: bytes, provenance: dict[str, Any], regenerate: str) -> None:
    """The CSV's shape: UTF-8, comma-separated, every row complete, the columns its provenance lists."""

    def refuse(what: str, fix: str = regenerate) -> ResultsFileError:
        return ResultsFileError(f"{table_path} {what}. {fix}")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise refuse(f"is not UTF-8 text ({error})") from error
    if not text.strip():
        raise refuse("is empty")
    lines = list(csv.reader(io.StringIO(text, newline="")))
    header = lines[0]
    if len(header) == 1 and any(mark in header[0] for mark in (";", "\t")):
        mark = "';'" if ";" in header[0] else "tabs"
        raise refuse(f"is separated by {mark}, not by commas (a spreadsheet re-saved it?): its header is "
                     f"{header[0][:60]!r}", f"{regenerate} Or save it from the spreadsheet as comma-separated CSV "
                     "with '.' as the decimal point.")  # fmt: skip
    unnamed = [index for index, name in enumerate(header) if not name.strip()]
    if unnamed:
        raise refuse(f"has a column without a name (column {unnamed[0] + 1}; saved with its index?)")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise refuse(f"repeats the columns {repeated}")
    missing = [column for column in RESULT_COLUMNS if column not in header]
    if missing:
        raise refuse(f"lacks the columns {missing} (it has {header})")
    for number, row in enumerate(lines[1:], start=2):
        if len(row) != len(header):
            last = number == len(lines)
            why = " (its last line: the file was cut short, by an interrupted write or copy)" if last else ""
            raise refuse(f"has {len(row)} fields on line {number} where its header has {len(header)}{why}")
    if not text.endswith("\n"):
        raise refuse(f"ends in the middle of line {len(lines)} (no line break after it): the file was cut short "
                     "(an interrupted write or copy)")  # fmt: skip
    described = provenance.get(TABLE_KEY)
    if isinstance(described, dict):  # files written before it was recorded are checked on their contents only
        columns = list(described.get("columns", header))
        extra = [name for name in header if name not in columns]
        if extra or [name for name in columns if name not in header]:
            raise refuse(f"has the columns {header}, but its provenance lists {columns}"
                         + (f" (extra: {extra})" if extra else ""))  # fmt: skip
        rows = described.get("rows")
        if rows is not None and rows != len(lines) - 1:
            raise refuse(f"has {len(lines) - 1} rows, but its provenance recorded {rows}")


def _check_table_bytes(table_path: Path, data: bytes, provenance: dict[str, Any], regenerate: str) -> None:
    """Last, after the checks that say what is wrong: the bytes must be those its provenance describes."""
    described = provenance.get(TABLE_KEY)
    if isinstance(described, dict) and described.get("sha256") not in (
        None,
        hashlib.sha256(data).hexdigest(),
    ):
        raise ResultsFileError(f"{table_path} does not match its provenance (the SHA-256 of its bytes differs): it "
                               "was edited, or a write was interrupted between the table and its .json. "
                               f"{regenerate}")  # fmt: skip


def _check_table_values(table_path: Path, runs: pd.DataFrame, regenerate: str) -> None:
    """The values: numbers where numbers belong, accuracies in percent, seeds whole, NaN only where flagged."""
    for column, rule in (("accuracy", "a number (percent, without a % sign)"), ("seconds", "a number"),
                         ("seed", "a whole number")):  # fmt: skip
        values = pd.to_numeric(runs[column], errors="coerce")
        bad = runs[column][values.isna() & runs[column].notna()]
        if column == "seed":
            bad = runs[column][values.isna() | (values % 1 != 0) | (values < 0)]
        if not bad.empty:
            line = int(bad.index[0]) + 2
            raise ResultsFileError(f"{table_path} has {column} {bad.iloc[0]!r} on line {line}, which is not {rule}. "
                                   f"{regenerate}")  # fmt: skip
        runs[column] = values
    failed = runs["failed"].fillna("").astype(str) != ""
    outside = runs[(runs["accuracy"] < 0) | (runs["accuracy"] > 100)]
    if not outside.empty:
        raise ResultsFileError(f"{table_path} has accuracy {outside['accuracy'].iloc[0]} on line "
                               f"{int(outside.index[0]) + 2}, outside 0..100 (accuracies are in percent). {regenerate}")  # fmt: skip
    unflagged = runs[runs["accuracy"].isna() & ~failed]
    if not unflagged.empty:
        raise ResultsFileError(f"{table_path} has no accuracy on line {int(unflagged.index[0]) + 2}, and the run "
                               f"is not flagged as failed (its 'failed' column is empty). {regenerate}")  # fmt: skip
