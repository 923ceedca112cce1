"""One readable training loop for every method.

A *method* is an ``nn.Module`` whose ``forward(images, labels)`` returns ``(logits, losses)``: the
student's logits (one tensor, or a list of tensors for a student with several exits) and a dict of named
loss terms, e.g. ``{"ce": ..., "kd": ...}``. The loop adds the terms, steps the optimiser and logs every
term. Plain cross-entropy training is the simplest method (:class:`CrossEntropy`); every distiller in
``kdbook_utils.methods`` is another (:class:`Distiller` is their base class).

The public functions:

* :func:`train_step` is one optimisation step, the code every method trains with: the method's forward,
  its loss terms added up, backward, the optimiser's step;
* :func:`fit` runs it over the batches and epochs, with everything around a step in view: the optimiser
  and its learning-rate schedule, mixed precision, several processes, ``torch.compile``, validation,
  progress bars, and stopping (and rolling back) when the loss turns NaN or diverges;
* :func:`evaluate` and :func:`predict` measure a trained model;
* :func:`seed_everything`, :func:`choose_device` and :func:`preset_precision` set up a run;
* :func:`freeze` turns a trained model into a frozen teacher;
* :func:`configure_cpu_performance` tunes the memory allocator for CPU training (``fit`` calls it).

Units: accuracies are percentages (0-100) everywhere.

**No hidden state.** Where a run trains and in which precision are arguments, never read from the
environment: a notebook resolves them once from its preset (``DEVICE = choose_device(PRESET.device)``,
``PRECISION = preset_precision(PRESET, DEVICE)``) and passes them down. A function given ``device=None``
picks ``"auto"`` (CUDA, then MPS, then the CPU); ``precision=None`` is float32.

A note for readers of the loop: on a GPU, every ``.item()`` (or ``float(tensor)``) makes the CPU wait for
the GPU to finish. The loop therefore adds the per-batch losses up *as tensors* and reads them only once
per epoch, and for the progress bar at most twice a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from kdbook_utils import distributed
from kdbook_utils.errors import must_be, warn_if_training_loader
from kdbook_utils.features import FeatureExtractor
from kdbook_utils.presets import Preset

__all__ = [
    "CrossEntropy",
    "Distiller",
    "DivergedError",
    "NonFiniteLossError",
    "TeacherOutputs",
    "TrainingPhase",
    "check_precision",
    "choose_device",
    "configure_cpu_performance",
    "evaluate",
    "fit",
    "freeze",
    "lr_factor",
    "output_names",
    "precision_name",
    "predict",
    "preset_precision",
    "resolve_device",
    "seed_everything",
    "train_step",
]

Batches = Iterable[tuple[Tensor, Tensor]]
"""Anything that yields ``(images, labels)`` batches: a ``TensorLoader``, a ``DataLoader``, a list."""

Schedule = Union[str, Callable[[int, int], float]]
"""``"cosine"``, ``"step"``, ``"constant"``, or ``factor(epoch, epochs) -> float`` (epoch counts from 0)."""

DeviceLike = Union[str, torch.device, None]
Logits = Union[Tensor, list[Tensor]]
"""A model's output: the logits, or one logits tensor per exit for a multi-exit network."""

DIVERGENCE_FACTOR = 100.0
""":func:`fit` stops when an epoch's mean loss exceeds this many times its phase's first batch loss."""

IGNORE_INDEX = -100
"""A label with this value is not scored (padding in token batches), as in ``F.cross_entropy``."""


def per_position(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """One row per scored position: image logits ``(N, C)`` and labels ``(N,)`` as they are; a language
    model's logits ``(N, L, V)`` (classes in the last dimension) and labels ``(N, L)`` flattened to
    ``(N * L, V)`` and ``(N * L,)``."""
    if logits.dim() == 3 and labels.dim() == 2:
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    return logits, labels


def _hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(correct answers, scored positions) of one output, as tensors; labels equal to IGNORE_INDEX are
    left out."""
    flat_logits, flat_labels = per_position(logits, labels)
    scored = flat_labels != IGNORE_INDEX
    return ((flat_logits.argmax(dim=-1) == flat_labels) & scored).sum(), scored.sum()


# --------------------------------------------------------------------------------------------------------
# The method contract
# --------------------------------------------------------------------------------------------------------


def freeze(model: nn.Module) -> nn.Module:
    """Make ``model`` a fixed teacher: eval mode, and no parameter requires a gradient. Returns it."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class TeacherOutputs(NamedTuple):
    """What a teacher computed for one batch: its logits (a list for a multi-exit teacher) and the
    feature maps of the requested layers, ``{layer: tensor}``."""

    logits: Logits
    features: dict[str, Tensor]


class TeacherOutputSource(Protocol):
    """Serves teacher outputs during training instead of running the teacher (a cache of them).

    :meth:`Distiller.teacher_outputs` asks it for ``teacher`` number ``index`` on the batch at position
    ``(epoch, batch)`` of the training loader; it returns the outputs, computing and keeping them if it
    has not seen that batch yet. ``kdbook_utils.experiments.TeacherOutputCache`` is the implementation.
    """

    def outputs(
        self,
        teacher: nn.Module,
        images: Tensor,
        labels: Tensor,
        layers: tuple[str, ...],
        epoch: int,
        batch: int,
    ) -> TeacherOutputs: ...


@dataclass(frozen=True)
class TrainingPhase:
    """A stretch of training with its own optimiser: ``epochs`` epochs at learning rate ``lr``.

    Most methods train in one phase. A method with several (FSP's Gram phase, then the task) lists them
    in :meth:`Distiller.training_phases`; :func:`fit` runs them in order, calling
    :meth:`Distiller.set_phase` before each and starting every phase with a fresh optimiser (so the
    momentum is reset) and a fresh learning-rate schedule.
    """

    name: str
    epochs: int
    lr: float


class Distiller(nn.Module):
    """Base class of every method: a student, frozen teachers, and named loss terms.

    Subclasses implement :meth:`forward`, which returns the student's logits and a dict of named loss
    terms; :func:`fit` minimises their sum and logs each one.

    * ``teacher``: one trained model, a sequence of them (an ensemble), or None. Teachers are frozen:
      their parameters do not require gradients and they stay in eval mode while the method trains, so
      their batch-norm statistics and dropout never change. ``self.teacher`` is the first,
      ``self.teachers`` all of them.
    * ``trainable_teacher_parts``: names of teacher submodules that *do* train with the student (a
      partly trainable teacher, as in LSL): their parameters require gradients and follow the method's
      train/eval mode.
    * :meth:`teacher_outputs` runs a teacher (with the feature maps a method needs) or, during
      :func:`fit`, asks an attached cache (:meth:`use_teacher_cache`) for the outputs it has already
      computed for this batch.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | None = None,
        *,
        trainable_teacher_parts: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"The student must be an nn.Module, got {type(student).__name__}.")
        teachers = [] if teacher is None else [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        for index, model in enumerate(teachers):
            if not isinstance(model, nn.Module):
                raise TypeError(f"Teacher {index} must be an nn.Module, got {type(model).__name__}.")
        if trainable_teacher_parts and not teachers:
            raise ValueError("trainable_teacher_parts needs a teacher.")
        self.student = student
        self.teachers = nn.ModuleList([freeze(model) for model in teachers])
        self.trainable_teacher_parts = tuple(trainable_teacher_parts)
        self._trainable_parts: list[nn.Module] = []
        for model in self.teachers:
            children = dict(model.named_modules())
            unknown = [name for name in self.trainable_teacher_parts if name not in children]
            if unknown:
                raise ValueError(
                    f"trainable_teacher_parts names {unknown}, which are not submodules of the teacher; "
                    f"its top-level parts are {[name for name, _ in model.named_children()]}."
                )
            for name in self.trainable_teacher_parts:
                children[name].requires_grad_(True)
                self._trainable_parts.append(children[name])
        self.phase = "train"
        self._teacher_cache: TeacherOutputSource | None = None
        self._position: tuple[int, int] | None = None

    @property
    def teacher(self) -> nn.Module | None:
        """The first (often the only) teacher."""
        return self.teachers[0] if len(self.teachers) else None

    @property
    def teacher_trains(self) -> bool:
        """Whether part of a teacher trains with the student (then its outputs cannot be cached)."""
        return bool(self._trainable_parts)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()
        for part in self._trainable_parts:
            part.train(mode)
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser updates: the student's, any extra modules a method adds, and the
        trainable parts of a teacher."""
        return (p for p in self.parameters() if p.requires_grad)

    def training_phases(self, epochs: int, lr: float) -> list[TrainingPhase]:
        """The phases :func:`fit` runs for ``fit(..., epochs=epochs, lr=lr)``: one, unless overridden."""
        return [TrainingPhase("train", epochs, lr)]

    def set_phase(self, phase: str) -> None:
        """Called by :func:`fit` before each of :meth:`training_phases`."""
        self.phase = phase

    def use_teacher_cache(self, source: TeacherOutputSource | None) -> None:
        """Serve teacher outputs from ``source`` during training (None: always run the teachers)."""
        if source is not None and self.teacher_trains:
            raise ValueError(
                "Part of this method's teacher trains with the student, so its outputs change every step "
                "and cannot be cached; run it without a teacher cache."
            )
        self._teacher_cache = source

    def on_batch_start(self, epoch: int, batch: int) -> None:
        """Called by :func:`fit` before each training batch: the loader's epoch and the batch index.

        A method that changes a loss weight over training keys on these; the teacher cache uses them to
        find the batch. Subclasses that override it call ``super().on_batch_start(epoch, batch)``.
        """
        self._position = (epoch, batch)

    def on_batch_end(self) -> None:
        """Called by :func:`fit` after each training batch (a position is good for one batch only)."""
        self._position = None

    def teacher_outputs(
        self, images: Tensor, labels: Tensor, *, index: int = 0, layers: Sequence[str] = ()
    ) -> TeacherOutputs:
        """Teacher ``index``'s logits and the feature maps at ``layers`` for this batch.

        Served by the teacher cache while :func:`fit` trains (if one is attached), otherwise computed.
        A frozen teacher runs without gradients; a partly trainable one with them.
        """
        if not 0 <= index < len(self.teachers):
            raise IndexError(f"This method has {len(self.teachers)} teacher(s); there is no teacher {index}.")
        teacher = self.teachers[index]
        layers = tuple(layers)
        if self._teacher_cache is not None and self._position is not None and self.training:
            epoch, batch = self._position
            return self._teacher_cache.outputs(teacher, images, labels, layers, epoch, batch)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.teacher_trains):
            return run_with_features(teacher, images, layers)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Logits, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images, labels).")


def run_with_features(model: nn.Module, images: Tensor, layers: Sequence[str] = ()) -> TeacherOutputs:
    """Run ``model`` once: its output and the feature maps at ``layers`` (read with forward hooks)."""
    if not layers:
        return TeacherOutputs(model(images), {})
    with FeatureExtractor(model, tuple(layers)) as extractor:
        logits, features = extractor.forward_with_features(images)
    return TeacherOutputs(logits, features)


class CrossEntropy(Distiller):
    """Training without a teacher: the loss is the cross-entropy with the true labels."""

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(*per_position(logits, labels))}


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


def output_names(model: nn.Module, count: int) -> list[str]:
    """Names of a model's ``count`` outputs: its ``exit_names`` when it has them, else output1, ..."""
    names = getattr(_student_of(model), "exit_names", None)
    if names is not None and len(names) == count:
        return [str(name) for name in names]
    return [f"output{k}" for k in range(1, count + 1)]


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

Precision = Union[str, torch.dtype, None]
"""A training precision: None (float32), ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``, or the dtype."""

_PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
    "float16": torch.float16,
}  # fmt: skip


def cpu_runs_bfloat16_natively() -> bool:
    """Whether this CPU has bfloat16 instructions (Intel AMX or AVX512-BF16, e.g. Xeon Sapphire Rapids or
    AMD Zen 4). There bfloat16 autocast trains convolutions about twice as fast as float32
    (``bench/bench_speed_switches.py``); elsewhere bfloat16 is emulated and slower than float32."""
    checks = (
        getattr(torch.cpu, "_is_amx_tile_supported", None),
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
    )
    return any(check is not None and bool(check()) for check in checks)


def check_precision(precision: Precision, device: torch.device | None = None) -> torch.dtype | None:
    """``precision`` as the autocast dtype :func:`train_step` uses, or None for float32 throughout."""
    if precision is None or precision == torch.float32:
        return None
    if precision in (torch.bfloat16, torch.float16):
        return precision  # type: ignore[return-value]
    if isinstance(precision, str) and precision.strip().lower() in _PRECISIONS:
        return _PRECISIONS[precision.strip().lower()]
    raise ValueError(
        f"Unknown precision {precision!r}: use None (float32), 'bf16' or 'fp16' (or the torch dtypes). "
        "A lesson takes its preset's rule: preset_precision(PRESET, DEVICE)."
    )


def preset_precision(preset: Preset, device: torch.device) -> torch.dtype | None:
    """A preset's precision rule on ``device``, resolved once (like the device) and passed down.

    On a CUDA GPU: mixed precision, bfloat16 on Ampere (compute capability 8) and later, float16 with a
    gradient scaler on older GPUs such as Colab's T4. On a CPU: bfloat16 when the preset asks for it
    (``cpu_bf16``, the ``lab`` and ``paper`` presets) and the CPU runs it natively
    (:func:`cpu_runs_bfloat16_natively`), else float32 (None). On Apple's MPS: float32.
    """
    if not isinstance(preset, Preset):
        raise TypeError(must_be("preset_precision's preset", "a Preset, e.g. get_preset('lab')", preset))
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "cpu" and preset.cpu_bf16 and cpu_runs_bfloat16_natively():
        return torch.bfloat16
    return None


def precision_name(precision: Precision) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"``: how cache keys and result files name a precision."""
    dtype = check_precision(precision)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def grad_scaler(precision: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler :func:`train_step` takes: active only for float16 on a GPU (float16 gradients
    underflow without one). Inactive, it passes through: ``scale(loss)`` is ``loss``,
    ``step(optimizer)`` is ``optimizer.step()``, and ``unscale_`` and ``update`` do nothing."""
    return torch.amp.GradScaler("cuda", enabled=precision == torch.float16 and device.type == "cuda")


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


def resolve_device(device: DeviceLike = None) -> torch.device:
    """``device`` through :func:`choose_device` (None: ``"auto"``). Under ``torchrun`` a bare ``cuda``
    means this process's GPU, ``cuda:$LOCAL_RANK``. A notebook resolves its preset's device once,
    ``DEVICE = choose_device(PRESET.device)``, and passes it down."""
    return distributed.local_device(choose_device("auto" if device is None else device))


# --------------------------------------------------------------------------------------------------------
# The training step, and the loop around it
# --------------------------------------------------------------------------------------------------------


def train_step(
    method: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> tuple[Logits, dict[str, Tensor]]:
    """One optimisation step, the same for every method: forward, sum of losses, backward, step."""
    # Mixed precision (bfloat16 or float16) runs the forward pass only; None stays in float32.
    with torch.autocast(images.device.type, dtype=precision, enabled=precision is not None):
        # the student's logits, and the method's named loss terms, e.g. {"ce": ..., "kd": ...}
        logits, losses = method(images, labels)
        loss = sum(losses.values())  # the total is their sum
    optimizer.zero_grad(set_to_none=True)
    # The scaler acts only for float16 on a GPU (small gradients would underflow to zero); otherwise
    # scaler.scale(loss) is loss, and scaler.step(optimizer) is optimizer.step().
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return logits, losses


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the model was put back to its last good epoch."""


class DivergedError(NonFiniteLossError):
    """The loss grew by orders of magnitude over its first value (a learning rate far too large, say): the
    model was put back to its last good epoch, as for a NaN."""


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
    device: DeviceLike = None,
    precision: Precision = None,
    channels_last: bool | None = None,
    progress: bool = True,
    desc: str | None = None,
    grad_clip: float | None = None,
    compile: bool = False,
    divergence_factor: float | None = DIVERGENCE_FACTOR,
) -> pd.DataFrame:
    """Train ``method`` (a :class:`Distiller`, or a plain model trained with cross-entropy) in place.

    Every batch goes through :func:`train_step`. Around it, ``fit`` builds the optimiser (SGD with Nesterov
    momentum 0.9 and weight decay 5e-4, the RepDistiller recipe, unless a ready ``optimizer`` is given),
    sets the learning rate of each epoch from ``schedule`` (see :func:`lr_factor`), logs every loss term,
    validates after each epoch, and shows progress. A method with several
    :meth:`~Distiller.training_phases` gets a fresh optimiser and schedule for each. Stop it at any time
    (Ctrl-C, or the notebook's stop button): it prints a notice and returns the epochs completed so far,
    and the model keeps the weights it had when stopped.

    **When training goes wrong.** A NaN or infinite loss stops training with a
    :class:`NonFiniteLossError` naming the epoch, the batch and the loss term; an epoch whose mean loss is
    more than ``divergence_factor`` times the first batch's loss of its phase (the loss grew by orders of
    magnitude: a learning rate far too large, say) stops it with a :class:`DivergedError`. Either way the
    model is put back to the weights of its last completed epoch, and the error's ``.history`` holds the
    completed epochs.

    **Several processes.** Under ``torchrun`` (after :func:`kdbook_utils.distributed.init`), every process
    calls ``fit`` with the same arguments and they train one model together: the method is wrapped in
    ``DistributedDataParallel`` (gradients averaged over the processes at every step), each process
    trains on its slice of every batch (``TensorLoader`` shards by rank), the buffers (batch-norm
    statistics) are made those of process 0 after every epoch, and the loss sums, correct counts and
    validation scores are added up over the processes, so every process returns the same history, that
    of the whole run. *The learning-rate rule*: a ``TensorLoader``'s ``batch_size`` is the global batch,
    split among the processes, and ``lr`` is used as given, so a run on ``w`` processes takes the same
    optimisation steps as one process with the same ``batch_size`` and ``lr`` (exactly so for a network
    without batch norm, up to the order of floating-point sums; batch norm normalises each process's
    share of the batch) and the lessons' settings mean the same on one GPU or eight. To train with a
    larger global batch instead, raise ``batch_size`` and scale ``lr`` with it (the linear scaling rule
    of Goyal et al. 2017: ``lr = base_lr * global_batch / base_batch``, with a few epochs of warm-up).
    A loader that is not a ``TensorLoader`` is not sharded: give a ``DataLoader`` a
    ``DistributedSampler``. Only process 0 shows progress bars.

    Args:
        method: what to train. Its parameters that require gradients are optimised (a frozen teacher's
            are not). Moved to ``device``; it is left in eval mode when training ends.
        train_loader, val_loader: iterables of ``(images, labels)`` batches, e.g. ``TensorLoader``. With a
            ``val_loader``, the student is evaluated after every epoch.
        epochs: passes over ``train_loader`` (of the main phase, for a method with several).
        lr, momentum, weight_decay, nesterov: SGD settings (ignored when ``optimizer`` is given).
        schedule, milestones: the learning-rate schedule; ``milestones`` only matter for ``"step"``.
        optimizer: a ready optimiser over the method's parameters; the schedule scales its learning rates.
        device: where to train; None means ``"auto"`` (:func:`resolve_device`). A notebook passes the
            device its preset chose, ``choose_device(PRESET.device)``.
        precision: None trains in float32; ``"bf16"`` or ``"fp16"`` (or the torch dtypes) run the forward
            pass in that mixed precision (float16 with a gradient scaler on a GPU). A lesson passes its
            preset's rule, :func:`preset_precision`.
        channels_last: store images and convolution weights as N, H, W, C, which the CPU (oneDNN) and GPU
            (cuDNN) convolutions run faster. Default: on for CPU and CUDA, off for MPS.
        progress: show progress bars (an epoch bar and a batch bar); False for silence.
        desc: the epoch bar's label, e.g. ``"teacher resnet32"``.
        grad_clip: if set, clip the gradient norm to this value before each step.
        compile: run each training step's forward pass (student, teacher and loss) through
            ``torch.compile``. The first epoch pays the compilation (tens of seconds on a CPU, which also
            needs a C++ compiler); whether it pays back is measured in ``bench/bench_speed_switches.py``.
        divergence_factor: how many times its phase's first batch loss an epoch's mean loss may reach
            before training stops as diverged (default 100: two orders of magnitude); None never stops.

    Returns:
        The history, a ``pandas.DataFrame`` with one row per completed epoch: ``epoch`` (from 1),
        ``phase`` (for a method with several phases), one column per loss term (``train_<term>``, epoch
        mean), ``train_loss`` (their sum), ``train_acc`` (percent correct, measured on the fly while
        training), ``val_loss`` and ``val_acc`` (cross-entropy and accuracy of the student, with a
        ``val_loader``), ``lr``, and ``seconds`` (the epoch's wall time, validation included). A student
        with several exits adds ``train_acc_<exit>`` and ``val_acc_<exit>`` per exit; ``train_acc`` and
        ``val_acc`` are then those of its last exit.
    """
    _check_fit_arguments(epochs, lr, schedule, milestones, divergence_factor)
    if val_loader is not None:
        warn_if_training_loader(val_loader, "fit's val_loader")
    method = as_method(method)
    phases = method.training_phases(epochs, lr)
    if optimizer is not None and len(phases) > 1:
        raise ValueError(
            f"{type(method).__name__} trains in {len(phases)} phases, each with a fresh optimiser; "
            "let fit build them (do not pass optimizer=)."
        )
    device = resolve_device(device)
    precision = check_precision(precision, device)
    scaler = grad_scaler(precision, device)
    if channels_last is None:
        channels_last = device.type in ("cpu", "cuda")
    if device.type == "cpu":
        configure_cpu_performance()
    elif device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # our input sizes are fixed: let cuDNN pick its fastest kernels
    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    student = _student_of(method)
    progress = progress and distributed.is_main_process()
    bars = _ProgressBars(sum(phase.epochs for phase in phases), _length(train_loader), desc, progress)
    step = _StepSettings(
        device, channels_last, scaler, precision, grad_clip, student, check_output=not compile
    )
    rows: list[dict[str, Any]] = []
    good_state = _trainable_state(method)
    try:
        for phase in phases:
            method.set_phase(phase.name)
            phase_optimizer = optimizer or _sgd(method, phase.lr, momentum, weight_decay, nesterov)
            base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in phase_optimizer.param_groups]
            trainer: nn.Module = method
            if distributed.is_active():  # several processes (torchrun): DDP averages every step's gradients
                gc.collect()  # the previous phase's DDP must be gone, its gradient hooks with it
                trainer = _data_parallel(method, device, several_phases=len(phases) > 1)
            if compile:  # the step's forward (student, teachers and loss) compiled by torch.compile
                trainer = torch.compile(trainer)
            first_loss: float | None = None  # the phase's first batch loss: the yardstick of divergence
            for phase_epoch in range(phase.epochs):
                started = time.perf_counter()
                for group, base_lr in zip(phase_optimizer.param_groups, base_lrs):
                    group["lr"] = base_lr * lr_factor(schedule, phase_epoch, phase.epochs, milestones)
                bars.start_epoch(len(rows), _length(train_loader))
                tally = _train_epoch(method, trainer, train_loader, phase_optimizer, step, len(rows), bars)
                if distributed.is_active():
                    tally.add_up_processes()
                    _share_buffers(method)
                if tally.seen == 0:
                    raise ValueError("train_loader yielded no batches: is the data set empty?")
                first_loss = tally.first_loss() if first_loss is None else first_loss
                _stop_if_training_failed(tally, first_loss, divergence_factor, rows, len(rows), phase,
                                         len(phases), method, good_state)  # fmt: skip
                row: dict[str, Any] = {"epoch": len(rows) + 1}
                if len(phases) > 1:
                    row["phase"] = phase.name
                row.update(tally.row(output_names(method, tally.outputs)))
                if val_loader is not None:
                    method.eval()
                    row.update(_validation_columns(student, val_loader, device, precision, channels_last))
                row["lr"] = phase_optimizer.param_groups[0]["lr"]
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                good_state = _trainable_state(method)
                bars.epoch_done(row)
    except KeyboardInterrupt:
        print(
            f"Training interrupted during epoch {len(rows) + 1}/{bars.total_epochs}: returning the history of "
            f"the {len(rows)} completed epoch(s); the model keeps its current weights."
        )
    finally:
        method.on_batch_end()
        bars.close()
        method.eval()
    if not rows:  # interrupted in the first epoch: an empty table that still names the usual columns
        return pd.DataFrame(columns=["epoch", "train_loss", "train_acc", "lr", "seconds"])
    return pd.DataFrame(rows)


@dataclass
class _StepSettings:
    """What every step of one ``fit`` shares: where and how it trains, and whether the first batch (and
    the method's output for it) has been checked yet."""

    device: torch.device
    channels_last: bool
    scaler: torch.amp.GradScaler
    precision: torch.dtype | None
    grad_clip: float | None
    student: nn.Module
    check_output: bool = True  # not under torch.compile, which would compile the hook in, then recompile
    checked: bool = False


def _train_epoch(
    method: Distiller,
    trainer: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    step: _StepSettings,
    epoch: int,
    bars: _ProgressBars,
) -> _EpochTally:
    """One pass over ``loader``, a :func:`train_step` per batch (``trainer`` is the method, or its DDP or
    compiled wrapper); returns the epoch's tally of losses and correct answers."""
    method.train()
    tally = _EpochTally(step.device)
    batches = iter(loader)
    # The loader's own epoch count (a TensorLoader's), which the teacher cache keys batches by.
    loader_epoch = getattr(loader, "current_epoch", None)
    loader_epoch = epoch if loader_epoch is None else int(loader_epoch)
    for batch_index, (images, labels) in enumerate(batches):
        images, labels = _to_device(images, labels, step.device, step.channels_last)
        check = None
        if not step.checked:
            check_batch(images, labels, step.student, where="the first training batch")
            if step.check_output:
                check = method.register_forward_hook(_check_method_output)
            step.checked = True
        method.on_batch_start(loader_epoch, batch_index)  # the teacher cache finds the batch by its position
        try:
            logits, losses = train_step(trainer, images, labels, optimizer, step.scaler, step.precision,
                                        step.grad_clip)  # fmt: skip
        finally:
            method.on_batch_end()
            if check is not None:
                check.remove()
        tally.add(batch_index, losses, logits, labels)
        bars.batch_done(tally)
    return tally


def _check_method_output(module: nn.Module, inputs: Any, output: Any) -> None:
    """A forward hook for the first batch: the method returned ``(logits, {term name: loss})``."""
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict) and output[1]):
        got = (
            f"a dict of {len(output[1])} terms"
            if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict)
            else type(output).__name__
        )
        raise TypeError(
            f"{type(module).__name__}.forward must return (logits, {{term_name: loss}}) with at least one loss "
            f"term, e.g. (logits, {{'ce': F.cross_entropy(logits, labels)}}); got {got}."
        )


def _check_fit_arguments(
    epochs: int, lr: float, schedule: Schedule, milestones: Sequence[float] | None, divergence: float | None
) -> None:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; got {epochs!r}. Pass e.g. epochs=10.")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}. Typical values are 0.01-0.1 for SGD.")
    lr_factor(schedule, 0, epochs, milestones)  # reject an unknown schedule before any work
    if divergence is not None and not (
        isinstance(divergence, (int, float)) and not isinstance(divergence, bool) and divergence > 1
    ):
        raise ValueError(
            f"divergence_factor must be a number above 1, or None to never stop; got {divergence!r}. "
            f"The default, {DIVERGENCE_FACTOR:g}, stops an epoch whose loss is that many times the first."
        )


def _stop_if_training_failed(
    tally: _EpochTally,
    first_loss: float,
    divergence_factor: float | None,
    rows: list[dict[str, Any]],
    epoch: int,
    phase: TrainingPhase,
    phases: int,
    method: Distiller,
    good_state: dict[str, Tensor],
) -> None:
    """Put the model back to its last good epoch and raise, if this epoch's loss was NaN or diverged."""
    where = f" (phase {phase.name!r})" if phases > 1 else ""
    problem = tally.non_finite()
    mean_loss = tally.mean_loss()
    error: NonFiniteLossError | None = None
    if problem is not None:
        batch, terms = problem
        error = NonFiniteLossError(
            f"The loss became NaN or infinite at epoch {epoch + 1}, batch {batch + 1}{where}, in the term(s) "
            f"{terms}. The model was put back to the weights after epoch {epoch} and the history of the "
            "completed epochs is in this error's .history. Try a smaller learning rate (lr), a smaller loss "
            "weight or temperature, gradient clipping (grad_clip=1.0), or check the data for NaN or infinite "
            "values."
        )
    elif divergence_factor is not None and first_loss > 0 and mean_loss > divergence_factor * first_loss:
        error = DivergedError(
            f"Training diverged at epoch {epoch + 1}{where}: the mean loss, {mean_loss:.3g}, is "
            f"{mean_loss / first_loss:.3g} times the first batch's ({first_loss:.3g}), more than the "
            f"divergence_factor of {divergence_factor:g}. The model was put back to the weights after epoch "
            f"{epoch} and the history of the completed epochs is in this error's .history. The learning rate "
            "is the usual cause: try one ten times smaller (lr=0.05 is this course's default for SGD), or "
            "gradient clipping (grad_clip=1.0)."
        )
    if error is not None:
        _load_trainable_state(method, good_state)
        error.history = pd.DataFrame(rows)  # type: ignore[attr-defined]
        raise error


class _ProgressBars:
    """fit's two progress bars: epochs, and the batches of the current epoch (with its running loss)."""

    def __init__(self, total_epochs: int, batches: int | None, desc: str | None, show: bool) -> None:
        self.total_epochs = total_epochs
        self.show = show
        self.epochs = tqdm(total=total_epochs, desc=desc or "training", unit="epoch", disable=not show)
        self.batches = tqdm(total=batches, unit="batch", leave=False, disable=not show)
        self._last_postfix = time.monotonic()

    def start_epoch(self, epoch: int, batches: int | None) -> None:
        self.batches.reset(total=batches)
        self.batches.set_description(f"epoch {epoch + 1}/{self.total_epochs}", refresh=False)

    def batch_done(self, tally: _EpochTally) -> None:
        self.batches.update()
        if self.show and time.monotonic() - self._last_postfix > 0.5:  # reads the GPU twice a second
            self._last_postfix = time.monotonic()
            self.batches.set_postfix(tally.running_summary(), refresh=False)

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.epochs.update()
        self.epochs.set_postfix(_epoch_summary(row), refresh=True)

    def close(self) -> None:
        self.batches.close()
        self.epochs.close()


def _sgd(
    method: Distiller, lr: float, momentum: float, weight_decay: float, nesterov: bool
) -> torch.optim.Optimizer:
    parameters = list(method.trainable_parameters())
    if not parameters:
        raise ValueError(
            "The method has no trainable parameters: every parameter has requires_grad=False. A frozen "
            "teacher cannot be trained; pass the student (or a Distiller around it)."
        )
    return torch.optim.SGD(
        parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
    )


def _trainable_state(method: Distiller) -> dict[str, Tensor]:
    """A copy of everything training changes (frozen teachers left out): the last good epoch's state."""
    frozen = "" if method.teacher_trains else "teachers."
    return {
        name: value.detach().clone()
        for name, value in method.state_dict().items()
        if not (frozen and name.startswith(frozen))
    }


def _load_trainable_state(method: Distiller, state: dict[str, Tensor]) -> None:
    method.load_state_dict(state, strict=False)


def _data_parallel(method: Distiller, device: torch.device, *, several_phases: bool) -> nn.Module:
    """``method`` wrapped for training across processes: DDP averages the gradients at every step.

    Made once per phase. A method with several phases may leave parameters out of a phase's loss (FSP's
    Gram phase never uses the classifier), so DDP then looks for unused parameters after every step
    (``find_unused_parameters``, a walk over the autograd graph); a one-phase method must use every
    parameter it trains in every step, or DDP stops with an error that names them.
    """
    return DistributedDataParallel(
        method, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=several_phases
    )


def _share_buffers(method: Distiller) -> None:
    """Give every process process 0's buffers (batch-norm statistics each process updated on its own
    share of the batches), so that all hold the same model after every epoch."""
    frozen = "" if method.teacher_trains else "teachers."
    distributed.broadcast_tensors(
        [buffer for name, buffer in method.named_buffers() if not (frozen and name.startswith(frozen))]
    )


class _EpochTally:
    """Sums of the loss terms, correct answers per output and the first non-finite batch, as tensors on
    the device (no waiting for the GPU until the epoch ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sums: dict[str, Tensor] = {}
        self.correct: Tensor | None = None  # one count per output
        self.scored = torch.zeros((), dtype=torch.int64, device=device)  # labels scored (token positions)
        self.outputs = 1
        self.seen = 0
        self.first_bad_batch = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_terms: Tensor | None = None  # which terms were non-finite in the first bad batch
        self.first_total: Tensor | None = None  # the first batch's total loss
        self.names: list[str] = []

    def add(self, batch_index: int, losses: dict[str, Tensor], logits: Logits, labels: Tensor) -> None:
        batch_size = labels.shape[0]
        with torch.no_grad():
            if not self.names:
                self.names = list(losses)
            values = torch.stack([losses[name].detach().float().reshape(()) for name in self.names])
            if self.first_total is None:
                self.first_total = values.sum()
            finite = torch.isfinite(values)
            first = (self.first_bad_batch < 0) & ~finite.all()
            self.first_bad_batch = torch.where(first, torch.full_like(self.first_bad_batch, batch_index),
                                               self.first_bad_batch)  # fmt: skip
            self.bad_terms = torch.where(
                first, ~finite, self.bad_terms if self.bad_terms is not None else ~finite
            )
            for name, value in zip(self.names, values):
                weighted = value * batch_size
                self.loss_sums[name] = self.loss_sums[name] + weighted if name in self.loss_sums else weighted
            outputs = logits if isinstance(logits, (list, tuple)) else [logits]
            self.outputs = len(outputs)
            hits = [_hits(out.detach(), labels) for out in outputs]
            correct = torch.stack([right for right, _ in hits])
            self.correct = correct if self.correct is None else self.correct + correct
            self.scored = self.scored + hits[-1][1]
        self.seen += batch_size

    def add_up_processes(self) -> None:
        """Make the tally that of all processes together (every process ends with the same sums)."""
        names = list(self.loss_sums)
        sums = distributed.sum_across_processes(torch.stack([self.loss_sums[name] for name in names]))
        self.loss_sums = dict(zip(names, sums))
        if self.correct is not None:
            self.correct = distributed.sum_across_processes(self.correct)
        self.scored = distributed.sum_across_processes(self.scored.reshape(1))[0]
        seen = distributed.sum_across_processes(torch.tensor([self.seen], device=self.device))
        self.seen = int(seen.item())
        if self.first_total is not None:  # every process must judge divergence alike: the mean first loss
            self.first_total = distributed.sum_across_processes(self.first_total) / distributed.world_size()
        # the first bad batch of any process (-1, none, counts as the largest value)
        unseen = torch.iinfo(torch.int64).max
        first = torch.where(self.first_bad_batch < 0, torch.full_like(self.first_bad_batch, unseen),
                            self.first_bad_batch).reshape(1)  # fmt: skip
        first = distributed.min_across_processes(first)[0]
        self.first_bad_batch = torch.where(first == unseen, torch.full_like(first, -1), first)
        if self.bad_terms is not None:
            self.bad_terms = distributed.sum_across_processes(self.bad_terms.to(torch.int64)) > 0

    def first_loss(self) -> float:
        """The first batch's total loss (NaN before any batch)."""
        return math.nan if self.first_total is None else float(self.first_total.item())

    def mean_loss(self) -> float:
        """The epoch's mean total loss per image."""
        return sum(total.item() for total in self.loss_sums.values()) / self.seen

    def non_finite(self) -> tuple[int, str] | None:
        batch = int(self.first_bad_batch.item())
        if batch < 0:
            return None
        assert self.bad_terms is not None
        terms = [name for name, bad in zip(self.names, self.bad_terms.tolist()) if bad]
        return batch, ", ".join(repr(t) for t in terms)

    def row(self, names: list[str]) -> dict[str, float]:
        means = {name: total.item() / self.seen for name, total in self.loss_sums.items()}
        row = {f"train_{name}": mean for name, mean in means.items()}
        row["train_loss"] = sum(means.values())
        assert self.correct is not None
        accuracies = (100.0 * self.correct.double() / self.scored.clamp_min(1)).tolist()
        row["train_acc"] = accuracies[-1]
        if len(accuracies) > 1:
            row.update({f"train_acc_{name}": value for name, value in zip(names, accuracies)})
        return row

    def running_summary(self) -> dict[str, str]:
        """The batch bar's postfix: this epoch's running mean loss and accuracy (reads the device)."""
        loss = sum(total.item() for total in self.loss_sums.values()) / self.seen
        scored = max(int(self.scored.item()), 1)
        accuracy = 100.0 * self.correct[-1].item() / scored if self.correct is not None else 0.0
        return {"loss": f"{loss:.3f}", "acc": f"{accuracy:.1f}%"}


def _validation_columns(
    student: nn.Module,
    loader: Batches,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> dict[str, float]:
    scores = _evaluate(student, loader, device, amp_dtype, channels_last)
    columns = {"val_loss": scores["loss"], "val_acc": scores["accuracy"]}
    for name, value in scores.get("per_output", {}).items():
        columns[f"val_acc_{name}"] = value
    return columns


def check_batch(
    images: Tensor, labels: Tensor, model: nn.Module | None = None, *, where: str = "a batch"
) -> None:
    """Refuse a batch a model cannot learn from, with the fix: images must be a float tensor
    ``(N, C, H, W)`` of finite values, labels int64 ``(N,)`` class indices in range."""
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"{where} must be (images, labels) tensors; got ({type(images).__name__}, {type(labels).__name__})."
        )
    if images.dim() == 2 and images.dtype in (torch.int64, torch.int32):  # a language model's token ids
        _check_token_batch(images, labels, model, where)
        return
    if not images.is_floating_point():
        raise TypeError(
            f"The images of {where} are {images.dtype}, but models need floating-point images scaled and "
            "normalised. Load them through kdbook_utils.data.TensorLoader, or convert with "
            "images.float() / 255 and normalise."
        )
    if images.dim() != 4:
        raise ValueError(
            f"The images of {where} have shape {tuple(images.shape)}; expected (batch, channels, height, "
            "width). Add the batch dimension with images.unsqueeze(0) for a single image."
        )
    if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(
            f"The labels of {where} must be an integer tensor of shape ({len(images)},), one class index per "
            f"image; got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    if not bool(torch.isfinite(images).all()):
        raise ValueError(
            f"The images of {where} contain NaN or infinite values; clean the data (e.g. torch.nan_to_num) "
            "before training."
        )
    classes = getattr(model, "num_classes", None) if model is not None else None
    if len(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (isinstance(classes, int) and high >= classes):
            limit = f"0..{classes - 1}" if isinstance(classes, int) else "0 or more"
            raise ValueError(
                f"The labels of {where} must be class indices in {limit}; found values from {low} to {high}. "
                "Does the model have as many classes as the data (create_model(name, data.num_classes))?"
            )


def _check_token_batch(tokens: Tensor, targets: Tensor, model: nn.Module | None, where: str) -> None:
    """Token batches: inputs int64 ``(N, L)``, targets ``(N, L)``, each a token id or IGNORE_INDEX."""
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape != tokens.shape:
        raise ValueError(
            f"The targets of {where} must be integer token ids of the inputs' shape {tuple(tokens.shape)} "
            f"(the next token at every position); got {targets.dtype} of shape {tuple(targets.shape)}."
        )
    vocabulary = getattr(model, "num_classes", None) if model is not None else None
    scored = targets[targets != IGNORE_INDEX]
    too_large = isinstance(vocabulary, int) and scored.numel() and int(scored.max()) >= vocabulary
    if scored.numel() and (int(scored.min()) < 0 or too_large):
        limit = f"0..{vocabulary - 1}" if isinstance(vocabulary, int) else "0 or more"
        raise ValueError(
            f"The targets of {where} must be token ids in {limit} or {IGNORE_INDEX} (not scored); found "
            f"values from {int(scored.min())} to {int(scored.max())}. Does the model's vocabulary match the "
            "data's?"
        )


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


def _epoch_summary(row: dict[str, float]) -> dict[str, str]:
    summary = {"loss": f"{row['train_loss']:.3f}", "acc": f"{row['train_acc']:.1f}%"}
    if "val_acc" in row:
        summary["val_acc"] = f"{row['val_acc']:.1f}%"
    return summary


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


def evaluate(model_or_method: nn.Module, loader: Batches, device: DeviceLike = None) -> dict[str, Any]:
    """Accuracy (percent) and mean cross-entropy of a model (a Distiller's student) on ``loader``.

    Returns ``{"accuracy": percent, "loss": mean cross-entropy, "count": images seen}`` (a language model:
    per scored token position, and ``count`` is the positions scored); for a model with
    several exits, ``accuracy`` and ``loss`` are its last exit's and ``"per_output"`` holds
    ``{exit name: percent}``. Runs in eval mode without gradients on ``device`` (None: the device rule);
    the model's train/eval mode is restored afterwards.
    """
    model = _student_of(model_or_method)
    device = resolve_device(device)
    warn_if_training_loader(loader, "evaluate")
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
) -> dict[str, Any]:
    """The evaluation loop proper (the model is already on ``device`` and in eval mode)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct: Tensor | None = None
    scored = torch.zeros((), dtype=torch.int64, device=device)  # images, or scored token positions
    outputs = 1
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = _to_device(images, labels, device, channels_last)
            if correct is None:
                check_batch(images, labels, model, where="the first evaluation batch")
            with _autocast(device, amp_dtype):
                logits = model(images)
            every = list(logits) if isinstance(logits, (list, tuple)) else [logits]
            outputs = len(every)
            loss_sum += F.cross_entropy(*per_position(every[-1].float(), labels), reduction="sum")
            counts = [_hits(out, labels) for out in every]
            hits = torch.stack([right for right, _ in counts])
            correct = hits if correct is None else correct + hits
            scored += counts[-1][1]
    count = int(scored.item())
    if distributed.is_active() and getattr(loader, "shards", 1) > 1:  # each process saw its block
        loss_sum, correct, count, outputs = _add_up_evaluations(loss_sum, correct, count, outputs, device)
    if count == 0 or correct is None:
        raise ValueError("The loader yielded no batches to evaluate: is the data set empty?")
    accuracies = (100.0 * correct.double() / count).tolist()
    scores: dict[str, Any] = {"accuracy": accuracies[-1], "loss": loss_sum.item() / count, "count": count}
    if outputs > 1:
        scores["per_output"] = dict(zip(output_names(model, outputs), accuracies))
    return scores


def _add_up_evaluations(
    loss_sum: Tensor, correct: Tensor | None, count: int, outputs: int, device: torch.device
) -> tuple[Tensor, Tensor | None, int, int]:
    """The sums of every process's block of an evaluation (a process may have had no images)."""
    mine = (float(loss_sum.item()), None if correct is None else correct.cpu(), count, outputs)
    parts = [part for part in distributed.all_gather_objects(mine) if part[1] is not None]
    if not parts:
        return loss_sum, correct, 0, outputs
    total_loss = torch.tensor(sum(part[0] for part in parts), dtype=torch.float64, device=device)
    total_correct = torch.stack([part[1] for part in parts]).sum(dim=0).to(device)
    return total_loss, total_correct, sum(part[2] for part in parts), parts[0][3]


def predict(model: nn.Module, loader: Batches, device: DeviceLike = None) -> tuple[Logits, Tensor]:
    """The model's (a Distiller's student's) logits for every batch of ``loader``, with the labels.

    Returns ``(logits, labels)`` on the CPU, logits as float32 of shape (N, classes), in loader order; a
    model with several exits gives a list with one such tensor per exit.
    """
    model = _student_of(model)
    device = resolve_device(device)
    warn_if_training_loader(loader, "predict")
    was_training = model.training
    model.to(device).eval()
    channels_last = _uses_channels_last(model)
    per_output: list[list[Tensor]] = []
    all_labels = []
    multiple = False
    try:
        with torch.inference_mode():
            for images, labels in loader:
                images, labels = _to_device(images, labels, device, channels_last)
                logits = model(images)
                multiple = isinstance(logits, (list, tuple))
                every = list(logits) if multiple else [logits]
                if not per_output:
                    per_output = [[] for _ in every]
                for bucket, out in zip(per_output, every):
                    bucket.append(out.float().cpu())
                all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    if distributed.is_active() and getattr(loader, "shards", 1) > 1:  # blocks of the data, in rank order
        blocks = distributed.all_gather_objects((per_output, all_labels, multiple))
        blocks = [block for block in blocks if block[1]]
        if blocks:
            multiple = blocks[0][2]
            per_output = [
                [part for block in blocks for part in block[0][k]] for k in range(len(blocks[0][0]))
            ]
            all_labels = [part for block in blocks for part in block[1]]
    if not all_labels:
        raise ValueError("The loader yielded no batches to predict: is the data set empty?")
    stacked = [torch.cat(bucket) for bucket in per_output]
    return (stacked if multiple else stacked[0]), torch.cat(all_labels)
