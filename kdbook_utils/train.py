"""One readable training loop for every method.

A *method* is an ``nn.Module`` whose ``forward(images, labels)`` returns ``(logits, losses)``: the
student's logits and a dict of named loss terms, e.g. ``{"ce": ..., "kd": ...}``. The loop adds the terms,
steps the optimiser and logs every term. Plain cross-entropy training is the simplest method
(:class:`CrossEntropy`); every distiller in ``kdbook_utils.methods`` is another.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Distiller(nn.Module):
    """Base class of every method: a student, an optional frozen teacher, and named loss terms.

    Subclasses implement :meth:`forward`. The teacher (if any) is frozen: its parameters do not require
    gradients and it stays in eval mode even while the method is in training mode.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
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
        """Called by :func:`fit` before each training batch (a teacher-output cache keys on these)."""

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class CrossEntropy(Distiller):
    """Training without a teacher: the loss is the cross-entropy with the true labels."""

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}
