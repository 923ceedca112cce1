"""Saving, loading and caching trained models.

Teachers take a while to train, so the notebooks train each one once and keep it in a cache directory
(``~/.cache/kdbook``, or wherever ``$KDBOOK_CACHE`` points). A checkpoint is a plain dict::

    {"arch": "resnet32", "num_classes": 10, "state_dict": {...tensors...}, "metadata": {...}}

written atomically (a crash mid-write never leaves a half-written file under the real name) and read
with ``torch.load(..., weights_only=True)``, which refuses to run code hidden in a file (a full pickle
can execute anything when loaded). The metadata holds plain values only: numbers, strings, lists, dicts,
and the training history, so a notebook can plot a cached teacher's learning curve.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
import urllib.error
import urllib.parse
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "cache_dir",
    "checkpoint_path",
    "download_checkpoint",
    "load_checkpoint",
    "load_or_train",
    "save_checkpoint",
]

CACHE_ENV_VAR = "KDBOOK_CACHE"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: corrupt, unsafe, or for another model."""


def cache_dir() -> Path:
    """The cache directory, ``$KDBOOK_CACHE`` or else ``~/.cache/kdbook``; created if missing."""
    configured = os.environ.get(CACHE_ENV_VAR)
    directory = Path(configured).expanduser() if configured else Path.home() / ".cache" / "kdbook"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def checkpoint_path(arch: str, dataset: str, preset: str, seed: int, tag: str = "") -> Path:
    """Where a trained model is cached, e.g. ``<cache>/checkpoints/resnet32_digits_quick_seed0.pt``.

    ``tag`` tells apart variants of the same run (e.g. ``"30ep"`` for a longer schedule).
    """
    parts = [arch, dataset, preset, f"seed{seed}"] + ([tag] if tag else [])
    name = "_".join(str(part) for part in parts)
    if any(separator in name for separator in ("/", "\\", os.sep)):
        raise ValueError(f"Checkpoint name parts must not contain path separators: {name!r}.")
    directory = cache_dir() / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}.pt"


# --------------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------------


def _describe(model: nn.Module) -> tuple[str, int | None]:
    """The (architecture, class count) a checkpoint records: set by ``create_model`` on zoo models."""
    arch = getattr(model, "arch", None) or type(model).__name__
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        classifier = getattr(model, "classifier", None)
        num_classes = getattr(classifier, "out_features", None)
    return str(arch), (int(num_classes) if num_classes is not None else None)


_PLAIN_TYPES = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Metadata must load under ``weights_only=True``: plain values, lists, tuples, dicts, tensors."""
    if isinstance(value, (*_PLAIN_TYPES, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"Checkpoint metadata {where} has a key of type {type(key).__name__}.")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"Checkpoint metadata {where} is a {type(value).__name__}; use plain values (numbers, strings, "
        "lists, dicts) or tensors, so the file loads safely with weights_only=True."
    )


def history_to_dict(history: pd.DataFrame) -> dict[str, list]:
    """A history table as ``{column: [values]}`` of plain Python numbers (safe to store in a checkpoint)."""
    return {
        str(column): [value.item() if hasattr(value, "item") else value for value in history[column]]
        for column in history.columns
    }


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model``'s weights, architecture, class count and ``metadata`` to ``path``, atomically.

    The file is written to a temporary name in the same directory, flushed to disk (fsync), then renamed
    over ``path`` in one step (``os.replace``): a crash or a full disk never leaves a partial file under
    ``path``. A ``pandas.DataFrame`` in the metadata (e.g. ``history=``) is stored as a dict of lists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        key: history_to_dict(value) if isinstance(value, pd.DataFrame) else value
        for key, value in metadata.items()
    }
    _check_plain(metadata, "metadata")
    arch, num_classes = _describe(model)
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    checkpoint = {"arch": arch, "num_classes": num_classes, "state_dict": state_dict, "metadata": metadata}

    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless to skip where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at ``path``, read safely (``weights_only=True``) onto the CPU.

    Raises ``FileNotFoundError`` if there is no file and :class:`CheckpointError` if it is corrupt,
    truncated, not a kdbook checkpoint, or holds objects that a weights-only load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            raise CheckpointError(
                f"Refusing to load {path}: it holds Python objects other than tensors and plain values, "
                "and loading those could run arbitrary code. Only load files you trust; kdbook "
                "checkpoints never need this."
            ) from error
        raise _corrupt(path, error) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _corrupt(path, error) from error
    required = {"arch", "num_classes", "state_dict", "metadata"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a kdbook checkpoint (expected the keys {sorted(required)}, found {found}). "
            "Save models with kdbook_utils.checkpoints.save_checkpoint."
        )
    return checkpoint


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error}). "
        f"Delete it (os.remove({str(path)!r})) and run again to retrain."
    )


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights at ``path`` into ``model`` and return the checkpoint's metadata.

    Refuses (``CheckpointError``) a checkpoint of another architecture or class count, naming both,
    and a file that is corrupt or not weights-only. The model keeps its device.
    """
    checkpoint = read_checkpoint(path)
    arch, num_classes = _describe(model)
    if checkpoint["arch"] != arch or checkpoint["num_classes"] != num_classes:
        raise CheckpointError(
            f"Cannot load {path}: checkpoint is {checkpoint['arch']} with {checkpoint['num_classes']} "
            f"classes, model is {arch} with {num_classes} classes."
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # e.g. same name, different in_channels or width
        raise CheckpointError(f"The weights in {path} do not fit this {arch}: {error}") from error
    return checkpoint["metadata"]


def load_or_train(
    model: nn.Module,
    path: str | os.PathLike,
    train_fn: Callable[[nn.Module], pd.DataFrame | None],
    **metadata: Any,
) -> tuple[nn.Module, pd.DataFrame | None, bool]:
    """Load ``model``'s weights from ``path`` if the file exists; otherwise train it and save it there.

    ``train_fn(model)`` trains in place and may return the history table, which is saved inside the
    checkpoint so that a model loaded from the cache still has its learning curve. Returns
    ``(model, history or None, loaded)`` where ``loaded`` says whether the file was used.
    """
    path = Path(path)
    if path.is_file():
        stored = load_checkpoint(model, path)
        history = stored.get("history")
        return model, (pd.DataFrame(history) if history is not None else None), True
    history = train_fn(model)
    if history is not None and not isinstance(history, pd.DataFrame):
        raise TypeError(f"train_fn must return a pandas DataFrame or None, got {type(history).__name__}.")
    save_checkpoint(model, path, **metadata, history=history)
    return model, history, False


# --------------------------------------------------------------------------------------------------------
# Downloads (instructors may host trained teachers)
# --------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_checkpoint(url: str, sha256: str, filename: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` into ``<cache>/downloads`` and check its SHA-256; returns the file's path.

    A file already there with the right hash is used without downloading. A download whose hash differs
    from ``sha256`` is deleted and raises a ``CheckpointError`` naming the expected and actual hashes.
    If the URL cannot be reached (e.g. offline), the error says where to put the file by hand.
    """
    expected = sha256.strip().lower()
    if len(expected) != 64 or any(character not in "0123456789abcdef" for character in expected):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}.")
    name = filename or Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"Cannot tell a file name from the URL {url!r}; pass filename=...")
    directory = cache_dir() / "downloads"
    directory.mkdir(parents=True, exist_ok=True)
    destination = directory / name
    if destination.is_file():
        if _sha256(destination) == expected:
            return destination
        destination.unlink()  # stale or damaged: fetch it again

    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    os.close(handle)
    try:
        try:
            torch.hub.download_url_to_file(url, temporary, progress=progress)
        except (urllib.error.URLError, OSError) as error:
            raise CheckpointError(
                f"Could not download {url} ({error}). If this machine is offline, fetch the file on another "
                f"machine and place it at {destination} (its SHA-256 must be {expected})."
            ) from error
        actual = _sha256(Path(temporary))
        if actual != expected:
            raise CheckpointError(
                f"The file downloaded from {url} has SHA-256 {actual}, expected {expected}; it was deleted. "
                "The file on the server may have changed, or the download was damaged."
            )
        os.replace(temporary, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return destination
