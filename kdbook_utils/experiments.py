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
import hashlib
import json
import math
import os
import platform
import subprocess
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
from kdbook_utils.methods.crosslayer import adapt_teacher
from kdbook_utils.methods.mskd import ExitHeadsCrossEntropy, MultiExitCrossEntropy, exit_accuracies
from kdbook_utils.models import create_model
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
    "StudentRun",
    "TeacherOutputCache",
    "TrainedModel",
    "cached_adapted_teacher",
    "cached_model",
    "cached_teacher",
    "cached_teacher_exits",
    "compare",
    "default_padding",
    "run_seeds",
    "train_student",
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
    train_data, val_data = data[0], data[1]
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
    train_data, val_data = data[0], data[1]
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


@dataclass
class _ImageStore:
    """One teacher's outputs for every image of an un-augmented data set, filled as batches arrive: the
    logits of every image seen, and each layer's feature maps with their own record of which are filled."""

    logits: list[Tensor]
    labels: Tensor
    filled: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    features_filled: dict[str, Tensor] = field(default_factory=dict)


def _nbytes(outputs: TeacherOutputs) -> int:
    logits = outputs.logits if isinstance(outputs.logits, list) else [outputs.logits]
    return sum(t.numel() * t.element_size() for t in [*logits, *outputs.features.values()])


def _detached_float(outputs: TeacherOutputs) -> TeacherOutputs:
    logits = outputs.logits
    logits = (
        [t.detach().float() for t in logits] if isinstance(logits, (list, tuple)) else logits.detach().float()
    )
    return TeacherOutputs(logits, {k: v.detach().float() for k, v in outputs.features.items()})


class TeacherOutputCache:
    """Teacher outputs (logits and feature maps) computed once and reused by every run of a sweep.

    When several students learn from the same frozen teachers on the same data (a sweep over seeds,
    temperatures, loss weights or students), the teachers give the same outputs for the same images, so
    each is computed once. Outputs are keyed by the teacher (a hash of its weights), the layers asked
    for, and the images as the training loader presents them:

    * a loader that does not augment presents each image as it is, so outputs are kept per image (the
      data set's checksum and the image's index) and shared by every seed and every epoch;
    * an augmenting loader presents a new crop every epoch, so outputs are kept per batch (the loader's
      fingerprint, which names data, augmentation, batch size and seed, then the epoch and batch index);
      runs with the same seed share them.

    A guard checks every hit: the batch's labels (and for augmented batches a per-image checksum of the
    pixels) must match what was cached, or :class:`TeacherCacheMismatch` is raised instead of training on
    wrong targets. Entries stay in memory, on the device they were computed on, up to ``max_megabytes``;
    beyond that, teachers simply run (a warning says so once).

    Use it through :func:`train_student` (``cache=``), or ``method.use_teacher_cache(cache.for_loader(
    train_loader))`` before ``fit``.
    """

    def __init__(self, max_megabytes: float = 2048) -> None:
        self.max_bytes = int(max_megabytes * 1024**2)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._fingerprints: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
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
        if teacher not in self._fingerprints:
            self._fingerprints[teacher] = model_fingerprint(teacher)
        return self._fingerprints[teacher]

    def for_loader(self, loader: TensorLoader) -> _LoaderView:
        """The cache as seen by a training run over ``loader`` (pass it to ``use_teacher_cache``)."""
        if not isinstance(loader, TensorLoader):
            raise TypeError(f"The teacher cache needs a TensorLoader (it knows each batch's images); got "
                            f"{type(loader).__name__}.")  # fmt: skip
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
        if self.loader.augment:
            return self._per_batch(teacher, teacher_id, images, labels, layers, epoch, batch)
        indices = self._indices(epoch, batch)
        key = (teacher_id, self.loader.dataset.digest())
        store = cache._stores.get(key)
        if store is not None and len(indices) == len(labels):
            where = indices.to(store.labels.device)
            known = store.filled[where].all() and all(
                layer in store.features and store.features_filled[layer][where].all() for layer in layers
            )
            if bool(known):
                if not torch.equal(store.labels[where], labels.to(store.labels.device)):
                    raise TeacherCacheMismatch(
                        f"Batch {batch} of epoch {epoch} has other labels than the cached images at its "
                        "positions: train with the loader this cache view was made for "
                        "(cache.for_loader(train_loader))."
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
            if not cache._room_for(sum(t[0].numel() * t.element_size() for t in every) * count):
                return outputs
            store = _ImageStore(
                logits=[torch.zeros((count, *t.shape[1:]), device=images.device) for t in every],
                labels=torch.full((count,), -1, dtype=torch.int64, device=images.device),
                filled=torch.zeros(count, dtype=torch.bool, device=images.device),
            )
            cache._stores[key] = store
        where = indices.to(store.labels.device)
        for target, values in zip(store.logits, self._logit_list(outputs)):
            target[where] = values
        store.labels[where] = labels.to(store.labels.device)
        store.filled[where] = True
        for layer, maps in outputs.features.items():
            if layer not in store.features:
                if not cache._room_for(maps[0].numel() * maps.element_size() * count):
                    continue
                store.features[layer] = torch.zeros((count, *maps.shape[1:]), device=maps.device)
                store.features_filled[layer] = torch.zeros(count, dtype=torch.bool, device=maps.device)
            store.features[layer][where] = maps
            store.features_filled[layer][where] = True
        return outputs

    @staticmethod
    def _logit_list(outputs: TeacherOutputs) -> list[Tensor]:
        return list(outputs.logits) if isinstance(outputs.logits, (list, tuple)) else [outputs.logits]

    def _per_batch(
        self, teacher: nn.Module, teacher_id: str, images: Tensor, labels: Tensor, layers: tuple[str, ...],
        epoch: int, batch: int,
    ) -> TeacherOutputs:  # fmt: skip
        cache = self.cache
        key = (teacher_id, self.loader.fingerprint, epoch, batch)
        sums = images.detach().reshape(images.shape[0], -1).sum(dim=1, dtype=torch.float64)
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
        if cache._room_for(_nbytes(outputs)):
            cache._batches[key] = _BatchEntry(outputs, labels.detach().clone(), sums)
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
    if not seeds:
        raise ValueError("run_seeds needs at least one seed, e.g. seeds=(0, 1, 2).")
    jobs = [(name, int(seed)) for seed in seeds for name in methods]
    rows: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="student runs", unit="run", disable=not progress)
    for name, seed in bar:
        bar.set_postfix_str(f"{name}, seed {seed}", refresh=False)
        run = keep.get((name, seed)) if keep is not None else None
        if run is None:
            run = methods[name](seed)
            if keep is not None:
                keep[(name, seed)] = run
        rows += run.rows(**labels, method=name, seed=seed)
    return pd.DataFrame(rows)


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
        """``"better"``, ``"worse"``, ``"inconclusive"``, ``"no verdict"`` (too few seeds) or
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
            return (f"{head} ({self.split} split, {int(row['seeds'])} seed): one seed cannot separate a gain "
                    "from seed noise, so there is no verdict.")  # fmt: skip
        interval = (f"mean paired difference {row['difference']:+.1f} points, 95 % interval "
                    f"[{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] over {int(row['seeds'])} seeds")  # fmt: skip
        words = {
            "better": "better than the baseline: the whole interval lies above zero",
            "worse": "worse than the baseline: the whole interval lies below zero",
            "inconclusive": (f"inconclusive: the interval, {row['ci_high'] - row['ci_low']:.1f} points wide, "
                             "contains zero, so these runs cannot tell a difference from seed noise"),
        }[verdict]
        return f"{head} on the {self.split} split; {interval}: **{words}**."

    def summary(self) -> str:
        """Markdown: one sentence per method other than the baseline."""
        return "\n".join(
            f"- {self.sentence(method)}" for method in self.table.index if method != self.baseline
        )


def best_on_validation(runs: pd.DataFrame, by: str | list[str], what: str) -> Any:
    """The value of ``by`` (a column, or a tuple of columns) whose runs have the best mean validation accuracy,
    failed runs left out: the way every lesson makes a choice, never on the test split.

    If every run failed, the choice means nothing: it warns, and takes the best of the failed runs only so
    that the lesson can run on (its tables flag those runs). ``what`` names the choice in messages."""
    columns = [by] if isinstance(by, str) else by
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
    return val.groupby(by)["accuracy"].mean().idxmax()


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
    """
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
    names = list(methods) if methods is not None else list(dict.fromkeys(table[by]))
    if baseline not in names:
        names.insert(0, baseline)
    known = set(table[by])
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"No runs of {missing}; the runs have {sorted(known)}.")
    failed = (
        table["failed"].astype(bool) if "failed" in table.columns else pd.Series(False, index=table.index)
    )
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
            row["seeds"] = len(common) if len(common) else len(mine)
        rows[name] = row
    summary = pd.DataFrame.from_dict(rows, orient="index")
    summary.index.name = by
    return Comparison(
        summary, pd.DataFrame(pairs, columns=["method", "seed", "difference"]), baseline, metric, split
    )


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences, its two-sided t interval and the verdict (see :func:`compare`)."""
    values = [float(d) for d in differences]
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


def write_results(runs: pd.DataFrame, path: Path, provenance: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write a results table (``<path>.csv``, one row per run) and its provenance (``<path>.json``), each
    atomically. The table must have :data:`RESULT_COLUMNS`. Under ``torchrun`` only process 0 writes
    (the others wait until the files are there)."""
    missing = [column for column in RESULT_COLUMNS if column not in runs.columns]
    if missing:
        raise ValueError(f"A results table needs the columns {list(RESULT_COLUMNS)}; {missing} are missing.")
    path = Path(path)
    table_path, meta_path = path.with_suffix(".csv"), path.with_suffix(".json")
    if not distributed.is_main_process():
        distributed.barrier()
        return table_path, meta_path
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in (
        (table_path, runs.to_csv(index=False)),
        (meta_path, json.dumps(dict(provenance), indent=1, sort_keys=True, default=str)),
    ):
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(text)
        os.replace(temporary, target)  # fmt: skip
    distributed.barrier()
    return table_path, meta_path


def read_results(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A results table and its provenance, as :func:`write_results` wrote them; clear errors if a file is
    missing or malformed."""
    path = Path(path)
    table_path, meta_path = path.with_suffix(".csv"), path.with_suffix(".json")
    for needed in (table_path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"No recorded results at {needed}.")
    try:
        runs = pd.read_csv(table_path, keep_default_na=False, na_values=[""], dtype={"failed": str})
        provenance = json.loads(meta_path.read_text())
    except (ValueError, pd.errors.ParserError) as error:
        raise ValueError(
            f"The recorded results {table_path} or {meta_path} are malformed: {error}"
        ) from error
    missing = [column for column in RESULT_COLUMNS if column not in runs.columns]
    if missing:
        raise ValueError(f"{table_path} lacks the columns {missing}; regenerate it.")
    runs["failed"] = runs["failed"].fillna("").astype(str)
    return runs, provenance
