"""Exercises of lesson 5 (distilling a language model): write the per-token reverse KL; read the run.

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with what
is wrong, or "Not done yet.") and never raises. A "Not yet." names the mistake it recognises, never the
answer.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from torch import Tensor
from torch.nn import functional as F

from kdbook_utils.exercises.result import CheckResult, Exercise, never_raises
from kdbook_utils.methods.lm import forward_kl, reverse_kl

__all__ = ["READING", "REVERSE_KL", "check_reading", "check_reverse_kl"]

ReverseKL = Callable[[Tensor, Tensor, Tensor], Tensor]

REVERSE_KL = Exercise("lm-reverse-kl", "Lesson 5, exercise 1: the per-token reverse KL", max_points=2)
READING = Exercise("lm-reading", "Lesson 5, exercise 2: read your run")


def _close(value: float, reference: float, tolerance: float = 1e-4) -> bool:
    return abs(value - reference) <= tolerance * max(1.0, abs(reference))


def _mistakes(student: Tensor, teacher: Tensor, mask: Tensor) -> list[tuple[str, Callable[[], Tensor]]]:
    """Wrong versions learners write, each with what is wrong (not how to write it right)."""
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    q = log_q.exp()
    per_position = (q * (log_q - log_p)).sum(-1)
    scored = mask.double()
    return [
        (
            (
                "Your value is the forward KL, KL(teacher || student): the two distributions are the wrong "
                "way round."
            ),
            lambda: forward_kl(student, teacher, mask=mask),
        ),
        (
            "Padding positions (mask False) are counted in your average: only scored positions may count.",
            lambda: per_position.mean(),
        ),
        (
            "You added the positions up: the loss is a mean over the scored positions.",
            lambda: (per_position * scored).sum(),
        ),
        (
            "You averaged over the vocabulary: at each position the divergence is a sum over the tokens.",
            lambda: (per_position * scored).sum() / scored.sum() / student.shape[-1],
        ),
        (
            "Your value is a cross-entropy, not a KL divergence: the student's own entropy term is missing.",
            lambda: (-(q * log_p).sum(-1) * scored).sum() / scored.sum(),
        ),
    ]


@never_raises(REVERSE_KL)
def check_reverse_kl(candidate: ReverseKL) -> CheckResult:
    """Test ``candidate(student_logits, teacher_logits, mask)`` (logits ``(N, L, V)``, mask ``(N, L)``,
    True where a position is scored) against the per-token reverse KL, value and gradient."""
    generator = torch.Generator().manual_seed(0)
    for batch, length, vocabulary in ((2, 5, 7), (3, 4, 11), (1, 6, 3)):
        student = torch.randn(batch, length, vocabulary, generator=generator, dtype=torch.float64) * 2
        teacher = torch.randn(batch, length, vocabulary, generator=generator, dtype=torch.float64) * 2
        mask = torch.rand(batch, length, generator=generator) > 0.3
        mask[0, 0] = True
        student_input = student.clone().requires_grad_(True)
        value, failed = REVERSE_KL.call(candidate, student_input, teacher.clone(), mask.clone())
        if failed is not None:
            return failed
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            return REVERSE_KL.incorrect(
                f"Return one number (a scalar tensor) for the whole batch, not {shape}."
            )
        reference = float(reverse_kl(student, teacher, mask=mask))
        got = float(value.detach().reshape(()))
        if not _close(got, reference):
            for hint, mistake in _mistakes(student, teacher, mask):
                with torch.no_grad():
                    if _close(got, float(mistake())):
                        return REVERSE_KL.incorrect(hint)
            return REVERSE_KL.incorrect(
                f"For a batch of {batch} sequences of {length} positions and {vocabulary} tokens your value "
                "differs from the reverse KL. Check each part: which distribution weights the log-ratio, the "
                "sum over tokens, the mean over scored positions only."
            )
        if not value.requires_grad:
            return REVERSE_KL.incorrect(
                "The value is right but no gradient reaches the student's logits: avoid .item(), .detach(), "
                "numpy or torch.no_grad() inside the loss."
            )
        (gradient,) = torch.autograd.grad(value.reshape(()), student_input)
        reference_input = student.clone().requires_grad_(True)
        (reference_gradient,) = torch.autograd.grad(
            reverse_kl(reference_input, teacher, mask=mask), reference_input
        )
        if not torch.allclose(gradient, reference_gradient, rtol=1e-4, atol=1e-8):
            return REVERSE_KL.incorrect(
                "The value is right but its gradient is not: is part of it computed without autograd?"
            )
    return REVERSE_KL.correct(
        "Your reverse KL matches the reference on every test batch, value and gradient."
    )


@never_raises(READING)
def check_reading(
    runs: pd.DataFrame, lowest_kl_to_teacher: str | None, lowest_own_entropy: str | None
) -> CheckResult:
    """Check a reading of this run's table (test split, means over seeds, failed runs left out): the
    student with the lowest ``KL(teacher || student)`` and the one with the lowest entropy on its own text.

    The answers are checked against the run's numbers, whatever they are."""
    answers = {"lowest_kl_to_teacher": lowest_kl_to_teacher, "lowest_own_entropy": lowest_own_entropy}
    test = runs[(runs["split"] == "test") & (runs["failed"] == "")]
    methods = list(dict.fromkeys(test["method"]))
    for name, answer in answers.items():
        if answer is None or answer is ... or str(answer).strip() == "":
            return READING.not_done(f"Fill in {name} with the name of a student: one of {methods}.")
        if str(answer).strip() not in methods:
            return READING.incorrect(
                f"{answer!r} ({name}) is not one of the students of this run: {methods}."
            )
    means = test.groupby("method")[["kl_teacher", "own_entropy"]].mean()
    wrong = []
    if means["kl_teacher"].idxmin() != str(lowest_kl_to_teacher).strip():
        wrong.append(
            "lowest_kl_to_teacher: another student has a lower mean KL(teacher || student) on the test "
            "documents; sort the summary table by that column"
        )
    if means["own_entropy"].idxmin() != str(lowest_own_entropy).strip():
        wrong.append(
            "lowest_own_entropy: another student has a lower mean entropy on its own text; look at that "
            "column again"
        )
    if wrong:
        return READING.incorrect("; ".join(wrong) + ".")
    return READING.correct(
        "That is what this run shows. Compare it with what the mode-covering figure predicts."
    )
