"""Saving, loading and caching trained models.

Teachers take a while to train, so the notebooks train each one once and keep it in a cache directory
(``~/.cache/kdbook``, or wherever ``$KDBOOK_CACHE`` points). A checkpoint is a plain dict::

    {"arch": "resnet32", "num_classes": 10, "state_dict": {...tensors...}, "metadata": {...},
     "sha256": "9f2c..."}

written atomically (a crash mid-write never leaves a half-written file under the real name) and read
with ``torch.load(..., weights_only=True)``, which refuses to run code hidden in a file (a full pickle
can execute anything when loaded). The metadata holds plain values only: numbers, strings, lists, dicts,
and the training history, so a notebook can plot a cached teacher's learning curve.

**Verified on load.** ``sha256`` is the SHA-256 of everything else in the checkpoint (each tensor's name,
dtype, shape and bytes, and every plain value; :func:`content_sha256`), computed when it is saved. Loading
checks, in order: that the file is a zip archive (PyTorch's format) holding a PyTorch file, that every
part of the archive passes its CRC-32 check, that it unpickles under ``weights_only=True``, that it has
the keys above, and that its contents hash to ``sha256``. A file that fails is never loaded:

* a truncated or damaged file raises :class:`CorruptCheckpointError`, naming its path and saying to delete
  it to retrain (:func:`load_or_train` can retrain by itself: ``retrain_if_corrupt=True``);
* a file that is not a checkpoint at all (a text file, random bytes, a zip of other files, a plain pickle,
  a bare ``state_dict``) raises :class:`NotACheckpointError`, saying what it looks like;
* a pickle holding Python objects other than tensors and plain values raises :class:`CheckpointError`
  (loading it could run arbitrary code).

Checkpoints saved before the hash was added load with an :class:`UnverifiedCheckpointWarning` (their zip
CRC-32 checks still pass); saving the model again adds the hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from kdbook_utils.errors import Seen as _Seen
from kdbook_utils.errors import must_be

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "NotACheckpointError",
    "ShippedModelError",
    "UnverifiedCheckpointWarning",
    "cache_dir",
    "content_sha256",
    "file_sha256",
    "load_checkpoint",
    "load_or_train",
    "read_checkpoint",
    "save_checkpoint",
    "shipped_model",
    "shipped_models",
]

CACHE_ENV_VAR = "KDBOOK_CACHE"
CHECKPOINT_KEYS: tuple[str, ...] = ("arch", "num_classes", "state_dict", "metadata")
HASH_KEY = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: corrupt, unsafe, not a checkpoint, or for another model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that was damaged after it was written (cut short, bytes changed, empty): retrain it."""


class NotACheckpointError(CheckpointError):
    """A file that is not a kdbook checkpoint at all: text, random bytes, another zip, a bare state dict."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint saved before checkpoints carried a SHA-256: loaded on its zip CRC-32 checks alone."""


def cache_dir() -> Path:
    """The cache directory, ``$KDBOOK_CACHE`` or else ``~/.cache/kdbook``; created if missing."""
    configured = os.environ.get(CACHE_ENV_VAR)
    directory = Path(configured).expanduser() if configured else Path.home() / ".cache" / "kdbook"
    where = f"${CACHE_ENV_VAR}" if configured else "The cache folder (~/.cache/kdbook)"
    fix = f"Point ${CACHE_ENV_VAR} at a folder you can write, e.g. export {CACHE_ENV_VAR}=~/kdbook-cache."
    blocking = next((part for part in (directory, *directory.parents) if part.exists()), None)
    if blocking is not None and not blocking.is_dir():
        what = "a file" if blocking == directory else f"inside {blocking}, which is a file"
        raise NotADirectoryError(must_be(where, "a folder", _Seen(f"{str(directory)!r} ({what})"), fix))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as error:
        raise PermissionError(
            must_be(where, "a folder you can write", _Seen(repr(str(directory))), fix)
        ) from error
    return directory


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
    """Metadata must load under ``weights_only=True``: plain values, lists, tuples, dicts, tensors.

    Plain means exactly ``str``, ``int``, ``float``, ``bool`` or ``None``: a NumPy number is a subclass of
    ``float`` or ``int`` but pickles as a NumPy object, which a weights-only load refuses.
    """
    if type(value) in _PLAIN_TYPES or isinstance(value, torch.Tensor):
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
        must_be(
            f"Checkpoint {where}",
            "a plain value (number, string, list, dict) or a tensor, so the file loads with weights_only=True",
            value
            if type(value).__module__ == "builtins"
            else _Seen(f"a {type(value).__module__}.{type(value).__name__}"),
            "Convert it, e.g. float(x) or x.item() for a NumPy number, or leave it out.",
        )
    )


def history_to_dict(history: pd.DataFrame) -> dict[str, list]:
    """A history table as ``{column: [values]}`` of plain Python numbers (safe to store in a checkpoint)."""
    return {
        str(column): [value.item() if hasattr(value, "item") else value for value in history[column]]
        for column in history.columns
    }


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    storage: torch.dtype | None = None,
    leave_out: tuple[str, ...] = (),
    **metadata: Any,
) -> Path:
    """Write ``model``'s weights, architecture, class count and ``metadata`` to ``path``, atomically.

    ``storage=torch.float16`` stores floating-point weights in half precision (half the file; loading
    converts them back to the model's dtype). ``leave_out`` names state-dict prefixes not to store, e.g.
    ``("backbone.",)`` for exit heads trained on a frozen teacher that the loader rebuilds itself; the
    checkpoint records them (``metadata["left_out"]``) and :func:`load_checkpoint` leaves those weights
    as the model has them.

    The checkpoint carries the SHA-256 of its contents (:func:`content_sha256`), checked at load. The
    file is written to a temporary name in the same directory, flushed to disk (fsync), then renamed over
    ``path`` in one step (``os.replace``): a crash, a kill or a full disk never leaves a partial file under
    ``path``, and an old checkpoint there stays intact until the new one is complete. A
    ``pandas.DataFrame`` in the metadata (e.g. ``history=``) is stored as a dict of lists.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(must_be("model", "a torch.nn.Module", _Seen(f"a {type(model).__name__}")))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        key: history_to_dict(value) if isinstance(value, pd.DataFrame) else value
        for key, value in metadata.items()
    }
    if leave_out:
        metadata["left_out"] = list(leave_out)
    _check_plain(metadata, "metadata")
    arch, num_classes = _describe(model)
    state_dict = {
        name: _stored(tensor, storage)
        for name, tensor in model.state_dict().items()
        if not (leave_out and name.startswith(leave_out))
    }
    checkpoint: dict[str, Any] = {
        "arch": arch,
        "num_classes": num_classes,
        "state_dict": state_dict,
        "metadata": metadata,
    }
    checkpoint[HASH_KEY] = content_sha256(checkpoint)

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


def _stored(tensor: torch.Tensor, storage: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.to(storage) if storage is not None and tensor.is_floating_point() else tensor


def content_sha256(checkpoint: Mapping[str, Any]) -> str:
    """The SHA-256 of a checkpoint's contents: every key except ``"sha256"``, in order.

    Tensors contribute their dtype, shape and raw bytes (so ``-0.0`` and ``0.0``, or two NaN payloads,
    differ); strings, numbers, ``None``, lists, tuples and dicts contribute their type and value. Any
    change to a weight, a buffer, the architecture, the class count or the metadata changes the hash.
    """
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in checkpoint.items() if key != HASH_KEY})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` with its type and length, so different structures never collide."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"dict {len(value)}\n".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, str):
        encoded = value.encode()
        digest.update(f"str {len(encoded)}\n".encode() + encoded)
    elif value is None or isinstance(value, (bool, int, float)):
        digest.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise TypeError(f"Cannot hash a {type(value).__name__} in a checkpoint; use plain values or tensors.")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless to skip where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at ``path``, verified (see the module docstring) and read onto the CPU.

    Raises ``FileNotFoundError`` if there is no file, :class:`CorruptCheckpointError` if it was damaged,
    :class:`NotACheckpointError` if it is not a kdbook checkpoint at all, and :class:`CheckpointError` if
    it holds objects that a weights-only load refuses.
    """
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "nothing"
        raise FileNotFoundError(f"No checkpoint at {path} (there is {what} there).")
    if path.stat().st_size == 0:
        raise _corrupt(path, "it is empty (0 bytes), so its writing never finished")
    with open(path, "rb") as file:
        head = file.read(64)
    if not head.startswith(b"PK"):  # every PyTorch file since 1.6 is a zip archive
        raise _not_a_checkpoint(path, _what_it_looks_like(head))
    _check_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            # The archive passed its CRC-32 checks, so this pickle was written like this, not damaged.
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            raise CheckpointError(
                f"Refusing to load {path}: it holds Python objects other than tensors and plain values"
                f"{f' ({found.group(1)})' if found else ''}, and loading those could run arbitrary code. "
                "Only load files you trust; kdbook checkpoints never need this. If you wrote it yourself, "
                "save the model again with kdbook_utils.checkpoints.save_checkpoint."
            ) from error
        raise _corrupt(path, f"it does not unpickle: {error}") from error
    except Exception as error:  # any failure to read an archive that passed its CRC-32 checks is damage
        raise _corrupt(path, f"{type(error).__name__}: {error}") from error
    if not isinstance(checkpoint, dict) or not set(CHECKPOINT_KEYS) <= checkpoint.keys():
        if (
            isinstance(checkpoint, dict)
            and checkpoint
            and all(isinstance(value, torch.Tensor) for value in checkpoint.values())
        ):
            found = f"a bare state_dict of {len(checkpoint)} tensors"
            fix = "Load it with model.load_state_dict(torch.load(path, weights_only=True))"
        else:
            found = (
                f"the keys {sorted(map(str, checkpoint))}"
                if isinstance(checkpoint, dict)
                else (f"a {type(checkpoint).__name__}")
            )
            fix = "Save models with kdbook_utils.checkpoints.save_checkpoint"
        raise NotACheckpointError(
            f"{path} is a PyTorch file but not a kdbook checkpoint: it holds {found}, not the keys "
            f"{list(CHECKPOINT_KEYS)}. {fix}, or delete it to retrain."
        )
    stored = checkpoint.get(HASH_KEY)
    if stored is None:
        warnings.warn(
            f"{path} was saved before kdbook checkpoints carried a SHA-256, so only the zip archive's CRC-32 "
            "checks verified it. Save the model again (save_checkpoint) to add the hash, or delete it to "
            "retrain.",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )
    elif stored != content_sha256(checkpoint):
        raise _corrupt(path, "its contents do not match the SHA-256 written when it was saved")
    return checkpoint


def _check_archive(path: Path) -> None:
    """Refuse a zip that is damaged (CRC-32 of every part) or that holds no PyTorch file."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every part: also catches names changed in one directory
            names = archive.namelist()
    except Exception as error:  # BadZipFile, zlib.error, EOFError, ...: all mean damage
        raise _corrupt(path, f"it is cut short or its zip structure is damaged ({error})") from error
    if damaged is not None:
        raise _corrupt(path, f"its part {damaged!r} fails its CRC-32 check")
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise _not_a_checkpoint(path, f"a zip archive of other files ({shown or 'empty'})")


def _what_it_looks_like(head: bytes) -> str:
    """A guess at what a file that is not a zip archive is, from its first bytes."""
    if head.startswith(b"\x80"):
        return "a Python pickle or a PyTorch file in the legacy (pre-1.6) format, which kdbook never writes"
    for magic, kind in (
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"%PDF", "a PDF document"),
        (b"\x1f\x8b", "a gzip file"),
        (b"\x89HDF", "an HDF5 file"),
    ):
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(character.isprintable() or character in "\t\r\n" for character in text):
        return f"a text file (it starts with {text[:40]!r})"
    return f"binary data that no PyTorch file starts with (first bytes: {head[:8].hex(' ')})"


def _corrupt(path: Path, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"The checkpoint {path} is corrupt: {reason}. Delete it to retrain: os.remove({str(path)!r}), then "
        "run again."
    )


def _not_a_checkpoint(path: Path, looks_like: str) -> NotACheckpointError:
    return NotACheckpointError(
        f"{path} is not a checkpoint: it is {looks_like}. Pass the path of a file written by save_checkpoint; "
        "if this file was one, it is damaged beyond recognition: delete it to retrain."
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
            f"classes, model is {arch} with {num_classes} classes. Load it into "
            f"create_model({checkpoint['arch']!r}, {checkpoint['num_classes']}), or pick this model's checkpoint."
        )
    left_out = tuple(checkpoint["metadata"].get("left_out", ()))
    try:
        missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=not left_out)
        stray = [name for name in missing if not name.startswith(left_out)] + list(unexpected)
        if stray:
            raise RuntimeError(f"keys that do not match: {stray[:5]}")
    except RuntimeError as error:  # e.g. same name, different in_channels or width
        raise CheckpointError(
            f"The weights in {path} do not fit this {arch}: {error}. Create the model with the options it was "
            "saved with (e.g. the same in_channels or width)."
        ) from error
    return checkpoint["metadata"]


def load_or_train(
    model: nn.Module,
    path: str | os.PathLike,
    train_fn: Callable[[nn.Module], pd.DataFrame | None],
    *,
    retrain_if_corrupt: bool = False,
    **metadata: Any,
) -> tuple[nn.Module, pd.DataFrame | None, bool]:
    """Load ``model``'s weights from ``path`` if the file exists; otherwise train it and save it there.

    ``train_fn(model)`` trains in place and may return the history table, which is saved inside the
    checkpoint so that a model loaded from the cache still has its learning curve. Returns
    ``(model, history or None, loaded)`` where ``loaded`` says whether the file was used.

    A corrupt checkpoint (:class:`CorruptCheckpointError`) is an error unless ``retrain_if_corrupt``:
    then a warning names it and the model is trained and saved over it. Other problems (a checkpoint of
    another model, a file that is not a checkpoint, an unsafe pickle) are always errors.
    """
    path = Path(path)
    if path.is_file():
        try:
            stored = load_checkpoint(model, path)
        except CorruptCheckpointError as error:
            if not retrain_if_corrupt:
                raise CorruptCheckpointError(
                    f"{error} Or pass retrain_if_corrupt=True to load_or_train to retrain and replace it."
                ) from error
            warnings.warn(
                f"{error} Retraining (retrain_if_corrupt=True); the new checkpoint replaces it.", stacklevel=2
            )
        else:
            history = stored.get("history")
            return model, (pd.DataFrame(history) if history is not None else None), True
    history = train_fn(model)
    if history is not None and not isinstance(history, pd.DataFrame):
        raise TypeError(
            must_be(
                "train_fn's return value", "a pandas DataFrame or None", _Seen(f"a {type(history).__name__}")
            )
        )
    save_checkpoint(model, path, **metadata, history=history)
    return model, history, False


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hexadecimal."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Shipped models: trained teachers that travel with the package
# --------------------------------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parent / "teachers"
"""The package's trained teachers: ``<name>_<recipe hash>.pt`` files and ``manifest.json``, which records
each file's SHA-256, its recipe, what it was trained on, its precision and its test accuracy."""

MANIFEST = "manifest.json"


class ShippedModelError(CheckpointError):
    """A shipped model file whose bytes do not match the SHA-256 its manifest records."""


def shipped_models(folder: Path = SHIPPED) -> dict[str, dict[str, Any]]:
    """The manifest of the shipped models, ``{file name: record}`` (empty when none ship)."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["models"]


def shipped_model(filename: str, folder: Path = SHIPPED) -> tuple[Path, dict[str, Any]] | None:
    """The shipped file ``filename`` and its manifest record, its SHA-256 checked; None if none ships.

    A file whose bytes differ from the manifest's SHA-256 (damaged, or replaced by hand) raises a
    :class:`ShippedModelError` naming both hashes; it is never loaded.
    """
    record = shipped_models(folder).get(filename)
    path = folder / filename
    if record is None or not path.is_file():
        return None
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise ShippedModelError(
            f"The shipped model {path} has SHA-256 {actual}, but the package's manifest records "
            f"{record['sha256']}: the file was damaged or changed. Reinstall the package (pip install "
            "--force-reinstall kdbook-utils), or train the teacher yourself (the lesson's train_teachers)."
        )
    return path, record
