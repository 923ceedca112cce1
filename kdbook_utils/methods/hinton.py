"""Knowledge distillation with soft targets: Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network", NIPS Deep Learning Workshop 2014, https://arxiv.org/abs/1503.02531.

A trained teacher's logits ``v`` are softened with a temperature ``T`` into *soft targets*
``p = softmax(v / T)``; the student's logits ``z`` give ``q = softmax(z / T)``. The student minimises

    L = alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * KL(p || q)            (section 2)

The ``T^2`` keeps the soft term's gradient, which shrinks like ``1 / T^2``, on the scale of the hard
term's whatever ``T`` is (section 2, last paragraph). The defaults T = 4 and alpha = 0.1 are the CIFAR
recipe of RepDistiller and mdistiller; the paper found a considerably lower weight on the hard term best.

* :func:`soft_targets`, :func:`kd_loss` (the loss as a pure function) and :class:`KDLoss` (its module);
* :func:`soft_cross_entropy`: the loss as the paper writes it (same gradient, another constant);
* :func:`logit_matching_limit`: what ``kd_loss`` tends to as ``T`` grows (section 2.1);
* :class:`HintonKD`: the distiller that :func:`kdbook_utils.train.fit` trains.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.train import Distiller

__all__ = ["HintonKD", "KDLoss", "kd_loss", "logit_matching_limit", "soft_cross_entropy", "soft_targets"]

KDLossFunction = Callable[[Tensor, Tensor, float], Tensor]


def check_temperature(temperature: float) -> None:
    """Refuse a temperature that is not a positive finite number."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < float("inf")
    ):
        raise ValueError(
            f"The temperature must be a positive number; got {temperature!r}. T = 1 is the plain softmax; "
            "KD uses T of 1-20 (4 is the usual default)."
        )


def check_logits(student_logits: Tensor, teacher_logits: Tensor, *, values: bool = True) -> None:
    """Refuse logits a KD loss cannot compare: shapes (batch, classes) that differ, non-finite values, and
    warn when the teacher's "logits" look like probabilities (softmax already applied)."""
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"The {name} logits must have shape (batch, classes); got {shape}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student and teacher logits must have the same shape (batch, classes); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}: do both models predict the "
            "same number of classes for the same batch?"
        )
    if not values:
        return
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(
                f"The {name} logits contain NaN or infinite values; the KD loss would be NaN. Check the "
                f"{name} model (a diverged training run?) and its input."
            )
    detached = teacher_logits.detach()
    sums = detached.sum(dim=1)
    if bool((detached >= 0).all() and (detached <= 1).all()) and bool(
        torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
    ):
        warnings.warn(
            "The teacher 'logits' are all in [0, 1] and each row sums to 1: they look like probabilities "
            "(softmax already applied). kd_loss wants raw logits; pass the teacher's output before softmax.",
            stacklevel=3,
        )


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """Probabilities softened by a temperature: ``softmax(logits / T)`` over the last dimension.

    ``T = 1`` is the ordinary softmax; a larger ``T`` flattens it and reveals how the model ranks the
    wrong classes (the paper's "dark knowledge").
    """
    check_temperature(temperature)
    return F.softmax(logits / temperature, dim=-1)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, *, check_values: bool = True
) -> Tensor:
    """The soft-target loss ``T^2 * KL(p || q)``, summed over classes and averaged over the batch.

        kd = T^2 / B * sum_b sum_c p_bc * (log p_bc - log q_bc),
        p = softmax(v / T) (teacher),  q = softmax(z / T) (student)

    This "batchmean KL x T^2" is the convention of RepDistiller (``DistillKL``), mdistiller and
    torchdistill (``KDLoss`` with alpha > 0). Gradients reach the teacher's logits too unless they are
    detached, as :class:`HintonKD` does. ``check_values=False`` skips the (synchronising) checks for NaN
    and for probabilities passed as logits; shapes and the temperature are always checked.
    """
    check_temperature(temperature)
    check_logits(student_logits, teacher_logits, values=check_values)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    # log_target=True: p * log p is computed from log p, so a class with p = 0 contributes exactly 0.
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Cross-entropy with the teacher's soft targets, ``H(p, q) = -1/B sum_b sum_c p_bc log q_bc``, no T^2.

    The paper writes the loss this way. ``H(p, q) = KL(p || q) + H(p)``, and the teacher's entropy
    ``H(p)`` does not depend on the student: the student gets the same gradient as from the KL form.
    """
    check_temperature(temperature)
    check_logits(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    return -(F.softmax(teacher_logits / temperature, dim=1) * log_q).sum(dim=1).mean()


def logit_matching_limit(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The value :func:`kd_loss` tends to as ``T`` grows: matching logits once their means are removed.

        lim_{T -> inf} kd_loss = 1 / (2 C B) * sum_b || (z_b - mean z_b) - (v_b - mean v_b) ||^2

    (section 2.1: in the high-temperature limit, distillation is equivalent to matching the zero-mean
    logits, as Caruana et al.'s model compression did). ``C`` is the number of classes.
    """
    check_logits(student_logits, teacher_logits)
    difference = (student_logits - student_logits.mean(dim=1, keepdim=True)) - (
        teacher_logits - teacher_logits.mean(dim=1, keepdim=True)
    )
    return difference.pow(2).sum(dim=1).mean() / (2 * student_logits.shape[1])


class KDLoss(nn.Module):
    """:func:`kd_loss` as a module with its temperature: ``KDLoss(4.0)(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class HintonKD(Distiller):
    """Vanilla knowledge distillation: ``alpha * CE(y, z_s) + (1 - alpha) * kd_loss(z_s, z_t, T)``.

    The teacher is frozen (eval mode, no gradients). ``forward`` returns the student's logits and the two
    *weighted* terms ``{"ce": alpha * CE, "kd": (1 - alpha) * kd_loss}``; ``fit`` logs both and minimises
    their sum. ``loss`` replaces :func:`kd_loss` by any function with its signature (a learner's own, in
    the lesson's exercise). The teacher's logits come from :meth:`Distiller.teacher_outputs`, so a sweep
    can serve them from a cache instead of running the teacher on every batch.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float = 0.1,
        loss: KDLossFunction | None = None,
    ) -> None:
        super().__init__(student, teacher)
        check_temperature(temperature)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"alpha weighs the hard-label term and must lie in [0, 1]; got {alpha!r} "
                "(alpha = 1 is the student alone, alpha = 0 pure distillation)."
            )
        if loss is not None and not callable(loss):
            raise TypeError(
                f"loss must be a function like kd_loss(student_logits, teacher_logits, T); got {loss!r}."
            )
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.loss = kd_loss if loss is None else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():  # the teacher is frozen (and kept in eval mode): its logits are only targets
            teacher_logits = self.teacher_outputs(images, labels).logits
        student_logits = self.student(images)
        soft = self.loss(student_logits, teacher_logits, self.temperature)  # T^2 KL(p || q), kd_loss
        hard = F.cross_entropy(student_logits, labels)
        return student_logits, {"ce": self.alpha * hard, "kd": (1 - self.alpha) * soft}
