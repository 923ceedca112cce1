"""One readable training loop for every method.

A *method* is an ``nn.Module`` whose ``forward(images, labels)`` returns ``(logits, losses)``: the
student's logits and a dict of named loss terms, e.g. ``{"ce": ..., "kd": ...}``. The loop adds the terms,
steps the optimiser and logs every term. Plain cross-entropy training is the simplest method
(:class:`CrossEntropy`); every distiller in ``kdbook_utils.methods`` is another.

The public functions:

* :func:`fit` trains a method (or a plain model) and returns its history, one row per epoch;
* :func:`evaluate` and :func:`predict` measure a trained model;
* :func:`seed_everything` and :func:`choose_device` set up a run;
* :func:`configure_cpu_performance` tunes the memory allocator for CPU training (``fit`` calls it).

A note for readers of the loop: on a GPU, every ``.item()`` (or ``float(tensor)``) makes the CPU wait for
the GPU to finish. The loop therefore adds the per-batch losses up *as tensors* and reads them only once
per epoch, and for the progress bar at most twice a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

__all__ = [
    "CrossEntropy",
    "Distiller",
    "autocast_dtype",
    "choose_device",
    "configure_cpu_performance",
    "evaluate",
    "fit",
    "lr_factor",
    "predict",
    "seed_everything",
]

Batches = Iterable[tuple[Tensor, Tensor]]
"""Anything that yields ``(images, labels)`` batches: a ``TensorLoader``, a ``DataLoader``, a list."""

Schedule = Union[str, Callable[[int, int], float]]
"""``"cosine"``, ``"step"``, ``"constant"``, or ``factor(epoch, epochs) -> float`` (epoch counts from 0)."""


# --------------------------------------------------------------------------------------------------------
# The method contract
# --------------------------------------------------------------------------------------------------------


class Distiller(nn.Module):
    """Base class of every method: a student, an optional frozen teacher, and named loss terms.

    Subclasses implement :meth:`forward`, which returns the student's logits and a dict of named loss
    terms; :func:`fit` minimises their sum and logs each one. The teacher (if any) is frozen: its
    parameters do not require gradients and it stays in eval mode even while the method is in training
    mode (so its batch-norm statistics and dropout never change).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"The student must be an nn.Module, got {type(student).__name__}.")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for parameter in teacher.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser updates: the student's and any extra modules a method adds."""
        return (p for p in self.parameters() if p.requires_grad)

    def on_batch_start(self, epoch: int, batch: int) -> None:
        """Called by :func:`fit` before each training batch, with zero-based epoch and batch indices.

        A method that caches teacher outputs, or changes a loss weight over training, keys on these.
        """

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images, labels).")


class CrossEntropy(Distiller):
    """Training without a teacher: the loss is the cross-entropy with the true labels."""

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}


def as_method(model_or_method: nn.Module) -> Distiller:
    """A :class:`Distiller` as is; a plain model wrapped in :class:`CrossEntropy` (it trains in place)."""
    if isinstance(model_or_method, Distiller):
        return model_or_method
    if isinstance(model_or_method, nn.Module):
        return CrossEntropy(model_or_method)
    raise TypeError(f"Expected an nn.Module or a Distiller, got {type(model_or_method).__name__}.")


def _student_of(model_or_method: nn.Module) -> nn.Module:
    """The network whose predictions count: a Distiller's student, or the model itself."""
    return model_or_method.student if isinstance(model_or_method, Distiller) else model_or_method


# --------------------------------------------------------------------------------------------------------
# Devices, seeds, CPU tuning
# --------------------------------------------------------------------------------------------------------


def choose_device(preferred: str | torch.device | None = "auto") -> torch.device:
    """The device to train on: ``"auto"`` (or None) picks CUDA, then Apple's MPS, then the CPU.

    Also accepts ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``; asking for a GPU
    that this machine (or this PyTorch build) does not have raises a ``RuntimeError`` that says so.
    """
    if preferred is None or (isinstance(preferred, str) and preferred.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred.strip().lower() if isinstance(preferred, str) else preferred)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"Unknown device {preferred!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"CUDA was requested (device={preferred!r}) but no CUDA GPU is available to this PyTorch "
                f"({torch.__version__}). Use device='auto' or 'cpu', or on Colab pick a GPU runtime "
                "(Runtime > Change runtime type)."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"CUDA device {device.index} was requested but only {torch.cuda.device_count()} "
                "GPU(s) are visible."
            )
    elif device.type == "mps" and not _mps_available():
        raise RuntimeError(
            f"MPS (Apple GPU) was requested (device={preferred!r}) but is not available here. "
            "Use device='auto' or 'cpu'."
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unsupported device {preferred!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and every GPU) with ``seed``.

    What is bit-reproducible:

    * **CPU**: the same seed, code, data order, PyTorch version and number of threads
      (``torch.get_num_threads()``) give identical weights, run after run. A different thread count or
      CPU type may change the last bits (floating-point sums in another order), and those grow over
      training into visibly different, equally good, runs.
    * **GPU**: *not* bit-reproducible by default. cuDNN picks convolution algorithms by timing them
      (``cudnn.benchmark``, which :func:`fit` switches on for speed) and some backward kernels add with
      atomics in a varying order. ``deterministic=True`` asks PyTorch for deterministic algorithms and
      turns benchmarking off: slower, and reproducible only on the same GPU model and software.

    Data order is reproducible separately: ``TensorLoader`` shuffles with its own seeded generator.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


CPU_TUNING_ENV_VAR = "KDBOOK_CPU_TUNING"

# glibc's mallopt() parameter numbers (from <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MALLOC_SETTINGS: dict[str, tuple[int, int]] = {
    # name: (mallopt parameter, value)
    "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 32 * 1024**2),  # glibc's largest allowed value on 64-bit
    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 1024**3),
    "M_TOP_PAD": (_M_TOP_PAD, 256 * 1024**2),
}

_cpu_tuning_report: str | None = None


def configure_cpu_performance(enabled: bool | None = None) -> str:
    """Keep training memory mapped between steps, which makes CPU training much faster (glibc Linux).

    Why: every training step allocates and frees the same activation and gradient buffers (megabytes
    each). By default glibc's ``malloc`` serves blocks over a (dynamic) threshold with fresh ``mmap``
    calls and gives freed memory back to the kernel at once, so each step pays for page faults and
    zeroing of pages it used a moment ago. Measured on a 2-core machine (ResNet-8, batch 128), raising
    the thresholds together with channels-last tensors took training from about 1,500 to 2,500 images/s.

    What it changes, for this whole process (glibc's ``mallopt``; it cannot be undone cleanly):

    * ``M_MMAP_THRESHOLD`` = 32 MiB: blocks below 32 MiB come from the heap, not from ``mmap``;
    * ``M_TRIM_THRESHOLD`` = 1 GiB: freed heap memory is kept (up to 1 GiB) for reuse;
    * ``M_TOP_PAD`` = 256 MiB: the heap grows in large steps.

    The cost: freed memory stays mapped (up to 1 GiB at the top of the heap), so the process's resident
    memory (RSS) stays near its peak instead of shrinking after every step. The same settings can be made before Python starts with
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456``.

    ``enabled``: True applies the settings, False does nothing, None (the default) applies them unless
    the environment variable ``KDBOOK_CPU_TUNING=0`` switches them off. On macOS, Windows, or a Linux
    without glibc (e.g. Alpine's musl) it does nothing. Applying twice does nothing more.
    :func:`fit` calls this once when training on the CPU.

    Returns one line saying what it did.
    """
    global _cpu_tuning_report
    if enabled is None:
        enabled = os.environ.get(CPU_TUNING_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")
    if not enabled:
        return f"CPU allocator tuning is off ({CPU_TUNING_ENV_VAR}=0 or enabled=False): nothing changed."
    if _cpu_tuning_report is not None:
        return _cpu_tuning_report
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        _cpu_tuning_report = f"CPU allocator tuning skipped: needs glibc Linux (this is {sys.platform})."
        return _cpu_tuning_report
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as error:
        _cpu_tuning_report = f"CPU allocator tuning skipped: could not reach glibc's mallopt ({error})."
        return _cpu_tuning_report
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied, refused = [], []
    for name, (parameter, value) in _MALLOC_SETTINGS.items():
        (applied if mallopt(parameter, value) == 1 else refused).append(f"{name}={value // 1024**2} MiB")
    _cpu_tuning_report = "CPU allocator tuning (glibc mallopt): set " + ", ".join(applied)
    if refused:
        _cpu_tuning_report += "; refused " + ", ".join(refused)
    _cpu_tuning_report += f". Switch off with {CPU_TUNING_ENV_VAR}=0."
    return _cpu_tuning_report


# --------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------------

STEP_GAMMA = 0.1
DEFAULT_MILESTONES = (150 / 240, 180 / 240, 210 / 240)
"""RepDistiller's CIFAR-100 recipe (decay at epochs 150, 180, 210 of 240), as fractions of the run."""


def lr_factor(
    schedule: Schedule, epoch: int, epochs: int, milestones: Sequence[float] | None = None
) -> float:
    """The learning rate of (zero-based) ``epoch`` as a multiple of the initial one.

    * ``"constant"``: 1.
    * ``"cosine"``: ½ (1 + cos(π · epoch / epochs)), from 1 at the start towards 0 at the end
      (Loshchilov & Hutter 2017, SGDR, without restarts).
    * ``"step"``: 0.1 to the power of the number of milestones reached. A milestone below 1 is a fraction
      of the run (0.5 = halfway), otherwise an epoch number: RepDistiller's 150, 180, 210 of 240 epochs mean
      epochs 1-150 (zero-based 0-149) train at the full rate. Default: those three, as fractions.
    * a function ``factor(epoch, epochs)``: used as is.
    """
    if callable(schedule):
        return float(schedule(epoch, epochs))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        boundaries = [round(m * epochs) if m < 1 else int(m) for m in (milestones or DEFAULT_MILESTONES)]
        return STEP_GAMMA ** sum(epoch >= boundary for boundary in boundaries)
    raise ValueError(f"Unknown schedule {schedule!r}: use 'cosine', 'step', 'constant' or a function.")


# --------------------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------------------


def autocast_dtype(amp: bool | str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The dtype :func:`fit` runs ``amp`` in on ``device``, or None for float32 throughout.

    ``amp=None`` (the default) means mixed precision on CUDA only; True picks bfloat16 where the hardware
    runs it natively, else float16; ``"bf16"``/``"fp16"`` (or the torch dtypes) choose; False turns it off.
    """
    if amp is None:
        amp = device.type == "cuda"
    if amp is False:
        return None
    if amp is True:
        if device.type == "cuda":
            # bfloat16 needs no loss scaling, but only Ampere (compute capability 8) and later run it
            # natively; older GPUs such as Colab's T4 get float16 with a gradient scaler.
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return torch.bfloat16
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if isinstance(amp, str) and amp.lower() in names:
        return names[amp.lower()]
    if amp in (torch.bfloat16, torch.float16):
        return amp  # type: ignore[return-value]
    raise ValueError(f"amp must be None, True, False, 'bf16' or 'fp16', got {amp!r}.")


def _grad_scaler(dtype: torch.dtype | None, device: torch.device) -> Any:
    """A gradient scaler, active only for float16 on CUDA (float16 gradients underflow without one).

    Inactive, its methods pass through: ``scale(loss)`` is ``loss``, ``step(optimizer)`` is
    ``optimizer.step()``, and ``unscale_``/``update`` do nothing.
    """
    enabled = dtype == torch.float16 and device.type == "cuda"
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # PyTorch < 2.3


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _uses_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are stored channels-last (so inputs should be too)."""
    for parameter in model.parameters():
        if parameter.dim() == 4:
            return (
                parameter.is_contiguous(memory_format=torch.channels_last) and not parameter.is_contiguous()
            )
    return False


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------------


def fit(
    method: nn.Module,
    train_loader: Batches,
    val_loader: Batches | None = None,
    *,
    epochs: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    schedule: Schedule = "cosine",
    milestones: Sequence[float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device | None = None,
    amp: bool | str | torch.dtype | None = None,
    channels_last: bool | None = None,
    progress: bool = True,
    desc: str | None = None,
    grad_clip: float | None = None,
) -> pd.DataFrame:
    """Train ``method`` (a :class:`Distiller`, or a plain model trained with cross-entropy) in place.

    Each step minimises the sum of the method's loss terms with SGD (Nesterov momentum 0.9, weight decay
    5e-4, the RepDistiller recipe) unless a ready ``optimizer`` is given; the learning rate follows
    ``schedule`` (see :func:`lr_factor`), changed once per epoch. Stop it at any time (Ctrl-C, or the
    notebook's stop button): it prints a notice and returns the epochs completed so far, and the model
    keeps the weights it had when stopped.

    Args:
        method: what to train. Its parameters that require gradients are optimised (a frozen teacher's
            are not). Moved to ``device``; it is left in eval mode when training ends.
        train_loader, val_loader: iterables of ``(images, labels)`` batches, e.g. ``TensorLoader``. With a
            ``val_loader``, the student is evaluated after every epoch.
        epochs: passes over ``train_loader``.
        lr, momentum, weight_decay, nesterov: SGD settings (ignored when ``optimizer`` is given).
        schedule, milestones: the learning-rate schedule; ``milestones`` only matter for ``"step"``.
        optimizer: a ready optimiser over the method's parameters; the schedule scales its learning rates.
        device: ``"auto"`` by default (CUDA, then MPS, then CPU); see :func:`choose_device`.
        amp: mixed precision. Default: on for CUDA (bfloat16 where the GPU supports it, else float16 with
            a gradient scaler), off elsewhere. ``"bf16"``/``"fp16"`` choose; False forces float32.
        channels_last: store images and convolution weights as N, H, W, C, which the CPU (oneDNN) and GPU
            (cuDNN) convolutions run faster. Default: on for CPU and CUDA, off for MPS.
        progress: show progress bars (an epoch bar and a batch bar); False for silence.
        desc: the epoch bar's label, e.g. ``"teacher resnet32"``.
        grad_clip: if set, clip the gradient norm to this value before each step.

    Returns:
        The history, a ``pandas.DataFrame`` with one row per completed epoch: ``epoch`` (from 1), one
        column per loss term (``train_<term>``, epoch mean), ``train_loss`` (their sum), ``train_acc``
        (fraction correct in [0, 1], measured on the fly while training), ``val_loss`` and ``val_acc``
        (cross-entropy and accuracy of the student, with a ``val_loader``), ``lr``, and ``seconds`` (the
        epoch's wall time, validation included).
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}.")
    lr_factor(schedule, 0, epochs, milestones)  # reject an unknown schedule before any work

    method = as_method(method)
    device = choose_device(device)
    amp_dtype = autocast_dtype(amp, device)
    scaler = _grad_scaler(amp_dtype, device)
    if channels_last is None:
        channels_last = device.type in ("cpu", "cuda")
    if device.type == "cpu":
        configure_cpu_performance()
    elif device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # our input sizes are fixed: let cuDNN pick its fastest kernels

    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if optimizer is None:
        parameters = list(method.trainable_parameters())
        if not parameters:
            raise ValueError("The method has no trainable parameters (does everything require_grad=False?).")
        optimizer = torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov and momentum > 0,
        )
    # A learning-rate schedule scales each group's initial rate (PyTorch's convention: "initial_lr").
    base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]

    rows: list[dict[str, float]] = []
    epoch_bar = tqdm(range(epochs), desc=desc or "training", unit="epoch", disable=not progress)
    batch_bar = tqdm(
        total=_length(train_loader), desc=f"epoch 1/{epochs}", unit="batch", leave=False, disable=not progress
    )
    epoch = 0
    try:
        for epoch in epoch_bar:
            started = time.perf_counter()
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * lr_factor(schedule, epoch, epochs, milestones)

            # ---- one pass over the training data ----
            method.train()
            loss_sums: dict[str, Tensor] = {}  # term -> sum over samples, kept on the device
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            batch_bar.reset(total=_length(train_loader))
            batch_bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
            batch_bar.set_postfix({}, refresh=False)
            last_postfix = time.monotonic()
            for batch_index, (images, labels) in enumerate(train_loader):
                images, labels = _to_device(images, labels, device, channels_last)
                method.on_batch_start(epoch, batch_index)
                with _autocast(device, amp_dtype):
                    logits, losses = method(images, labels)
                    loss = _total_loss(losses)

                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # the scaler does nothing unless training in float16
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(method.trainable_parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()

                # Bookkeeping as tensor arithmetic: no waiting for the GPU here.
                batch_size = labels.shape[0]
                with torch.no_grad():
                    for name, value in losses.items():
                        weighted = value.detach().float() * batch_size
                        loss_sums[name] = loss_sums[name] + weighted if name in loss_sums else weighted
                    correct += (logits.detach().argmax(dim=1) == labels).sum()
                seen += batch_size
                batch_bar.update()
                if progress and time.monotonic() - last_postfix > 0.5:  # reads the GPU twice a second at most
                    last_postfix = time.monotonic()
                    batch_bar.set_postfix(_running_summary(loss_sums, correct, seen), refresh=False)

            if seen == 0:
                raise ValueError("train_loader yielded no batches.")
            # ---- the epoch's row of the history ----
            row: dict[str, float] = {"epoch": epoch + 1}
            means = {name: total.item() / seen for name, total in loss_sums.items()}
            row.update({f"train_{name}": mean for name, mean in means.items()})
            row["train_loss"] = sum(means.values())
            row["train_acc"] = correct.item() / seen
            if val_loader is not None:
                method.eval()
                scores = _evaluate(_student_of(method), val_loader, device, amp_dtype, channels_last)
                row["val_loss"], row["val_acc"] = scores["loss"], scores["accuracy"]
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            epoch_bar.set_postfix(_epoch_summary(row), refresh=True)
    except KeyboardInterrupt:
        print(
            f"Training interrupted during epoch {epoch + 1}/{epochs}: returning the history of the "
            f"{len(rows)} completed epoch(s); the model keeps its current weights."
        )
    finally:
        batch_bar.close()
        epoch_bar.close()
        method.eval()
    if not rows:  # interrupted in the first epoch: an empty table that still names the usual columns
        return pd.DataFrame(columns=["epoch", "train_loss", "train_acc", "lr", "seconds"])
    return pd.DataFrame(rows)


def _length(loader: Batches) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _to_device(
    images: Tensor, labels: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    """Move a batch to ``device`` (a no-op when the loader already put it there)."""
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The sum of a method's named loss terms; a clear error if the method returned none."""
    if not isinstance(losses, dict) or not losses:
        raise TypeError(
            "A method's forward must return (logits, {term_name: loss}) with at least one loss term, "
            f"got {type(losses).__name__}: {losses!r}."
        )
    terms = iter(losses.values())
    total = next(terms)
    for term in terms:
        total = total + term
    return total


def _running_summary(loss_sums: dict[str, Tensor], correct: Tensor, seen: int) -> dict[str, str]:
    """The batch bar's postfix: the running mean loss and accuracy of this epoch (reads the device)."""
    loss = sum(total.item() for total in loss_sums.values()) / seen
    return {"loss": f"{loss:.3f}", "acc": f"{correct.item() / seen:.1%}"}


def _epoch_summary(row: dict[str, float]) -> dict[str, str]:
    summary = {"loss": f"{row['train_loss']:.3f}", "acc": f"{row['train_acc']:.1%}"}
    if "val_acc" in row:
        summary["val_acc"] = f"{row['val_acc']:.1%}"
    return summary


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


def evaluate(model_or_method: nn.Module, loader: Batches, device: str | torch.device | None = None) -> dict:
    """Accuracy and mean cross-entropy of a model (a Distiller's student) on every batch of ``loader``.

    Returns ``{"accuracy": fraction in [0, 1], "loss": mean cross-entropy, "count": images seen}``. Runs in
    eval mode without gradients, on ``device`` (default: where the model already is); the model's
    train/eval mode is restored afterwards.
    """
    model = _student_of(model_or_method)
    device = _model_device(model) if device is None else choose_device(device)
    was_training = model.training
    model.to(device).eval()
    try:
        return _evaluate(model, loader, device, None, _uses_channels_last(model))
    finally:
        model.train(was_training)


def _evaluate(
    model: nn.Module,
    loader: Batches,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> dict:
    """The evaluation loop proper (the model is already on ``device`` and in eval mode)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = _to_device(images, labels, device, channels_last)
            with _autocast(device, amp_dtype):
                logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
            count += labels.shape[0]
    if count == 0:
        raise ValueError("The loader yielded no batches to evaluate.")
    return {"accuracy": correct.item() / count, "loss": loss_sum.item() / count, "count": count}


def predict(
    model: nn.Module, loader: Batches, device: str | torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """The model's (a Distiller's student's) logits for every batch of ``loader``, with the labels.

    Returns ``(logits, labels)`` on the CPU, logits as float32 of shape (N, classes), in loader order.
    """
    model = _student_of(model)
    device = _model_device(model) if device is None else choose_device(device)
    was_training = model.training
    model.to(device).eval()
    channels_last = _uses_channels_last(model)
    all_logits, all_labels = [], []
    try:
        with torch.inference_mode():
            for images, labels in loader:
                images, labels = _to_device(images, labels, device, channels_last)
                all_logits.append(model(images).float().cpu())
                all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("The loader yielded no batches to predict.")
    return torch.cat(all_logits), torch.cat(all_labels)
