"""Data sets as uint8 tensors, and a loader that augments whole batches with tensor ops.

Every data set the lessons use is small enough to keep in memory as one ``uint8`` tensor of shape
``(N, C, H, W)`` (CIFAR-10's training set is 150 MB). :func:`load_dataset` returns it as an
:class:`ImageDataset`, and :class:`TensorLoader` cuts batches straight out of that tensor: it moves the
whole data set to the device once, then shuffles, pads and crops, mirrors and normalises each batch with
a handful of vectorised tensor operations. There are no worker processes, no PIL images and no Python
loop over images, so an epoch of CIFAR-10 takes seconds on a GPU, and on a CPU the loader costs little
next to the model.

======================  =====================================================================
name                    where the data come from
======================  =====================================================================
``"digits"``            scikit-learn's handwritten digits, shipped inside scikit-learn: always
                        there, no download. The ``quick`` preset uses it.
``"cifar10"``           torchvision's python pickles (``cifar-10-batches-py/``) or an
``"cifar100"``          ImageFolder tree ``<root>/train/<class>/*.jpg``; ``download=True``
                        fetches the pickles with torchvision where there is internet.
``"imagenet64"``        Chrabaszcz et al.'s downsampled ImageNet npz files (manual download).
======================  =====================================================================

``root=None`` means ``$KDBOOK_DATA``, else ``<cache>/data`` (the cache is ``$KDBOOK_CACHE`` or
``~/.cache/kdbook``). When a data set is missing, the error says where it looked and how to get it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import Tensor
from torch.nn import functional as F
from torchvision import datasets
from tqdm.auto import tqdm

from kdbook_utils import distributed
from kdbook_utils.checkpoints import cache_dir
from kdbook_utils.errors import Seen, must_be
from kdbook_utils.presets import DATA_ROOT_ENV_VAR, Preset, on_colab
from kdbook_utils.train import resolve_device

__all__ = [
    "DATASETS",
    "SPLITS",
    "DamagedDataError",
    "DatasetNotFoundError",
    "ImageDataset",
    "TensorLoader",
    "crop_and_flip",
    "data_root",
    "load_dataset",
    "preset_data",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagenet64")
SPLITS: tuple[str, ...] = ("train", "test")
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}  # ImageNet calls its test split "val"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the training sets over all their pixels, in [0, 1] units. (The std
# (0.2023, 0.1994, 0.2010) found in many repositories is the mean of per-image stds, a different number.)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
# The usual ImageNet statistics. Downsampling by box averaging keeps the mean; the std at 64x64 is a
# little lower, which does not matter for normalisation. (The training npz files' per-pixel ``mean`` is
# not used, so that both splits are always normalised identically.)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_SIZE = 32  # the 8x8 digits are upsampled to CIFAR's size so that every zoo model runs on them
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 20240101  # fixed: the digits train/test split never depends on the caller's seed

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_DECODED_CACHE_VERSION = 1


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on disk (and were not downloaded)."""


class DamagedDataError(ValueError):
    """A data set's file is there but cannot be read (cut short, an HTML error page, another file):
    the message names the file and says to delete it and get it again."""


@dataclass(eq=False, repr=False)
class ImageDataset:
    """A labelled image data set held in memory.

    Attributes:
        name, split: e.g. ``"cifar10"``, ``"train"``.
        images: ``uint8`` tensor ``(N, C, H, W)``, pixel values 0..255.
        labels: ``int64`` tensor ``(N,)`` of class indices.
        classes: class names; ``classes[k]`` is the name of label ``k``.
        mean, std: per-channel statistics of the *training* split in [0, 1] units, used to normalise
            both splits: ``(pixel / 255 - mean) / std``.
        flip_ok: whether a mirrored image is still an image of its class (False for digits).
        subset_of, subset_seed: set when this is a random subset: the size it was drawn from, and
            the seed it was drawn with.
    """

    name: str
    split: str
    images: Tensor
    labels: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip_ok: bool = True
    subset_of: int | None = None
    subset_seed: int | None = None
    _digest: str | None = field(default=None, init=False)
    _digest_state: tuple | None = field(default=None, init=False)  # the tensors' state the digest is of

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, C, H, W); got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}."
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels must be an int64 tensor of shape ({len(self.images)},); got {self.labels.dtype} "
                f"of shape {tuple(self.labels.shape)}."
            )
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}); got {self.mean}, {self.std}."
            )
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1} (one per class name).")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        channels, height, width = self.images.shape[1:]
        return channels, height, width

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        shape = "x".join(str(size) for size in self.image_shape)
        drawn = (
            f", subset of {self.subset_of} (seed {self.subset_seed})" if self.subset_of is not None else ""
        )
        return (
            f"ImageDataset({self.name!r}, split={self.split!r}, {len(self)} images {shape} uint8, "
            f"{self.num_classes} classes{drawn})"
        )

    def class_counts(self) -> Tensor:
        """How many images each class has, as an int64 tensor of length ``num_classes``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, size: int, seed: int = 0) -> ImageDataset:
        """A random subset of ``size`` images, stratified: each class keeps its share of the data.

        Class ``c`` with ``n_c`` of the ``N`` images gets ``floor(size * n_c / N)`` images, and the few
        left over go to the classes with the largest remainders (so a balanced set stays balanced). The
        images are drawn without replacement from a generator seeded with ``seed``, and keep their
        original order.
        """
        if not isinstance(size, numbers.Integral) or not 1 <= size <= len(self):
            raise ValueError(
                f"A subset needs a size between 1 and {len(self)} (this data set's size); got {size!r}."
            )
        return self._select(_stratified_sample(self.labels, self.num_classes, int(size), seed), seed)

    def without_classes(self, classes: Sequence[int]) -> ImageDataset:
        """A copy without any image of ``classes`` (class indices), e.g. a transfer set that never shows the
        student one digit. The split's name records what was left out."""
        leave_out = sorted({int(label) for label in classes})
        bad = [label for label in leave_out if not 0 <= label < self.num_classes]
        if bad or not leave_out:
            raise ValueError(
                f"without_classes needs class indices from 0 to {self.num_classes - 1}; got {list(classes)!r}."
            )
        keep = torch.nonzero(~torch.isin(self.labels, torch.tensor(leave_out))).flatten()
        if len(keep) == 0:
            raise ValueError(f"Leaving out classes {leave_out} leaves no image of this data set.")
        chosen = self._select(keep, self.subset_seed or 0)
        chosen.split = f"{self.split} without classes {leave_out}"
        chosen.subset_of, chosen.subset_seed = self.subset_of, self.subset_seed
        return chosen

    def holdout(self, size: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """Split off a stratified random ``size`` images: ``(the rest, the held-out part)``.

        The held-out part is drawn as :meth:`subset` draws (each class keeps its share), and the rest is
        everything else, in the original order. Both remember they are subsets of this data set.
        """
        if not isinstance(size, numbers.Integral) or not 1 <= size < len(self):
            raise ValueError(
                f"A hold-out needs a size between 1 and {len(self) - 1} (this data set has {len(self)} "
                f"images); got {size!r}."
            )
        held = _stratified_sample(self.labels, self.num_classes, int(size), seed)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[held] = False
        rest = torch.nonzero(keep).flatten()
        return self._select(rest, seed), self._select(held, seed)

    def _select(self, indices: Tensor, seed: int) -> ImageDataset:
        return ImageDataset(
            name=self.name,
            split=self.split,
            images=self.images.index_select(0, indices),
            labels=self.labels.index_select(0, indices),
            classes=self.classes,
            mean=self.mean,
            std=self.std,
            flip_ok=self.flip_ok,
            subset_of=len(self),
            subset_seed=seed,
        )

    def resized(self, size: int) -> ImageDataset:
        """A copy with every image resized to ``size x size`` pixels (area interpolation, still uint8).

        The digits are 8x8 scans stored upsampled to 32x32 (so every zoo model accepts them): resizing
        back to 8 or 16 pixels loses nothing and makes every convolution 16 or 4 times cheaper.
        """
        if not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"size must be a positive number of pixels; got {size!r}.")
        if self.images.shape[-2:] == (size, size):
            return self
        images = F.interpolate(self.images.float(), size=(int(size), int(size)), mode="area")
        return dataclasses.replace(self, images=images.round().clamp(0, 255).to(torch.uint8))

    def identity(self) -> str:
        """What this data set is, in words, without its pixels: name, split, size, how it was drawn and the
        image shape, e.g. ``"cifar10/train n=48000 subset of 50000 seed 1234 3x32x32"``.

        Trained models are cached under it (not under :meth:`digest`), so a teacher trained on one copy of
        a data set (CIFAR-10 as JPEG files, say) is found for another (torchvision's download): the two
        differ in their last bits, not in which images they are. Subsets are drawn class by class, by rank
        within each class, so the same seed draws the same images from either copy.
        """
        drawn = f" subset of {self.subset_of} seed {self.subset_seed}" if self.subset_of is not None else ""
        shape = "x".join(str(size) for size in self.image_shape)
        return f"{self.name}/{self.split} n={len(self)}{drawn} {shape}"

    def digest(self) -> str:
        """A short checksum of the pixels and labels: two data sets with the same digest hold the same
        images in the same order.

        It is computed once and computed again only when the tensors change: another tensor assigned
        (``dataset.images = ...``) or an in-place change (``dataset.images[0] = 0``, ``images.mul_(2)``),
        which PyTorch counts in each tensor's version counter. (A change made through a NumPy view of the
        tensor bypasses that counter; make a new data set instead.)"""
        state = _tensor_state(self.images, self.labels)
        if self._digest is None or state != self._digest_state:
            self._digest_state = state
            hasher = hashlib.blake2b(digest_size=8)
            hasher.update(self.images.detach().cpu().contiguous().numpy())
            hasher.update(self.labels.detach().cpu().contiguous().numpy())
            self._digest = hasher.hexdigest()
        return self._digest


def _tensor_state(*tensors: Tensor) -> tuple:
    """Which storage each tensor uses and how often it was changed in place (PyTorch's version counter):
    equal states mean unchanged tensors. Cheap: no value is read."""
    state = []
    for tensor in tensors:
        try:
            version = tensor._version
        except RuntimeError:  # an inference tensor has no version counter (and cannot change in place)
            version = -1
        state.append((id(tensor), tensor.data_ptr(), version, tuple(tensor.shape)))
    return tuple(state)


def _stratified_sample(labels: Tensor, num_classes: int, size: int, seed: int) -> Tensor:
    """Sorted indices of a class-stratified random sample of ``size`` of ``labels``."""
    counts = torch.bincount(labels, minlength=num_classes)
    quotas = counts * size / len(labels)
    per_class = quotas.floor().long()
    leftover = size - int(per_class.sum())
    # Largest remainders first; ties go to the lower class index (a stable sort keeps the class order).
    remainder_order = torch.sort(quotas - per_class, descending=True, stable=True).indices
    per_class[remainder_order[:leftover]] += 1
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        picks = torch.randperm(len(members), generator=generator)[: int(per_class[label])]
        chosen.append(members[picks])
    return torch.cat(chosen).sort().values


# --------------------------------------------------------------------------------------------- loading


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder data sets are looked for in: ``root``, else ``$KDBOOK_DATA``, else ``<cache>/data``."""
    if root is not None:
        return Path(root).expanduser()
    configured = os.environ.get(DATA_ROOT_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return cache_dir() / "data"


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    subset: int | None = None,
    seed: int = 0,
    *,
    channels: int = 3,
    progress: bool = True,
) -> ImageDataset:
    """Load a data set split as an :class:`ImageDataset` of uint8 images.

    Args:
        name: one of ``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"imagenet64"``.
        split: ``"train"`` or ``"test"`` (``"val"`` is accepted for ``"test"``).
        root: the folder holding the files (see below); default ``$KDBOOK_DATA``, else ``<cache>/data``.
        download: CIFAR only: let torchvision download the pickles into ``root`` if they are missing.
        subset: keep a class-stratified random subset of this many images (see
            :meth:`ImageDataset.subset`), drawn with ``seed``.
        channels: ``1`` gives the digits as single-channel images; every other data set has 3.

    What is looked for, in ``root/<name>/`` and then in ``root/`` itself:

    * digits: nothing, it ships with scikit-learn (1,797 images of 8x8 pixels with 17 grey levels). The
      levels 0..16 are scaled to 0..255 and the images upsampled to 32x32 by bilinear interpolation,
      then repeated over 3 channels so that every zoo model runs on them. A fixed stratified 80/20
      split (independent of ``seed``) gives 1,438 training and 359 test images.
    * cifar10 / cifar100: torchvision's python pickles ``cifar-10-batches-py/`` or ``cifar-100-python/``;
      or an ImageFolder tree ``<split>/<class>/*.png|jpg`` (``test/`` may be called ``val/``) whose
      sorted folder names are the classes. Decoding an image tree is slow (50,000 JPEGs take several
      seconds), so the decoded tensors are cached in ``<cache>/decoded/`` until a file changes.
    * imagenet64: the npz files of Chrabaszcz et al. (2017), ``train_data_batch_1.npz`` ..
      ``train_data_batch_10.npz`` and ``val_data.npz``, either in the folder or in its immediate
      subfolders (as the downloads unpack, e.g. ``Imagenet64_train_part1_npz/``). Class names come
      from ``map_clsloc.txt`` when it is there, else they are ``class_000`` .. ``class_999``. The whole
      training set is 15.7 GB of uint8 in memory.
    """
    dataset_name = _check_choice("data set", name, DATASETS)
    split_name = _SPLIT_ALIASES.get(str(split).strip().lower())
    if split_name is None:
        raise ValueError(f"Unknown split {split!r}. Valid splits: 'train', 'test' ('val' means 'test').")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}.")
    if channels == 1 and dataset_name != "digits":
        raise ValueError(
            f"channels=1 is only offered for the grey-level digits; {dataset_name} has 3 channels."
        )

    if dataset_name == "digits":
        dataset = _load_digits(split_name, channels)
    elif dataset_name in ("cifar10", "cifar100"):
        dataset = _load_cifar(dataset_name, split_name, data_root(root), download, progress)
    else:
        if download:
            raise ValueError(
                "download=True is not available for imagenet64: ImageNet needs a registered account. "
                "Download the 64x64 npz files from https://image-net.org/download-images and pass root=."
            )
        dataset = _load_imagenet64(split_name, data_root(root))
    if subset is not None:
        dataset = dataset.subset(subset, seed)
    return dataset


class DataSplits(NamedTuple):
    """A preset's three splits: ``train`` to learn from, ``val`` to make choices on (temperatures, loss
    weights, layers, thresholds, epochs), ``test`` for the final comparison only."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


VALIDATION_SEED = 1234
"""Seed of the validation hold-out: fixed, so every lesson and every run validates on the same images."""


def preset_data(
    preset: Preset,
    root: str | os.PathLike | None = None,
    download: bool | None = None,
    *,
    progress: bool = True,
) -> DataSplits:
    """The ``(train, val, test)`` splits of a preset.

    ``val`` is a stratified hold-out of ``preset.val_size`` images from the training split (drawn with
    :data:`VALIDATION_SEED`); ``train`` is the rest, cut to ``preset.train_subset`` images if the preset
    says so; ``test`` is the test split, cut to ``preset.test_subset``. Subsets are drawn with seed 0, so
    every training seed of a lesson sees the same images.

    ``download`` (CIFAR only) lets torchvision fetch missing files; left out, it is on in Colab, where a
    lesson on ``lab`` should just work, and off everywhere else, where a missing file is an error that says
    where to put it.
    """
    if not isinstance(preset, Preset):
        name = f"get_preset({preset!r})" if isinstance(preset, str) else "get_preset('quick')"
        raise TypeError(must_be("preset_data's preset", "a Preset", preset if isinstance(preset, str) else
                                Seen(f"a {type(preset).__name__}"), f"Pass the preset itself: preset_data({name})."))  # fmt: skip
    if download is None:
        download = on_colab() and preset.dataset in ("cifar10", "cifar100")
    full = load_dataset(preset.dataset, "train", root, download, progress=progress)
    if preset.val_size:
        train, val = full.holdout(preset.val_size, seed=VALIDATION_SEED)
        val.split = "val"
    else:
        raise ValueError(
            f"Preset {preset.name!r} has val_size=0; give it a validation hold-out (val_size > 0)."
        )
    if preset.train_subset is not None and preset.train_subset < len(train):
        train = train.subset(preset.train_subset, seed=0)
    test = load_dataset(
        preset.dataset, "test", root, download, subset=preset.test_subset, seed=0, progress=progress
    )
    return DataSplits(train, val, test)


def _check_choice(what: str, value: str, valid: Sequence[str]) -> str:
    key = str(value).strip().lower()
    if key not in valid:
        raise ValueError(f"Unknown {what} {value!r}. Valid choices: {', '.join(repr(v) for v in valid)}.")
    return key


def _search_folders(root: Path, name: str) -> list[Path]:
    """``root/<name>`` first (a data folder that holds several data sets), then ``root`` itself."""
    return [root / name, root]


def _missing_data_error(
    title: str, looked_for: list[str], notes: list[str], root: Path
) -> DatasetNotFoundError:
    lines = [f"{title} was not found. Looked for:"]
    lines += [f"  - {path}" for path in looked_for]
    lines += [f"  ({note})" for note in notes]
    lines += [
        "Two ways to get it:",
        "  1. on a machine with internet, pass download=True (torchvision downloads it into the root folder);",
        "  2. put the files in a folder, either in torchvision's layout (the cifar-10-batches-py/ or",
        "     cifar-100-python/ folder) or as an ImageFolder tree <folder>/train/<class>/*.jpg and",
        f"     <folder>/test/<class>/*.jpg, then pass root='<folder>' or set {DATA_ROOT_ENV_VAR}=<folder>.",
        f"(The root searched was {root}. The 'quick' preset needs no files: it uses scikit-learn's digits.)",
    ]
    return DatasetNotFoundError("\n".join(lines))


# digits ------------------------------------------------------------------------------------------------


def _load_digits(split: str, channels: int) -> ImageDataset:
    images, labels = _digits_tensors()
    train_indices, test_indices = _digits_split(labels)
    chosen = train_indices if split == "train" else test_indices
    train_pixels = images[train_indices].double() / 255
    mean = (float(train_pixels.mean()),) * channels
    std = (float(train_pixels.std()),) * channels
    return ImageDataset(
        name="digits",
        split=split,
        images=images[chosen].expand(-1, channels, -1, -1).contiguous(),
        labels=labels[chosen],
        classes=[str(digit) for digit in range(10)],
        mean=mean,
        std=std,
        flip_ok=False,  # a mirrored digit is another symbol
    )


_DIGITS: tuple[Tensor, Tensor] | None = None


def _digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as uint8 ``(N, 1, 32, 32)`` and their labels (built once per process)."""
    global _DIGITS
    if _DIGITS is None:
        digits = load_digits()
        levels = torch.from_numpy(digits.images).float().unsqueeze(1)  # (N, 1, 8, 8), values 0..16
        upsampled = F.interpolate(
            levels * (255 / 16), size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False
        )
        images = upsampled.round().clamp(0, 255).to(torch.uint8)
        _DIGITS = images, torch.from_numpy(digits.target).long()
    return _DIGITS


def _digits_split(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The fixed stratified split: ``DIGITS_TEST_FRACTION`` of each class, drawn with a fixed seed."""
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    train, test = [], []
    for label in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_count = round(len(members) * DIGITS_TEST_FRACTION)
        test.append(members[:test_count])
        train.append(members[test_count:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


# CIFAR -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarFormat:
    """Where torchvision's copy of a CIFAR release keeps what, and the training-set statistics."""

    title: str
    folder: str  # the folder the release unpacks to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str  # class names, in the meta file
    labels_key: str  # labels, in each data file
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    archive: str = ""  # the file the release is downloaded as (torchvision unpacks it into ``folder``)


_CIFAR_FORMATS = {
    "cifar10": _CifarFormat(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{k}" for k in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        names_key="label_names",
        labels_key="labels",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        archive="cifar-10-python.tar.gz",
    ),
    "cifar100": _CifarFormat(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        archive="cifar-100-python.tar.gz",
    ),
}


def _load_cifar(name: str, split: str, root: Path, download: bool, progress: bool = True) -> ImageDataset:
    release = _CIFAR_FORMATS[name]
    files = release.train_files if split == "train" else release.test_files
    looked_for: list[str] = []
    notes: list[str] = []
    for folder in _search_folders(root, name):
        pickle_folder = folder / release.folder
        looked_for.append(f"{pickle_folder}/{{{','.join(files)}}} (torchvision's python pickles)")
        if all((pickle_folder / file).is_file() for file in files):
            images, labels, classes = _read_cifar_pickles(release, pickle_folder, files)
            break
        split_folders = "train" if split == "train" else "test|val"
        looked_for.append(f"{folder}/{split_folders}/<class>/*.png|jpg (an ImageFolder tree)")
        tree = _image_folder_split(folder, split)
        if tree is not None:
            class_count = sum(1 for entry in tree.iterdir() if entry.is_dir())
            if class_count == release.num_classes:
                images, labels, classes = _read_image_folder(tree, progress)
                break
            notes.append(f"{tree} has {class_count} class folders, not {release.num_classes}: skipped")
    else:
        if not download:
            _refuse_unusable_cifar_root(name, root, files)
            raise _missing_data_error(f"{release.title} ({split} split)", looked_for, notes, root)
        images, labels, classes = _download_cifar(name, root, files)
    if images.shape[1:] != (3, 32, 32):
        raise ValueError(f"{release.title} images must be 3x32x32; these are {tuple(images.shape[1:])}.")
    return ImageDataset(name, split, images, labels, classes, release.mean, release.std, flip_ok=True)


def _read_cifar_pickles(
    release: _CifarFormat, folder: Path, files: Sequence[str]
) -> tuple[Tensor, Tensor, list[str]]:
    """Read torchvision's CIFAR pickles: dicts with ``data`` (N, 3072) uint8 rows holding the R, G and B
    planes of a 32x32 image, labels under ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100).

    Unpickling can run code, so only read files from a source you trust (as with torchvision)."""
    images, labels = [], []
    for file in files:
        entry = _load_cifar_pickle(release, folder / file, ("data", release.labels_key))
        pixels = np.asarray(entry["data"], dtype=np.uint8)
        file_labels = np.asarray(entry[release.labels_key], dtype=np.int64)
        if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or len(file_labels) != len(pixels):
            raise DamagedDataError(_damaged_cifar_message(
                release, folder / file, f"its arrays are not {release.title}'s (data of shape "
                f"{pixels.shape}, {len(file_labels)} labels; expected (N, 3072) and N labels)"))  # fmt: skip
        images.append(pixels.reshape(-1, 3, 32, 32))
        labels.append(file_labels)
    meta_path = folder / release.meta_file
    if meta_path.is_file():
        classes = list(_load_cifar_pickle(release, meta_path, (release.names_key,))[release.names_key])
    elif release.num_classes == 10:
        classes = list(CIFAR10_CLASSES)
    else:
        raise DatasetNotFoundError(f"{meta_path} (the {release.title} class names) is missing.")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), classes


def _load_cifar_pickle(release: _CifarFormat, path: Path, keys: Sequence[str]) -> dict:
    """One of torchvision's CIFAR pickles, unpickled; a file that is not one is refused by name."""
    with open(path, "rb") as handle:
        head = handle.read(512)
        handle.seek(0)
        try:
            entry = pickle.load(handle, encoding="latin1")
        except Exception as error:  # unpickling junk raises many types; all mean the same: a damaged file
            raise DamagedDataError(
                _damaged_cifar_message(release, path, _what_it_is(path, head, error))
            ) from error
    missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
    if missing:
        seen = (
            f"a dict with the keys {sorted(entry)[:6]}"
            if isinstance(entry, dict)
            else f"a {type(entry).__name__}"
        )
        raise DamagedDataError(_damaged_cifar_message(
            release, path, f"it unpickles to {seen}, without {', '.join(repr(key) for key in missing)}"))  # fmt: skip
    return entry


def _what_it_is(path: Path, head: bytes, error: Exception) -> str:
    """What a file that does not unpickle looks like, in words."""
    size = path.stat().st_size
    start = head.lstrip().lower()
    if size == 0:
        return "it is empty (0 bytes)"
    if start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<")):
        return "it is an HTML page, not a pickle (a download that saved a web page, e.g. an error page)"
    if head.startswith(b"\x1f\x8b"):
        return "it is a gzip archive, not a pickle (the release archive renamed, not extracted)"
    if isinstance(error, EOFError) or "truncated" in str(error):
        return f"it is cut short ({size:,} bytes; an interrupted download or copy)"
    return f"it does not unpickle ({type(error).__name__}: {error})"


def _damaged_cifar_message(release: _CifarFormat, path: Path, what: str) -> str:
    return (f"{path} is damaged: {what}. Delete the folder {path.parent} and get {release.title} again: "
            f"download=True (where there is internet), or copy the {release.folder}/ folder (or the "
            f"{release.archive} archive, then extract it) from a machine that has a good copy.")  # fmt: skip


def _refuse_unusable_cifar_root(name: str, root: Path, files: Sequence[str]) -> None:
    """Two near misses get their own message: ``root`` is the pickle folder itself (its parent is the
    root), or a folder holds only the downloaded archive (it must be extracted first)."""
    release = _CIFAR_FORMATS[name]
    if root.name == release.folder or (root / files[0]).is_file():
        raise DatasetNotFoundError(
            f"{release.title} was not found: {root} is torchvision's {release.folder}/ folder itself, but the "
            f"data root is the folder that holds it. Pass its parent: root='{root.parent}' (or set "
            f"{DATA_ROOT_ENV_VAR}={root.parent})."
        )
    for folder in _search_folders(root, name):
        archive = folder / release.archive
        if archive.is_file() and not (folder / release.folder).is_dir():
            raise DatasetNotFoundError(
                f"{release.title} was not found in {folder}, but its downloaded archive {archive} is there, "
                f"not extracted. Extract it: tar -xzf '{archive}' -C '{folder}' (it unpacks to "
                f"{release.folder}/), or pass download=True with root='{folder}' (torchvision checks the "
                "archive it finds and extracts it without downloading again)."
            )


def _download_cifar(name: str, root: Path, files: Sequence[str]) -> tuple[Tensor, Tensor, list[str]]:
    release = _CIFAR_FORMATS[name]
    dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        dataset_class(str(root), train=True, download=True)  # downloads and unpacks both splits
    except Exception as error:  # no internet, a proxy, a full disk: say what to do instead
        raise DatasetNotFoundError(
            f"Downloading {release.title} into {root} failed ({error}). Without internet, copy the "
            f"files there yourself (see load_dataset's docstring) and pass root= or set {DATA_ROOT_ENV_VAR}."
        ) from error
    return _read_cifar_pickles(release, root / release.folder, files)


# ImageFolder trees ---------------------------------------------------------------------------------------


def _image_folder_split(folder: Path, split: str) -> Path | None:
    names = ("train",) if split == "train" else ("test", "val")
    for split_name in names:
        if (folder / split_name).is_dir():
            return folder / split_name
    return None


def _read_image_folder(tree: Path, progress: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    """Decode ``tree/<class>/<image>`` (classes in sorted order), with a cache of the decoded tensors.

    The cache file in ``<cache>/decoded/`` is keyed by the tree's path and checked against every file's
    name, size and modification time, so editing the tree invalidates it."""
    classes = sorted(entry.name for entry in tree.iterdir() if entry.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    listing = hashlib.sha1()
    for label, class_name in enumerate(classes):
        class_files = sorted(
            entry for entry in (tree / class_name).iterdir() if entry.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not class_files:
            raise ValueError(
                f"The class folder {tree / class_name} holds no images ({', '.join(_IMAGE_SUFFIXES)})."
            )
        for path in class_files:
            stat = path.stat()
            listing.update(f"{class_name}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        files += class_files
        labels += [label] * len(class_files)

    tree_key = hashlib.sha1(str(tree.resolve()).encode()).hexdigest()[:16]
    cache_file = cache_dir() / "decoded" / f"{tree.parent.name}-{tree.name}-{tree_key}.pt"
    signature = f"v{_DECODED_CACHE_VERSION}:{listing.hexdigest()}"
    if cache_file.is_file():
        try:
            cached = torch.load(cache_file, weights_only=True)
            if cached.get("signature") == signature:
                return cached["images"], cached["labels"], list(cached["classes"])
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError, KeyError) as error:
            # a corrupt or foreign file: decode again and overwrite it
            warnings.warn(f"Ignoring the unreadable cache file {cache_file} ({error}).", stacklevel=3)

    images = _decode_images(files, progress)
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    record = {"signature": signature, "images": images, "labels": label_tensor, "classes": classes}
    try:
        _save_atomically(record, cache_file)
    except OSError as error:
        warnings.warn(f"Could not cache the decoded images in {cache_file} ({error}).", stacklevel=3)
    return images, label_tensor, classes


def _decode_images(files: list[Path], progress: bool = True) -> Tensor:
    """Decode image files into one uint8 ``(N, 3, H, W)`` tensor; every image must have the same size."""
    images: Tensor | None = None
    bar = tqdm(files, desc="Decoding images (once, then cached)", unit="img",
               disable=not progress or len(files) < 5000, leave=False)  # fmt: skip
    for index, path in enumerate(bar):
        try:
            with Image.open(path) as opened:
                image = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)  # HWC -> CHW
        except OSError as error:  # PIL's UnidentifiedImageError and a truncated image are OSErrors
            raise DamagedDataError(
                f"{path} is damaged: it does not decode as an image ({error}). Delete it, or copy the data set "
                "again from a good copy (a half-copied or empty file is the usual cause)."
            ) from error
        if images is None:
            images = torch.empty((len(files), *image.shape), dtype=torch.uint8)
        if image.shape != images.shape[1:]:
            raise ValueError(
                f"{path} is {tuple(image.shape)} but the first image was {tuple(images.shape[1:])}: "
                "every image of a data set must have the same size."
            )
        images[index] = image
    assert images is not None
    return images


def _save_atomically(record: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(record, stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ImageNet 64x64 -------------------------------------------------------------------------------------------

_IMAGENET64_TRAIN_BATCHES = 10
_IMAGENET64_SIDE = 64


def _imagenet64_folders(root: Path) -> list[Path]:
    folders = []
    for folder in _search_folders(root, "imagenet64"):
        if folder.is_dir():
            folders.append(folder)
            folders += sorted(
                entry for entry in folder.iterdir() if entry.is_dir() and entry.name != "imagenet64"
            )
    return folders


def _load_imagenet64(split: str, root: Path) -> ImageDataset:
    folders = _imagenet64_folders(root)
    if split == "train":
        wanted = [f"train_data_batch_{k}.npz" for k in range(1, _IMAGENET64_TRAIN_BATCHES + 1)]
    else:
        wanted = ["val_data.npz"]
    found = {}
    for file_name in wanted:
        for folder in folders:
            if (folder / file_name).is_file():
                found[file_name] = folder / file_name
                break
    if not found:
        looked_in = [
            f"{folder}/{wanted[0] if len(wanted) == 1 else 'train_data_batch_{1..10}.npz'}"
            for folder in (folders or _search_folders(root, "imagenet64"))
        ]
        raise DatasetNotFoundError(
            "ImageNet 64x64 ({} split) was not found. Looked for:\n{}\n"
            "It cannot be downloaded automatically (ImageNet needs an account): download the 64x64 npz files "
            "(Imagenet64_train_part1_npz.zip, ..._part2_npz.zip, Imagenet64_val_npz.zip) from "
            "https://image-net.org/download-images, unpack them into a folder, and pass root='<folder>' or set "
            "{}=<folder>.".format(split, "\n".join(f"  - {path}" for path in looked_in), DATA_ROOT_ENV_VAR)
        )
    missing = [file_name for file_name in wanted if file_name not in found]
    if missing:
        warnings.warn(
            f"ImageNet 64x64: only {len(found)} of {len(wanted)} training files were found; "
            f"missing {', '.join(missing)}. Loading the ones found.",
            stacklevel=3,
        )

    images, labels = [], []
    for path in found.values():
        try:
            with np.load(path) as archive:  # allow_pickle stays False: npz arrays only
                data = archive["data"]
                file_labels = np.asarray(archive["labels"], dtype=np.int64).reshape(-1)
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            zipfile.BadZipFile,
        ) as error:  # a cut or foreign file
            raise DamagedDataError(
                f"{path} is damaged: it does not read as an npz file with 'data' and 'labels' ({error}). Delete "
                "it and download it again from https://image-net.org/download-images (a cut download is the usual "
                "cause)."
            ) from error
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _IMAGENET64_SIDE**2:
            raise ValueError(
                f"{path}: 'data' should be uint8 of shape (N, {3 * _IMAGENET64_SIDE**2}) (R, G, B planes of "
                f"64x64 images); got {data.dtype} {data.shape}. Is this the 64x64 version?"
            )
        if len(file_labels) != len(data) or file_labels.min() < 1 or file_labels.max() > 1000:
            raise ValueError(f"{path}: 'labels' should hold one label in 1..1000 per image.")
        images.append(torch.from_numpy(data).view(-1, 3, _IMAGENET64_SIDE, _IMAGENET64_SIDE))
        labels.append(torch.from_numpy(file_labels - 1))  # the files count classes from 1
    return ImageDataset(
        name="imagenet64",
        split=split,
        images=torch.cat(images),
        labels=torch.cat(labels),
        classes=_imagenet_class_names(folders),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        flip_ok=True,
    )


def _imagenet_class_names(folders: list[Path]) -> list[str]:
    """Names from ``map_clsloc.txt`` (lines ``n02119789 1 kit_fox``), else ``class_000`` .. ``class_999``."""
    classes = [f"class_{index:03d}" for index in range(1000)]
    for folder in folders:
        map_file = folder / "map_clsloc.txt"
        if map_file.is_file():
            entries = []
            for line in map_file.read_text().splitlines():
                match = re.fullmatch(r"\s*(\S+)\s+(\d+)\s+(\S+)\s*", line)
                if match:
                    entries.append((match[1], int(match[2]), match[3]))
            names = [name for _, _, name in entries]
            for wnid, index, name in entries:
                if 1 <= index <= 1000:  # ImageNet has a few repeated names ("crane"): add the WordNet id
                    classes[index - 1] = name if names.count(name) == 1 else f"{name} ({wnid})"
            break
    return classes


# --------------------------------------------------------------------------------------------- loader


def crop_and_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor | None, padding: int) -> Tensor:
    """Random crop after zero padding, then horizontal flip, for a whole batch at once.

    Image ``i`` is padded with ``padding`` zeros on every side, the ``H x W`` window whose top-left corner
    is at ``(top[i], left[i])`` of the padded image is kept (offsets lie in ``0 .. 2 * padding``, and
    ``padding, padding`` gives the image back), and the window is mirrored left-right if ``flip[i]``.

    No Python loop over images: each output row is ``W`` consecutive values of the padded batch's
    storage, so the storage is viewed as the list of all its ``W``-long windows (a view, no copy) and one
    ``index_select`` picks the window of every output row. Mirroring uses a mirrored copy of the batch:
    cropping the mirrored image at column ``2 * padding - left`` equals mirroring the crop at ``left``.
    """
    count, channels, height, width = images.shape
    device = images.device
    source = torch.arange(count, device=device)
    if flip is not None:
        images = torch.cat([images, images.flip(-1)])  # image count + i is image i mirrored
        source = source + count * flip.long()
        left = torch.where(flip, 2 * padding - left, left)
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros enter at the borders
    padded_height, padded_width = height + 2 * padding, width + 2 * padding
    windows = padded.view(-1).unfold(0, width, 1)  # windows[k] = the width values starting at storage k
    plane = source.view(count, 1, 1) * channels + torch.arange(channels, device=device).view(1, channels, 1)
    row = top.view(count, 1, 1) + torch.arange(height, device=device).view(1, 1, height)
    first = (plane * padded_height + row) * padded_width + left.view(count, 1, 1)  # (count, C, H) starts
    return windows.index_select(0, first.view(-1)).view(count, channels, height, width)


class EpochPlan(NamedTuple):
    """An epoch's random choices, one entry per position in the epoch: ``order`` (which image comes
    there), the crop offsets ``top`` and ``left`` (in ``0 .. 2 * padding``) and ``flip`` (None when the
    loader does not augment, or does not flip)."""

    order: Tensor
    top: Tensor | None
    left: Tensor | None
    flip: Tensor | None

    def to(self, device: torch.device) -> EpochPlan:
        return EpochPlan(*(None if part is None else part.to(device) for part in self))


class TensorLoader:
    """Batches of ``(images, labels)`` cut from an :class:`ImageDataset` held on ``device``.

    Iterating yields float32 images normalised with the data set's mean and std, ``(N, C, H, W)``, and
    int64 labels, both on ``device`` (None: the device rule, :func:`kdbook_utils.train.resolve_device`). In training mode (``train=True``) the order is shuffled and each
    batch is augmented: a random crop after zero-padding by ``padding`` pixels (as torchvision's
    ``RandomCrop(32, padding=4)``) and, if ``flip`` (default: ``dataset.flip_ok``), a horizontal flip of
    half of the images (``RandomHorizontalFlip``). In evaluation mode images come in order, unaugmented.

    Randomness comes from a generator seeded with ``(seed, epoch)``: epoch ``k`` has the same order,
    crops and flips whatever ran before it, and on every device. ``iter(loader)`` runs epoch
    ``loader.epoch`` and advances it; :meth:`set_epoch` pins it, and :meth:`epoch_batches` gives any
    epoch without touching the counter.

    ``fingerprint`` names the data, augmentation, batching and seed, so two loaders with the same
    fingerprint yield the same batches epoch by epoch (a cache of teacher outputs keys on it).

    **Several processes** (``torchrun``, see :mod:`kdbook_utils.distributed`). With ``shard=None`` (the
    default) a loader made while a process group runs gives each process its own slice of every epoch;
    ``shard=False`` gives every process everything. Every process draws the same epoch plan (the same
    seed), then keeps its slice:

    * a training loader (``train=True``): ``batch_size`` is the *global* batch, and process ``r`` of
      ``w`` takes plan positions ``r, r + w, r + 2w, ...``, so its batches have ``batch_size / w`` images
      and step ``k`` of all processes together covers exactly the images of global batch ``k`` (as
      ``DistributedSampler`` interleaves). ``batch_size`` must be a multiple of ``w``. When the data set
      size ``N`` is not a multiple of ``w``, the last ``N mod w`` positions of each epoch's shuffled
      order (at most ``w - 1`` images, other ones each epoch) are left out of that epoch, so that every
      process runs the same number of equally sized steps (a process waiting at a gradient exchange for
      a step its partners never take would hang);
    * an evaluation loader (``train=False``): process ``r`` takes the ``r``-th of ``w`` contiguous
      blocks of the data set (sizes differ by at most one image; nothing is left out). ``fit``,
      ``evaluate`` and ``predict`` put the processes' results together.

    ``fingerprint`` stays that of the whole run (the global batches), so every process names the same
    data in a cache file's recipe.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int = 128,
        *,
        train: bool,
        device: str | torch.device | None = None,
        augment: bool | None = None,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_last: bool = False,
        padding: int = 4,
        flip: bool | None = None,
        channels_last: bool = False,
        shard: bool | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative integer; got {padding!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
        if len(dataset) == 0:
            raise ValueError(f"{dataset!r} is empty.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.shuffle = train if shuffle is None else shuffle
        self.flip = dataset.flip_ok if flip is None else flip
        self.padding = padding
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        # "meta" (shapes without values) lets a test prove that batching never reads a value on the host
        self.device = torch.device("meta") if str(device) == "meta" else resolve_device(device)
        self.epoch = 0
        self.current_epoch: int | None = None  # the epoch the latest iter(loader) runs
        if drop_last and len(dataset) < batch_size:
            raise ValueError(
                f"drop_last=True with {len(dataset)} images and batch_size={batch_size} leaves no batch."
            )
        # Sharding over processes (torchrun): this process's rank among `shards` (1: it sees everything).
        self.shards = distributed.world_size() if shard is not False and distributed.is_active() else 1
        self.rank = distributed.rank() if self.shards > 1 else 0
        if self.shards > 1 and train and batch_size % self.shards:
            lower = batch_size - batch_size % self.shards
            raise ValueError(
                f"batch_size={batch_size} is the global batch of {self.shards} processes and must split "
                f"evenly among them; use a multiple of {self.shards}, e.g. {lower or self.shards} or "
                f"{lower + self.shards}."
            )
        # The images per batch this process yields (batch_size, unless a training loader is sharded).
        self.local_batch_size = batch_size // self.shards if train else batch_size

        # The whole data set moves to the device once, as uint8 (4x smaller than float32).
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        # (x / 255 - mean) / std  ==  x * scale + shift: one multiply and one add per pixel, in place.
        mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = (1 / (255 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)

    def __len__(self) -> int:
        if self.shards > 1:
            full, rest = divmod(len(self._shard_positions()), self.local_batch_size)
            return full if self.drop_last or rest == 0 else full + 1
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _shard_positions(self) -> Tensor:
        """The positions of an epoch's plan that this process takes (see the class docstring)."""
        count = len(self.dataset)
        if self.train:
            return torch.arange(self.rank, count - count % self.shards, self.shards)
        share, extra = divmod(count, self.shards)
        start = self.rank * share + min(self.rank, extra)
        return torch.arange(start, start + share + (self.rank < extra))

    def __repr__(self) -> str:
        return (
            f"TensorLoader({self.dataset!r}, batch_size={self.batch_size}, augment={self.augmentation!r}, "
            f"shuffle={self.shuffle}, seed={self.seed}, device={self.device})"
        )

    @property
    def augmentation(self) -> str:
        """The augmentation in words, e.g. ``"crop(pad=4)+flip"`` or ``"none"``."""
        steps = []
        if self.augment and self.padding:
            steps.append(f"crop(pad={self.padding})")
        if self.augment and self.flip:
            steps.append("flip")
        return "+".join(steps) or "none"

    @property
    def fingerprint(self) -> str:
        """A stable string naming the data (with a checksum of its pixels), augmentation, batching and seed:
        two loaders with the same fingerprint yield the same batches."""
        return f"{self.dataset.identity()} data={self.dataset.digest()} | {self._plan()}"

    @property
    def identity(self) -> str:
        """:meth:`fingerprint` without the pixel checksum: what trained models are cached under (see
        :meth:`ImageDataset.identity`)."""
        return f"{self.dataset.identity()} | {self._plan()}"

    def _plan(self) -> str:
        return (
            f"augment={self.augmentation} shuffle={self.shuffle} batch={self.batch_size}"
            f" drop_last={self.drop_last} seed={self.seed}"
        )

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter(loader)`` run epoch ``epoch``."""
        if not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer; got {epoch!r}.")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        self.current_epoch = epoch
        return self.epoch_batches(epoch)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The random choices of epoch ``epoch``, drawn on the CPU from a generator seeded with
        ``(seed, epoch)``, so they are the same on every device. A sharded loader returns this process's
        slice of the plan (every process draws the whole plan, then keeps its positions)."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        count = len(self.dataset)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        top = left = flip = None
        if self.augment:
            span = 2 * self.padding + 1
            top = torch.randint(span, (count,), generator=generator)
            left = torch.randint(span, (count,), generator=generator)
            if self.flip:
                flip = torch.randint(2, (count,), generator=generator).bool()
        if self.shards > 1:
            mine = self._shard_positions()
            return EpochPlan(*(None if part is None else part[mine] for part in (order, top, left, flip)))
        return EpochPlan(order, top, left, flip)

    def epoch_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of epoch ``epoch`` (does not change ``self.epoch``)."""
        return self._batches(self.epoch_plan(epoch).to(self.device))

    def _batches(self, plan: EpochPlan) -> Iterator[tuple[Tensor, Tensor]]:
        order, top, left, flip = plan
        count, batch_size = len(order), self.local_batch_size
        stop_at = count - count % batch_size if self.drop_last else count
        for start in range(0, stop_at, batch_size):
            stop = min(start + batch_size, stop_at)
            if self.shuffle or self.shards > 1:
                indices = order[start:stop]
                images, labels = self.images.index_select(0, indices), self.labels.index_select(0, indices)
            else:
                images, labels = self.images[start:stop], self.labels[start:stop]
            if top is not None and left is not None and (self.padding or flip is not None):
                flips = None if flip is None else flip[start:stop]
                images = crop_and_flip(images, top[start:stop], left[start:stop], flips, self.padding)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images.float().mul_(self._scale).add_(self._shift), labels


def _epoch_seed(seed: int, epoch: int) -> int:
    """Mix ``(seed, epoch)`` into one 64-bit generator seed (numpy's SeedSequence hashes them well)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
