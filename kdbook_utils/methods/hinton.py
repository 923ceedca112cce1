"""Lesson 1: response-based knowledge distillation (Hinton, Vinyals and Dean, 2015).

A trained teacher's logits ``v`` are softened with a temperature ``T`` into *soft targets*
``p = softmax(v / T)``; the student's logits ``z`` give ``q = softmax(z / T)``. The student minimises

    L = alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * KL(p || q)

(Hinton et al. 2015, arXiv:1503.02531, section 2; the weighted-average form and the defaults T = 4,
alpha = 0.1 are those of RepDistiller and mdistiller). The ``T^2`` keeps the soft term's gradient, which
shrinks like ``1 / T^2``, on the same scale as the hard term's whatever ``T`` is (see
:func:`kd_gradient_norms`).

What this module provides:

* :func:`soft_targets`, :func:`kd_loss` (the loss as a pure function), :class:`KDLoss` (its module);
* :func:`kd_loss_conventions`: the same logits under the four reductions found in widely used code;
* :func:`logit_matching_limit`: what ``kd_loss`` tends to as ``T`` grows (Hinton et al. section 2.1);
* :class:`TeacherCache`: teacher logits computed once per batch and reused by every run of a sweep;
* :class:`HintonKD`: the distiller (a :class:`~kdbook_utils.train.Distiller`) trained by ``fit``;
* :func:`train_student` and :func:`run_seeds`: one student run, and one configuration over several seeds;
* :func:`finetune_pretrained_teacher`: the source proposal's ImageNet-pretrained torchvision teacher;
* :func:`plot_soft_targets`, :func:`dark_knowledge_table`, :func:`high_temperature_table`: the lesson's
  figures and tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.train import Distiller

__all__ = [
    "WHICH_LOSS_EXAMPLE",
    "HintonKD",
    "KDLoss",
    "StudentRun",
    "TeacherCache",
    "TeacherCacheMismatch",
    "dark_knowledge_table",
    "finetune_pretrained_teacher",
    "high_temperature_table",
    "kd_gradient_norms",
    "kd_loss",
    "kd_loss_conventions",
    "logit_matching_limit",
    "plot_soft_targets",
    "run_seeds",
    "soft_cross_entropy",
    "soft_targets",
    "teacher_fingerprint",
    "train_student",
]

# --------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if student_logits.dim() != 2:
        raise ValueError(
            f"Logits must have shape (batch, classes), got student logits of shape {tuple(student_logits.shape)}."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student and teacher logits must have the same shape (batch, classes), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}: do both models predict the "
            "same number of classes for the same batch?"
        )
    if not temperature > 0:
        raise ValueError(
            f"The temperature must be positive, got {temperature!r} (T = 1 is the plain softmax)."
        )


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """Probabilities softened by a temperature: ``softmax(logits / T)`` over the last dimension.

    ``T = 1`` is the ordinary softmax; a larger ``T`` flattens it and reveals how the model ranks the
    wrong classes (Hinton et al.'s "dark knowledge").
    """
    if not temperature > 0:
        raise ValueError(f"The temperature must be positive, got {temperature!r}.")
    return F.softmax(logits / temperature, dim=-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s soft-target loss: ``T^2 * KL(p_teacher^T || p_student^T)``, averaged over the batch.

        kd = T^2 / B * sum_b sum_c p_bc * (log p_bc - log q_bc),
        p = softmax(v / T) (teacher),  q = softmax(z / T) (student)

    The KL divergence is summed over classes and averaged over the batch ("batchmean"), then multiplied by
    ``T^2``: the convention RepDistiller (``DistillKL``), mdistiller, KD-Zoo and torchdistill (``KDLoss``
    with ``alpha > 0``) share. Gradients flow to the student's logits only if the teacher's are detached,
    as they are in :class:`HintonKD`. Reference: Hinton, Vinyals, Dean 2015, arXiv:1503.02531, section 2.
    """
    _check_logits(student_logits, teacher_logits, temperature)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    # log_target=True: p * log p is computed from log p, so a class with p = 0 contributes exactly 0.
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Cross-entropy of the student against the teacher's soft targets, averaged over the batch, no ``T^2``.

        H(p, q) = -1/B * sum_b sum_c p_bc log q_bc = KL(p || q) + H(p)

    It differs from the KL divergence only by the teacher's entropy ``H(p)``, which does not depend on the
    student, so both give the student the same gradient (Hinton et al. wrote the loss this way).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    return -(p * log_q).sum(dim=1).mean()


class KDLoss(nn.Module):
    """:func:`kd_loss` as a module with its temperature: ``KDLoss(4.0)(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"The temperature must be positive, got {temperature!r}.")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def kd_loss_conventions(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> pd.DataFrame:
    """The same logits under four KD-loss conventions found in widely used code, as a table.

    * ``batchmean KL x T^2``: :func:`kd_loss` (RepDistiller, mdistiller, torchdistill with alpha > 0);
    * ``per-element mean KL x T^2``: ``kl_div(..., reduction="mean")`` averages over batch *and* classes,
      so it is the first divided by the number of classes;
    * ``KL without T^2``: batchmean KL alone (torchdistill with alpha = 0 or None; some TF code);
    * ``soft cross-entropy x T^2``: Hinton et al.'s form, the first plus ``T^2`` times the teacher's
      entropy, a constant for the student.

    The first three differ by constant factors (a rescaled learning rate or alpha); the fourth by an additive
    constant (same gradient, a different number in the logs).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    with torch.no_grad():
        kl = F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        ).item()
        per_element = (
            F.kl_div(  # what reduction="mean" computes (and warns about)
                F.log_softmax(student_logits / temperature, dim=1),
                F.log_softmax(teacher_logits / temperature, dim=1),
                reduction="none",
                log_target=True,
            )
            .mean()
            .item()
        )
        soft_ce = soft_cross_entropy(student_logits, teacher_logits, temperature).item()
    squared = temperature**2
    classes = student_logits.shape[1]
    rows = [
        ("batchmean KL x T^2", "T^2/B sum_b sum_c p log(p/q)", "RepDistiller, mdistiller, torchdistill",
         kl * squared, "the reference"),
        ("per-element mean KL x T^2", "T^2/(B C) sum_b sum_c p log(p/q)", "kl_div(reduction='mean')",
         per_element * squared, f"x 1/C = 1/{classes}: a smaller effective weight on the KD term"),
        ("KL without T^2", "1/B sum_b sum_c p log(p/q)", "torchdistill with alpha = 0; some TF code",
         kl, f"x 1/T^2 = 1/{squared:g}: soft gradients shrink as T grows"),
        ("soft cross-entropy x T^2", "-T^2/B sum_b sum_c p log q", "Hinton et al. 2015 (as written)",
         soft_ce * squared, "+ T^2 H(p): a constant, the gradient is the same"),
    ]  # fmt: skip
    return pd.DataFrame(
        rows, columns=["convention", "formula", "found in", "value", "relative to the reference"]
    )


WHICH_LOSS_EXAMPLE: dict[str, object] = {
    "temperature": 4.0,
    # A teacher sure of "7" that keeps some probability on "9" and "1" (its dark knowledge) ...
    "teacher_logits": [-0.98, 1.96, -0.49, 0.49, 0.98, -0.78, -1.47, 5.87, 0.29, 2.45],
    # ... and an early student that still thinks "9", then "3".
    "student_logits": [2.33, 2.03, -1.34, 6.30, -2.33, 2.20, -2.36, 1.06, 0.81, 8.44],
}
"""One image's logits (10 classes) for which :func:`kd_loss_conventions` at T = 4 reads 8.00, 0.80, 0.50
and 41.8: KL = 0.5 and the teacher's entropy at T = 4 is 2.11 nats."""


def logit_matching_limit(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The value :func:`kd_loss` tends to as ``T`` grows: matching zero-mean logits.

        lim_{T -> inf} kd_loss = 1 / (2 C B) * sum_b || (z_b - mean z_b) - (v_b - mean v_b) ||^2

    (Hinton et al. 2015, section 2.1: at high temperature, distillation is equivalent to matching the
    logits, once each logit vector has its mean removed.) ``C`` is the number of classes.
    """
    _check_logits(student_logits, teacher_logits, 1.0)
    difference = (student_logits - student_logits.mean(dim=1, keepdim=True)) - (
        teacher_logits - teacher_logits.mean(dim=1, keepdim=True)
    )
    return difference.pow(2).sum(dim=1).mean() / (2 * student_logits.shape[1])


def high_temperature_table(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Iterable[float]
) -> pd.DataFrame:
    """What happens as ``T`` grows: per temperature, the teacher's largest soft-target probability, the
    KL divergence alone, :func:`kd_loss` (KL x T^2) and its high-temperature limit
    (:func:`logit_matching_limit`)."""
    # float64: at T = 10^4 the KL divergence is ~1e-7, below float32's resolution of the log-ratios.
    student_logits, teacher_logits = student_logits.double(), teacher_logits.double()
    limit = logit_matching_limit(student_logits, teacher_logits).item()
    classes = teacher_logits.shape[1]
    rows = []
    with torch.no_grad():
        for temperature in temperatures:
            loss = kd_loss(student_logits, teacher_logits, temperature).item()
            rows.append(
                {
                    "T": float(temperature),
                    "teacher max prob": soft_targets(teacher_logits, temperature)
                    .max(dim=1)
                    .values.mean()
                    .item(),
                    "uniform 1/C": 1 / classes,
                    "KL": loss / temperature**2,
                    "KL x T^2 (kd_loss)": loss,
                    "logit-matching limit": limit,
                }
            )
    return pd.DataFrame(rows)


def kd_gradient_norms(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Iterable[float]
) -> pd.DataFrame:
    """Size of the soft-target gradient on the student's logits at each temperature, with and without T^2.

    Returns a table with, per ``T``, the norm of d KL / d z (which falls like ``1 / T^2`` at large T) and
    the norm of d (T^2 KL) / d z (which levels off, so the soft term keeps its weight against the
    hard-label term whatever ``T`` is).
    """
    rows = []
    for temperature in temperatures:
        logits = student_logits.detach().clone().requires_grad_(True)
        with_t2 = kd_loss(logits, teacher_logits.detach(), temperature)
        (gradient,) = torch.autograd.grad(with_t2, logits)
        with_norm = gradient.norm().item()
        rows.append(
            {
                "T": float(temperature),
                "grad norm, KL": with_norm / temperature**2,
                "grad norm, KL x T^2": with_norm,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------
# The teacher-output cache
# --------------------------------------------------------------------------------------------------------


class TeacherCacheMismatch(RuntimeError):
    """A cached entry exists for this (teacher, data, epoch, batch) but the batch itself is different."""


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A short hash that identifies a teacher by its architecture and every weight and buffer.

    Two teachers with the same fingerprint give the same logits for the same batch (in eval mode), so
    the fingerprint is the teacher's part of a :class:`TeacherCache` key.
    """
    digest = hashlib.sha256(str(getattr(teacher, "arch", type(teacher).__name__)).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class _CachedBatch:
    logits: Tensor
    labels: Tensor
    image_sums: Tensor  # float64 per-image pixel sums: the guard against a different batch under the same key


def _image_sums(images: Tensor) -> Tensor:
    return images.detach().reshape(images.shape[0], -1).sum(dim=1, dtype=torch.float64)


class TeacherCache:
    """Teacher logits computed once per training batch and reused by every later run of a sweep.

    When several students learn from one teacher on the same data with the same seed (a sweep over T,
    alpha, student architectures or student seeds), every run sees the same batches in the same order,
    and the teacher, frozen in eval mode, gives the same logits for them. The cache keys each batch's
    logits by

        (teacher fingerprint, data fingerprint, epoch, batch index)

    where the data fingerprint (``TensorLoader.fingerprint``) names the data set, subset, augmentation and
    shuffling seed. The first run of a sweep fills the cache ("cold"); later runs do no teacher forward
    pass at all ("warm").

    Safety: each entry also keeps the batch's labels and a per-image checksum of its pixels. A hit whose
    batch differs (a loader with another seed or augmentation under a reused fingerprint, a loader whose
    epoch counter was not reset) raises :class:`TeacherCacheMismatch` instead of training on wrong targets.

    Entries live in memory (on the device they were computed on). With ``directory``, :meth:`save` writes
    one file per (teacher, data) pair and a later cache with the same directory reads it back.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._entries: dict[tuple[str, str, int, int], _CachedBatch] = {}
        self._loaded_files: set[tuple[str, str]] = set()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return f"TeacherCache({len(self)} batches, {self.hits} hits, {self.misses} teacher passes{where})"

    @property
    def teacher_passes(self) -> int:
        """How many batches the teacher had to be run on (cache misses)."""
        return self.misses

    def clear(self) -> None:
        """Forget every entry in memory (files on disk stay) and reset the counters."""
        self._entries.clear()
        self._loaded_files.clear()
        self.hits = self.misses = 0

    def teacher_logits(
        self,
        teacher: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        teacher_id: str,
        data_fingerprint: str,
        epoch: int,
        batch: int,
    ) -> Tensor:
        """The teacher's logits for this batch: from the cache, or computed (no gradients) and stored."""
        key = (teacher_id, str(data_fingerprint), int(epoch), int(batch))
        if key not in self._entries:
            self._load(teacher_id, str(data_fingerprint))
        entry = self._entries.get(key)
        if entry is not None:
            self._check_same_batch(entry, images, labels, key)
            self.hits += 1
            return entry.logits
        with torch.no_grad():
            logits = teacher(images).detach().float()
        self._entries[key] = _CachedBatch(logits, labels.detach().clone(), _image_sums(images))
        self.misses += 1
        return logits

    @staticmethod
    def _check_same_batch(entry: _CachedBatch, images: Tensor, labels: Tensor, key: tuple) -> None:
        labels = labels.to(entry.labels.device)
        same = entry.labels.shape == labels.shape and torch.equal(entry.labels, labels)
        if same:
            sums = _image_sums(images).to(entry.image_sums.device)
            same = torch.allclose(sums, entry.image_sums, rtol=1e-5, atol=1e-3)
        if not same:
            _, data, epoch, batch = key
            raise TeacherCacheMismatch(
                f"The teacher cache holds logits for epoch {epoch}, batch {batch} of data {data!r}, but this "
                "batch has different images or labels. The loader must give the same batches as the run "
                "that filled the cache: same seed, augmentation and batch size, and a fresh loader (or one "
                "whose epoch counter starts at 0: call train_loader.set_epoch(0) before fit) for each run. "
                "Use a new TeacherCache() otherwise."
            )

    # ---- optional files ----

    def _path(self, teacher_id: str, data_fingerprint: str) -> Path:
        assert self.directory is not None
        name = hashlib.sha256(f"{teacher_id}|{data_fingerprint}".encode()).hexdigest()[:20]
        return self.directory / f"teacher-logits-{name}.pt"

    def _load(self, teacher_id: str, data_fingerprint: str) -> None:
        if self.directory is None or (teacher_id, data_fingerprint) in self._loaded_files:
            return
        self._loaded_files.add((teacher_id, data_fingerprint))
        path = self._path(teacher_id, data_fingerprint)
        if not path.is_file():
            return
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("teacher_id") != teacher_id or stored.get("data_fingerprint") != data_fingerprint:
            raise TeacherCacheMismatch(f"{path} belongs to another teacher or data set; delete it.")
        for position, entry in stored["entries"].items():
            epoch, batch = (int(part) for part in position.split(":"))
            self._entries.setdefault(
                (teacher_id, data_fingerprint, epoch, batch),
                _CachedBatch(entry["logits"], entry["labels"], entry["image_sums"]),
            )

    def save(self) -> list[Path]:
        """Write the entries to ``directory``, one file per (teacher, data) pair, atomically."""
        if self.directory is None:
            raise ValueError(
                "This TeacherCache has no directory: create it with TeacherCache(directory=...)."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        groups: dict[tuple[str, str], dict[str, dict[str, Tensor]]] = {}
        for (teacher_id, data, epoch, batch), entry in self._entries.items():
            groups.setdefault((teacher_id, data), {})[f"{epoch}:{batch}"] = {
                "logits": entry.logits.cpu(),
                "labels": entry.labels.cpu(),
                "image_sums": entry.image_sums.cpu(),
            }
        written = []
        for (teacher_id, data), entries in groups.items():
            path = self._path(teacher_id, data)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as file:
                    torch.save({"teacher_id": teacher_id, "data_fingerprint": data, "entries": entries}, file)
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
            written.append(path)
        return written


# --------------------------------------------------------------------------------------------------------
# The distiller
# --------------------------------------------------------------------------------------------------------


class HintonKD(Distiller):
    """Vanilla knowledge distillation: ``alpha * CE(y, z_s) + (1 - alpha) * kd_loss(z_s, z_t, T)``.

    The teacher is frozen (eval mode, no gradients; see :class:`~kdbook_utils.train.Distiller`). ``forward``
    returns the student's logits and the two *weighted* terms ``{"ce": alpha * CE, "kd": (1 - alpha) *
    kd_loss}``, so ``fit`` logs both and their sum is the objective.

    With a ``cache`` (:class:`TeacherCache`) and the training loader's ``data_fingerprint``, training batches
    take the teacher's logits from the cache (keyed by the epoch and batch ``fit`` announces through
    :meth:`on_batch_start`); any other call (evaluation, a forward outside ``fit``) runs the teacher.
    ``fit`` counts epochs from 0 on every call, so give each run a fresh loader, or call
    ``train_loader.set_epoch(0)`` before ``fit``; otherwise the cache's guard raises.

    Defaults T = 4 and alpha = 0.1 are RepDistiller's and mdistiller's CIFAR-100 recipe; Hinton et al.
    found a considerably lower weight on the hard-label term works best.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float = 0.1,
        cache: TeacherCache | None = None,
        data_fingerprint: str | None = None,
    ) -> None:
        super().__init__(student, teacher)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha weighs the hard-label term and must lie in [0, 1], got {alpha!r}.")
        if cache is not None and not data_fingerprint:
            raise ValueError(
                "A teacher cache needs the training data's identity: pass data_fingerprint=train_loader.fingerprint."
            )
        self.kd = KDLoss(temperature)
        self.alpha = float(alpha)
        self.cache = cache
        self.data_fingerprint = data_fingerprint
        self.teacher_id = teacher_fingerprint(teacher) if cache is not None else None
        self._position: tuple[int, int] | None = None

    @property
    def temperature(self) -> float:
        return self.kd.temperature

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, cached_teacher={self.cache is not None}"

    def on_batch_start(self, epoch: int, batch: int) -> None:
        self._position = (epoch, batch)

    def teacher_logits(self, images: Tensor, labels: Tensor) -> Tensor:
        """The frozen teacher's logits for the batch: from the cache during ``fit``, else computed."""
        position, self._position = self._position, None  # a position is good for one batch only
        if self.cache is None or position is None or not self.training:
            with torch.no_grad():
                return self.teacher(images)
        assert self.teacher_id is not None and self.data_fingerprint is not None
        return self.cache.teacher_logits(
            self.teacher,
            images,
            labels,
            teacher_id=self.teacher_id,
            data_fingerprint=self.data_fingerprint,
            epoch=position[0],
            batch=position[1],
        )

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_logits = self.teacher_logits(images, labels)
        student_logits = self.student(images)
        hard = F.cross_entropy(student_logits, labels)
        soft = self.kd(student_logits, teacher_logits.to(student_logits.dtype))
        return student_logits, {"ce": self.alpha * hard, "kd": (1.0 - self.alpha) * soft}


# --------------------------------------------------------------------------------------------------------
# Several seeds
# --------------------------------------------------------------------------------------------------------


def run_seeds(
    train_one: Callable[[int], Mapping[str, object]],
    seeds: Sequence[int],
    **labels: object,
) -> pd.DataFrame:
    """Train one configuration once per seed: a table with one row per run.

    ``train_one(seed)`` trains and returns a dict of results (e.g. ``{"accuracy": 0.93}``); ``labels``
    (e.g. ``method="KD", T=4``) are added to every row, so tables from several configurations concatenate
    and ``kdbook_utils.plots.summarize_runs`` turns them into mean +- std.
    """
    if not seeds:
        raise ValueError("run_seeds needs at least one seed, e.g. seeds=(0, 1, 2).")
    rows = []
    for seed in seeds:
        result = dict(train_one(int(seed)))
        rows.append({**labels, "seed": int(seed), **result})
    return pd.DataFrame(rows)


@dataclass
class StudentRun:
    """One trained student: its test ``accuracy``, its ``history`` (from ``fit``) and the ``model``."""

    accuracy: float
    history: pd.DataFrame
    model: nn.Module


def train_student(
    build_student: Callable[[], nn.Module],
    train_data: object,
    test_data: object,
    *,
    seed: int,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 64,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.1,
    cache: TeacherCache | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> StudentRun:
    """Train a fresh student (``build_student()``, seeded with ``seed``) alone or, given a ``teacher``, with
    :class:`HintonKD`; return its test accuracy, history and model.

    ``seed`` fixes both the student's initialisation and the loader's shuffling and augmentation, so two
    runs with the same seed see the same batches and a ``cache`` filled by one serves the other. A fresh
    loader is made for every run, as the cache requires.
    """
    from kdbook_utils.data import TensorLoader
    from kdbook_utils.train import CrossEntropy, fit, seed_everything

    train_loader = TensorLoader(train_data, batch_size, train=True, device=device, seed=seed)
    test_loader = TensorLoader(test_data, 256, train=False, device=device)
    seed_everything(seed)
    student = build_student()
    if teacher is None:
        method: Distiller = CrossEntropy(student)
    else:
        method = HintonKD(
            student,
            teacher,
            temperature=temperature,
            alpha=alpha,
            cache=cache,
            data_fingerprint=train_loader.fingerprint if cache is not None else None,
        )
    history = fit(method, train_loader, test_loader, epochs=epochs, lr=lr, device=device, progress=progress)
    return StudentRun(accuracy=float(history["val_acc"].iloc[-1]), history=history, model=student)


# --------------------------------------------------------------------------------------------------------
# The source proposal's teacher: an ImageNet-pretrained torchvision network fine-tuned on the data
# --------------------------------------------------------------------------------------------------------


def finetune_pretrained_teacher(
    arch: str,
    preset: object,
    train_data: object,
    test_data: object,
    *,
    seed: int = 0,
    epochs: int = 10,
    lr: float = 0.01,
    download: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[nn.Module, pd.DataFrame | None]:
    """An ImageNet-pretrained ``torchvision_resnet50`` or ``torchvision_inception_v3`` fine-tuned on
    ``train_data`` (the setting of the student proposal behind lesson 1), cached like a zoo teacher.

    The fine-tuned weights are cached under the tag ``imagenet`` (see
    :func:`kdbook_utils.checkpoints.checkpoint_path`), so the ImageNet file is needed only the first time.
    Raises :class:`~kdbook_utils.models.torchvision_zoo.PretrainedWeightsUnavailable` when it is needed
    and can be neither found nor downloaded, before any training. Fine-tuning recipe (ours, not the
    proposal's, which gives none): SGD with ``lr`` 0.01 and a cosine schedule for ``epochs`` epochs.
    """
    from kdbook_utils.checkpoints import checkpoint_path, load_or_train
    from kdbook_utils.data import TensorLoader
    from kdbook_utils.models import create_model
    from kdbook_utils.train import choose_device, fit, seed_everything

    if arch not in ("torchvision_resnet50", "torchvision_inception_v3"):
        raise ValueError(f"arch must be 'torchvision_resnet50' or 'torchvision_inception_v3', got {arch!r}.")
    device = choose_device(getattr(preset, "device", "auto") if device is None else device)
    path = checkpoint_path(arch, preset.dataset, preset.name, seed, tag=f"imagenet{epochs}ep")
    in_channels = int(train_data.images.shape[1])
    layout = {"stem": "imagenet"} if arch == "torchvision_resnet50" else {}
    seed_everything(seed)
    if path.is_file():  # fine-tuned before: the same layout, weights from the checkpoint
        model = create_model(arch, train_data.num_classes, in_channels=in_channels, **layout)
    else:
        model = create_model(
            arch, train_data.num_classes, in_channels=in_channels, pretrained=True, download=download
        )
    train_loader = TensorLoader(train_data, preset.batch_size, train=True, device=device, seed=seed)
    test_loader = TensorLoader(test_data, 128, train=False, device=device)

    def train(model: nn.Module) -> pd.DataFrame:
        return fit(model, train_loader, test_loader, epochs=epochs, lr=lr, device=device, progress=progress,
                   desc=f"fine-tune {arch}")  # fmt: skip

    model, history, loaded = load_or_train(
        model, path, train, recipe={"arch": arch, "epochs": epochs, "lr": lr}
    )
    print(f"{'Loaded' if loaded else 'Fine-tuned'} ImageNet-pretrained {arch}: {path}")
    return model.to(device).eval(), history


# --------------------------------------------------------------------------------------------------------
# Figures and tables for the lesson
# --------------------------------------------------------------------------------------------------------


def plot_soft_targets(
    teacher_logits: Tensor,
    images: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    temperatures: Sequence[float] = (1, 2, 4, 8),
    *,
    log_scale: bool = False,
) -> object:
    """One row per image: the image, then the teacher's soft targets at each temperature as grouped bars.

    ``images`` are uint8 ``(N, C, H, W)`` as stored in an ``ImageDataset``; ``teacher_logits`` ``(N, classes)``.
    Returns the Matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    count = teacher_logits.shape[0]
    if images.shape[0] != count or labels.shape[0] != count:
        raise ValueError(
            f"Got {count} rows of logits, {images.shape[0]} images and {labels.shape[0]} labels."
        )
    figure, axes = plt.subplots(
        count, 2, figsize=(10, 2.3 * count), gridspec_kw={"width_ratios": [1, 5]}, squeeze=False
    )
    positions = np.arange(len(classes))
    width = 0.8 / len(temperatures)
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, len(temperatures)))
    for row in range(count):
        picture = images[row].permute(1, 2, 0).cpu().numpy()
        axes[row, 0].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(f"true: {classes[int(labels[row])]}", fontsize=9)
        bars = axes[row, 1]
        for index, temperature in enumerate(temperatures):
            probabilities = soft_targets(teacher_logits[row].float(), float(temperature)).cpu().numpy()
            bars.bar(positions + (index - (len(temperatures) - 1) / 2) * width, probabilities, width,
                     color=colours[index], label=f"T = {temperature:g}")  # fmt: skip
        bars.set_xticks(positions, [str(name) for name in classes], fontsize=8)
        bars.set_ylabel("probability")
        if log_scale:
            bars.set_yscale("log")
            bars.set_ylim(1e-6, 1.0)
        else:
            bars.set_ylim(0, 1.0)
        bars.legend(fontsize=8, ncols=len(temperatures), loc="upper left")
    figure.suptitle("The teacher's soft targets: a higher temperature reveals how it ranks the wrong classes")
    figure.tight_layout()
    return figure


def dark_knowledge_table(
    teacher_logits: Tensor, labels: Tensor, classes: Sequence[str], temperature: float = 4.0
) -> pd.DataFrame:
    """For each true class, the wrong class the teacher finds most similar (the largest mean soft-target
    probability over that class's images, correctly classified or not) and that probability at T = 1 and
    at ``temperature``: the "dark knowledge" a student can learn from."""
    rows = []
    for label, name in enumerate(classes):
        members = labels == label
        if not members.any():
            continue
        cold = soft_targets(teacher_logits[members].float(), 1.0).mean(dim=0)
        warm = soft_targets(teacher_logits[members].float(), temperature).mean(dim=0)
        ranking = warm.clone()
        ranking[label] = -1.0
        nearest = int(ranking.argmax())
        rows.append(
            {
                "class": str(name),
                "most similar wrong class": str(classes[nearest]),
                "its probability, T = 1": cold[nearest].item(),
                f"its probability, T = {temperature:g}": warm[nearest].item(),
                f"true class, T = {temperature:g}": warm[label].item(),
            }
        )
    return pd.DataFrame(rows)
