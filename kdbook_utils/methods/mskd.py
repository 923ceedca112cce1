"""Multiple-Stage Knowledge Distillation (MSKD): Xu, Bai, Gao, Li, Li, Li and Zhang, "Multiple-Stage
Knowledge Distillation", Applied Sciences 12(19) 9453 (2022), https://doi.org/10.3390/app12199453.

The student is a **multi-exit network** (:class:`~kdbook_utils.models.multi_exit.MultiExit`):
classifier heads branch off after intermediate stages and the backbone's own classifier is the last exit.
During training **every exit** imitates the teacher and the labels; at test time the exits vote (the mean
of their softmax probabilities), or an image leaves at the first exit that is confident enough (early
exit). In **OtO** ("one-to-one") the teacher has exits too, and teacher exit k teaches student exit k.

For exits k = 1..K with logits z_k, teacher targets t_k and labels y (the paper's Algorithm 1, one pass
over the mini-batches with an inner loop over the exits):

    L = sum_k [ alpha * CE(y, z_k) + beta * T^2 * KL(softmax(t_k / T) || softmax(z_k / T)) ]

with t_k = the teacher's final logits (MSKD) or the teacher's exit k (OtO). The soft term is lesson 1's
:func:`~kdbook_utils.methods.hinton.kd_loss`. Gradients of every exit flow into the shared backbone, so
stage 1 learns from all K exits and stage 2 from K - 1 of them.

The paper's text, equations, loss weights, temperature and schedule could not be read; the defaults
(T = 3, alpha = beta = 1, equal exit weights, joint training, the mean-of-softmax ensemble, HSAKD-style
copied heads) follow the closest public code. The book's appendix ("How each paper was reconstructed")
lists every choice and its alternatives; each is a keyword argument here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.methods.hinton import kd_loss
from kdbook_utils.models.multi_exit import MultiExit
from kdbook_utils.train import Distiller

DEFAULT_TEMPERATURE = 3.0
"""HSAKD's ``--kd_T 3``; RepDistiller's default would be 4."""

# --------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------


def exit_loss(
    exit_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = 1.0,
    beta: float = 1.0,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """One exit's two terms, ``(alpha * CE(y, z_k), beta * T^2 * KL(softmax(t/T) || softmax(z_k/T)))``.

    The KL term is :func:`~kdbook_utils.methods.hinton.kd_loss` (summed over classes, averaged over the
    batch, times T^2); ``symmetric=True`` averages it with the reverse direction, T^2 KL(q || p). Without
    a teacher (``teacher_logits=None``) the KL term is zero.
    """
    ce = alpha * F.cross_entropy(exit_logits.float(), labels)
    if teacher_logits is None or beta == 0:
        return ce, ce.new_zeros(())
    student, teacher = exit_logits.float(), teacher_logits.float()
    kd = kd_loss(student, teacher, temperature)
    if symmetric:
        kd = 0.5 * (kd + kd_loss(teacher, student, temperature))
    return ce, beta * kd


def mskd_loss(
    exit_logits: Sequence[Tensor],
    labels: Tensor,
    teacher_logits: Tensor | Sequence[Tensor] | None,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = 1.0,
    beta: float = 1.0,
    exit_names: Sequence[str] | None = None,
    symmetric: bool = False,
) -> dict[str, Tensor]:
    """The MSKD loss ``sum_k [alpha * CE(y, z_k) + beta * T^2 * KL(q_k || softmax(z_k / T))]`` by term.

    ``teacher_logits`` is one tensor (MSKD: the teacher's final output guides every exit), one tensor per
    exit (OtO: teacher exit k guides student exit k), or None (multi-exit training without a teacher).
    Returns the weighted terms ``ce_<exit>`` and ``kd_<exit>``; the training loop sums them.
    """
    names = (
        list(exit_names) if exit_names is not None else [f"exit{k}" for k in range(1, len(exit_logits) + 1)]
    )
    if len(names) != len(exit_logits):
        raise ValueError(f"Got {len(exit_logits)} exits but {len(names)} exit names.")
    if teacher_logits is None or isinstance(teacher_logits, Tensor):
        targets: list[Tensor | None] = [teacher_logits] * len(exit_logits)
    else:
        targets = list(teacher_logits)
        if len(targets) != len(exit_logits):
            raise ValueError(
                f"One-to-one distillation needs one teacher output per student exit: the teacher has "
                f"{len(targets)} exits and the student {len(exit_logits)}. Give both the same exits."
            )
    terms: dict[str, Tensor] = {}
    for name, logits, target in zip(names, exit_logits, targets):
        ce, kd = exit_loss(logits, labels, target, temperature, alpha, beta, symmetric)
        terms[f"ce_{name}"] = ce
        if target is not None and beta != 0:
            terms[f"kd_{name}"] = kd
    return terms


# --------------------------------------------------------------------------------------------------------
# The distillers
# --------------------------------------------------------------------------------------------------------


def _check_multi_exit(student: nn.Module) -> MultiExit:
    if not isinstance(student, MultiExit):
        raise TypeError(
            f"The student must be a MultiExit network (MultiExit(create_model(...))); got {type(student).__name__}."
        )
    return student


class MultiExitCrossEntropy(Distiller):
    """A multi-exit student trained without a teacher: ``L = sum_k alpha * CE(y, z_k)``."""

    def __init__(self, student: MultiExit, alpha: float = 1.0) -> None:
        super().__init__(_check_multi_exit(student))
        self.alpha = alpha

    def forward(self, images: Tensor, labels: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        exits = self.student(images)
        return exits, mskd_loss(exits, labels, None, alpha=self.alpha, exit_names=self.student.exit_names)


class MSKD(Distiller):
    """Multiple-stage KD: every exit of a multi-exit student learns from the labels and the teacher.

    ``teacher`` is a trained model whose final logits guide every exit, or, with ``one_to_one=True``
    (OtO), a :class:`MultiExit` teacher with as many exits as the student: teacher exit k guides student
    exit k. Loss: :func:`mskd_loss` with ``temperature`` (3), ``alpha`` (1), ``beta`` (1);
    ``symmetric_kl=True`` uses the symmetric KL.
    """

    def __init__(
        self,
        student: MultiExit,
        teacher: nn.Module,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = 1.0,
        beta: float = 1.0,
        one_to_one: bool = False,
        symmetric_kl: bool = False,
    ) -> None:
        _check_multi_exit(student)
        if one_to_one:
            if not isinstance(teacher, MultiExit):
                raise TypeError(
                    "One-to-one MSKD (OtO) needs a multi-exit teacher: wrap it with MultiExit and train its "
                    "heads first (kdbook_utils.experiments.cached_teacher_exits)."
                )
            if teacher.num_exits != student.num_exits:
                raise ValueError(
                    f"OtO pairs exits one to one, but the teacher has {teacher.num_exits} exits "
                    f"{teacher.exit_names} and the student {student.num_exits} {student.exit_names}."
                )
        if not temperature > 0:
            raise ValueError(
                f"The temperature must be positive; got {temperature!r} (T = 1 is the plain softmax)."
            )
        super().__init__(student, teacher)
        self.temperature = float(temperature)
        self.alpha = alpha
        self.beta = beta
        self.one_to_one = one_to_one
        self.symmetric_kl = symmetric_kl

    def teacher_targets(self, images: Tensor, labels: Tensor) -> Tensor | list[Tensor]:
        """The teacher's final logits (MSKD) or its exits' logits (OtO), without gradients."""
        output = self.teacher_outputs(images, labels).logits
        if isinstance(output, Tensor):
            return output
        return list(output) if self.one_to_one else output[-1]

    def forward(self, images: Tensor, labels: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        targets = self.teacher_targets(images, labels)
        exits = self.student(images)
        terms = mskd_loss(exits, labels, targets, self.temperature, self.alpha, self.beta,
                          exit_names=self.student.exit_names, symmetric=self.symmetric_kl)  # fmt: skip
        return exits, terms


class OtO(MSKD):
    """One-to-one MSKD: a multi-exit teacher's exit k teaches the student's exit k."""

    def __init__(
        self,
        student: MultiExit,
        teacher: MultiExit,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = 1.0,
        beta: float = 1.0,
        symmetric_kl: bool = False,
    ) -> None:
        super().__init__(
            student, teacher, temperature, alpha, beta, one_to_one=True, symmetric_kl=symmetric_kl
        )


class ExitHeadsCrossEntropy(Distiller):
    """OtO's teacher preparation: train only the heads of a multi-exit network on its frozen backbone,
    ``sum_k CE(y, z_k)`` over the heads. The backbone keeps its weights and batch-norm statistics."""

    def __init__(self, network: MultiExit) -> None:
        super().__init__(_check_multi_exit(network))
        for parameter in network.backbone.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> ExitHeadsCrossEntropy:
        super().train(mode)
        self.student.backbone.eval()
        return self

    def forward(self, images: Tensor, labels: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        exits = self.student(images)
        return exits, mskd_loss(exits[:-1], labels, None, exit_names=self.student.exit_points)


# --------------------------------------------------------------------------------------------------------
# Inference: the exits' ensemble and early exit
# --------------------------------------------------------------------------------------------------------


def ensemble_probabilities(exit_logits: Sequence[Tensor], members: Iterable[int] | None = None) -> Tensor:
    """The exits' vote ``p_ens = (1/|S|) sum_{k in S} softmax(z_k)``; ``members`` picks S (default: all)."""
    chosen = list(range(len(exit_logits))) if members is None else sorted(set(members))
    if not chosen:
        raise ValueError("The ensemble needs at least one exit; members is empty.")
    bad = [k for k in chosen if not 0 <= k < len(exit_logits)]
    if bad:
        raise ValueError(
            f"Exit indices {bad} out of range: there are {len(exit_logits)} exits (0..{len(exit_logits) - 1})."
        )
    return torch.stack([F.softmax(exit_logits[k].float(), dim=1) for k in chosen]).mean(dim=0)


def exit_accuracies(exit_logits: Sequence[Tensor], labels: Tensor, exit_names: Sequence[str]) -> pd.Series:
    """Accuracy (percent) of each exit and of the ensemble of all exits, indexed by exit name."""
    if len(exit_names) != len(exit_logits):
        raise ValueError(f"Got {len(exit_logits)} exits but {len(exit_names)} names.")
    predictions = [logits.argmax(dim=1) for logits in exit_logits]
    predictions.append(ensemble_probabilities(exit_logits).argmax(dim=1))
    values = [100.0 * (p == labels).double().mean().item() for p in predictions]
    return pd.Series(values, index=[*exit_names, "ensemble"], name="accuracy")


@dataclass(frozen=True)
class EarlyExitResult:
    """What early exit did with each image: its prediction, the exit it left at, and the MACs spent."""

    predictions: Tensor  # (N,) class indices
    exit_index: Tensor  # (N,) index of the exit each image left at
    macs: Tensor  # (N,) float64 multiply-accumulates spent on each image

    @property
    def mean_macs(self) -> float:
        return self.macs.mean().item()

    def accuracy(self, labels: Tensor) -> float:
        """Percent of images answered correctly."""
        return 100.0 * (self.predictions == labels).double().mean().item()

    def exit_fractions(self, num_exits: int) -> Tensor:
        """Fraction of the images leaving at each exit."""
        return torch.bincount(self.exit_index, minlength=num_exits).double() / len(self.exit_index)


def early_exit(
    exit_logits: Sequence[Tensor], threshold: float, exit_macs: Sequence[float]
) -> EarlyExitResult:
    """Each image leaves at the first exit whose confidence ``max_c softmax(z_k)_c`` is ``>= threshold``.

    Images that no exit is sure enough about leave at the last. ``exit_macs[k]`` is what an image that
    leaves at exit k costs, the heads it evaluated and rejected included (the ``early_exit_macs`` column
    of :func:`~kdbook_utils.models.multi_exit.exit_costs`). Threshold 0 stops every image at the first
    exit; a threshold above 1 sends every image to the last.
    """
    if len(exit_macs) != len(exit_logits):
        raise ValueError(f"Need one cost per exit: {len(exit_logits)} exits, {len(exit_macs)} costs.")
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.01:
        raise ValueError(
            f"threshold is a softmax confidence between 0 and 1 (1.01 sends every image to the last exit); "
            f"got {threshold!r}. Percentages must be divided by 100."
        )
    probabilities = torch.stack([F.softmax(logits.float(), dim=1) for logits in exit_logits])  # (K, N, C)
    confidence, predicted = probabilities.max(dim=2)  # (K, N)
    confident = confidence >= threshold
    confident[-1] = True  # the last exit always answers
    exit_index = confident.int().argmax(dim=0)  # first True along the exits
    columns = torch.arange(exit_index.shape[0])
    costs = torch.as_tensor(list(exit_macs), dtype=torch.float64)
    return EarlyExitResult(predicted[exit_index, columns], exit_index, costs[exit_index])


def threshold_sweep(
    exit_logits: Sequence[Tensor],
    labels: Tensor,
    exit_macs: Sequence[float],
    thresholds: Iterable[float] | None = None,
) -> pd.DataFrame:
    """Accuracy (percent) and mean MACs of early exit for each threshold: the accuracy-cost curve."""
    grid = list(thresholds) if thresholds is not None else [k / 100 for k in range(0, 101, 2)] + [1.01]
    rows = []
    for threshold in grid:
        result = early_exit(exit_logits, threshold, exit_macs)
        fractions = result.exit_fractions(len(exit_logits))
        row = {"threshold": threshold, "accuracy": result.accuracy(labels), "mean_macs": result.mean_macs}
        row.update({f"share_exit{k + 1}": fractions[k].item() for k in range(len(exit_logits))})
        rows.append(row)
    return pd.DataFrame(rows)
