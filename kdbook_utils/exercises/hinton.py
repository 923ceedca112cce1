"""Exercises of lesson 1 (Hinton KD): write the KD loss; predict, then measure, a very high temperature.

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with what
is wrong and a hint, or "Not done yet.") and never raises: a notebook whose exercises are not done yet
still runs top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from kdbook_utils.exercises.result import CheckResult, Exercise, never_raises
from kdbook_utils.methods.hinton import kd_loss

__all__ = ["HIGH_TEMPERATURE", "KD_LOSS", "check_high_temperature_prediction", "check_kd_loss"]

KDLossFunction = Callable[[Tensor, Tensor, float], Tensor]

KD_LOSS = Exercise("hinton-kd-loss", "Lesson 1, exercise 1: the KD loss")
HIGH_TEMPERATURE = Exercise("hinton-high-temperature", "Lesson 1, exercise 2: a very high temperature")


def _close(value: float, reference: float, tolerance: float = 1e-4) -> bool:
    return abs(value - reference) <= tolerance * max(1.0, abs(reference))


def _common_mistakes(
    student: Tensor, teacher: Tensor, temperature: float
) -> list[tuple[str, Callable[[], Tensor]]]:
    """Wrong versions of the loss that students often write, each with the hint that fixes it."""
    squared = temperature**2
    classes = student.shape[1]
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p = F.log_softmax(teacher / temperature, dim=1)
    p, q = log_p.exp(), log_q.exp()
    kl_rows = (p * (log_p - log_q)).sum(dim=1)
    return [
        ("You forgot the factor T^2: multiply the KL divergence by temperature**2 (Hinton et al. section 2).",
         lambda: kl_rows.mean()),
        ("You multiplied by T instead of T^2.", lambda: kl_rows.mean() * temperature),
        (("You averaged over classes as well as over the batch (F.kl_div's reduction='mean'): sum over "
          "classes and average over the batch, reduction='batchmean'."), lambda: kl_rows.mean() * squared / classes),
        ("You summed over the batch: average over the batch instead (reduction='batchmean').",
         lambda: kl_rows.sum() * squared),
        (("The KL divergence points the wrong way: KD uses KL(p_teacher || p_student), the teacher's "
          "probabilities weight the log-ratio. In F.kl_div(input, target) the student's log-probabilities "
          "are the input and the teacher's probabilities the target."),
         lambda: (q * (log_q - log_p)).sum(dim=1).mean() * squared),
        ("You did not divide the logits by the temperature before the softmax (both student and teacher).",
         lambda: (F.softmax(teacher, 1) * (F.log_softmax(teacher, 1) - F.log_softmax(student, 1)))
         .sum(dim=1).mean() * squared),
        (("That is the soft cross-entropy -sum p log q: it differs from the KL divergence by the teacher's "
          "entropy (a constant for the student, same gradient), but kd_loss is the KL form: subtract "
          "sum p log p, or use F.kl_div."), lambda: -(p * log_q).sum(dim=1).mean() * squared),
        (("F.kl_div expects log-probabilities as its first argument: pass F.log_softmax(student / T), not "
          "F.softmax(student / T)."),
         lambda: F.kl_div(q, p, reduction="batchmean") * squared),
    ]  # fmt: skip


@never_raises(KD_LOSS)
def check_kd_loss(candidate: KDLossFunction) -> CheckResult:
    """Test a student's ``kd_loss(student_logits, teacher_logits, temperature)`` against the reference.

    Value and gradient are compared on four batches and temperatures; a wrong value that matches one of
    the common mistakes gets that mistake's hint.
    """
    generator = torch.Generator().manual_seed(0)
    cases = [(8, 10, 4.0), (5, 10, 1.0), (16, 100, 2.0), (4, 3, 8.0)]
    for batch, classes, temperature in cases:
        student = torch.randn(batch, classes, generator=generator) * 3
        teacher = torch.randn(batch, classes, generator=generator) * 3
        student_input = student.clone().requires_grad_(True)
        value, failed = KD_LOSS.call(candidate, student_input, teacher.clone(), temperature)
        if failed is not None:
            return failed
        if not isinstance(value, Tensor):
            return KD_LOSS.incorrect(f"Return a torch tensor (a scalar), not a {type(value).__name__}.")
        if value.numel() != 1:
            return KD_LOSS.incorrect(
                f"The loss must be one number (a scalar tensor) for the whole batch, got shape "
                f"{tuple(value.shape)}: sum over classes, then average over the batch."
            )
        reference = kd_loss(student, teacher, temperature).item()
        got = float(value.detach().float().reshape(()))
        if not _close(got, reference):
            for hint, mistake in _common_mistakes(student, teacher, temperature):
                with torch.no_grad():
                    if _close(got, mistake().item()):
                        return KD_LOSS.incorrect(f"{hint} (batch {batch}, {classes} classes, T = {temperature:g}: "
                                                 f"got {got:.5f}, expected {reference:.5f}.)")  # fmt: skip
            return KD_LOSS.incorrect(
                f"For a batch of {batch}, {classes} classes and T = {temperature:g} your loss is {got:.5f}, "
                f"the reference {reference:.5f}. Check the formula T^2 / B * sum_b sum_c p (log p - log q), "
                "p = softmax(teacher / T), q = softmax(student / T)."
            )
        no_gradient = KD_LOSS.incorrect(
            "The value is right but no gradient reaches the student's logits: avoid .item(), .detach(), "
            "numpy or torch.no_grad() inside the loss."
        )
        if not value.requires_grad:
            return no_gradient
        try:
            (gradient,) = torch.autograd.grad(value.reshape(()), student_input)
        except RuntimeError:  # the value does not depend on the student's logits
            return no_gradient
        expected = (
            temperature * (F.softmax(student / temperature, 1) - F.softmax(teacher / temperature, 1)) / batch
        )
        if not torch.allclose(gradient, expected, rtol=1e-3, atol=1e-6):
            return KD_LOSS.incorrect(
                "The value is right but its gradient is not: is part of it computed without autograd?"
            )
    return KD_LOSS.correct("Your kd_loss matches the reference on every test batch, value and gradient.")


SOFT_TARGET_CHOICES = ("one-hot", "uniform", "unchanged")
KD_LOSS_CHOICES = ("grows without bound", "goes to zero", "levels off")


@never_raises(HIGH_TEMPERATURE)
def check_high_temperature_prediction(soft_targets_become: str, kd_loss_becomes: str) -> CheckResult:
    """Check a prediction of what a very high temperature does (before measuring it).

    ``soft_targets_become``: one of ``"one-hot"``, ``"uniform"``, ``"unchanged"``;
    ``kd_loss_becomes`` (the loss *with* its T^2 factor): ``"grows without bound"``, ``"goes to zero"``,
    ``"levels off"``. Case and surrounding spaces do not matter.
    """
    answers = {
        "soft targets": (soft_targets_become, SOFT_TARGET_CHOICES),
        "kd_loss": (kd_loss_becomes, KD_LOSS_CHOICES),
    }
    for name, (answer, choices) in answers.items():
        if answer is None or answer is ... or str(answer).strip() == "":
            return HIGH_TEMPERATURE.not_done(
                f"Fill in your prediction for the {name}: one of {', '.join(map(repr, choices))}."
            )
        if str(answer).strip().lower() not in choices:
            return HIGH_TEMPERATURE.incorrect(
                f"{answer!r} is not one of the choices for the {name}: {', '.join(map(repr, choices))}."
            )
    soft, loss = str(soft_targets_become).strip().lower(), str(kd_loss_becomes).strip().lower()
    feedback = []
    if soft != "uniform":
        feedback.append(
            "Soft targets: softmax(v / T) with a huge T divides every logit difference by T, so all classes "
            "get nearly the same probability: they become uniform (1/C each), not "
            f"{soft!r}. (A *low* temperature makes them one-hot.)"
        )
    if loss != "levels off":
        why = {
            "goes to zero": "the KL divergence alone does go to zero, like 1/T^2, but the T^2 factor cancels that",
            "grows without bound": "the T^2 factor grows, but the KL divergence shrinks exactly as fast",
        }[loss]
        feedback.append(
            f"kd_loss: {why}. KL x T^2 levels off at (1/2C) ||centred student logits - centred teacher "
            "logits||^2: at high temperature KD becomes logit matching (Hinton et al. section 2.1)."
        )
    if feedback:
        return HIGH_TEMPERATURE.incorrect(" ".join(feedback) + " Now run the next cell to measure it.")
    return HIGH_TEMPERATURE.correct(
        "The soft targets flatten to uniform, and KL x T^2 levels off at the logit-matching value "
        "(1/2C) ||(z - mean z) - (v - mean v)||^2 (Hinton et al. section 2.1). Run the next cell to measure it."
    )
