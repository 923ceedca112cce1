"""Exercises of lesson 1 (Hinton KD): write the KD loss; derive its limit at a very high temperature; an
experiment (does KD help more when the student has fewer images?).

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with what
is wrong and a hint, or "Not done yet.") and never raises: a notebook whose exercises are not done yet
still runs top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from kdbook_utils.exercises.result import CheckResult, Exercise, experiment_report, never_raises, uses
from kdbook_utils.methods.hinton import kd_loss, logit_matching_limit

__all__ = [
    "FEWER_IMAGES",
    "HIGH_TEMPERATURE",
    "KD_LOSS",
    "check_fewer_images",
    "check_high_temperature_limit",
    "check_kd_loss",
]

KDLossFunction = Callable[[Tensor, Tensor, float], Tensor]

KD_LOSS = Exercise("hinton-kd-loss", "Lesson 1, exercise 1: the KD loss")
HIGH_TEMPERATURE = Exercise(
    "hinton-high-temperature", "Lesson 1, exercise 2: the limit at a very high temperature"
)
FEWER_IMAGES = Exercise("hinton-fewer-images", "Lesson 1, exercise 3: an experiment with fewer images")


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


def _cases(
    student_logits: Tensor | None, teacher_logits: Tensor | None
) -> list[tuple[Tensor, Tensor, float]]:
    """Test batches: the lesson's real logits (the first 64 images, at three temperatures) when given, and
    random ones of other sizes (another class count, a batch of one)."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    if student_logits is not None and teacher_logits is not None:
        real_student, real_teacher = (
            student_logits[:64].detach().float(),
            teacher_logits[:64].detach().float(),
        )
        cases += [(real_student, real_teacher, temperature) for temperature in (1.0, 4.0, 16.0)]
    for batch, classes, temperature in [(8, 10, 4.0), (5, 10, 1.0), (16, 100, 2.0), (1, 3, 8.0)]:
        cases.append((torch.randn(batch, classes, generator=generator) * 3,
                      torch.randn(batch, classes, generator=generator) * 3, temperature))  # fmt: skip
    return cases


@never_raises(KD_LOSS)
def check_kd_loss(
    candidate: KDLossFunction, student_logits: Tensor | None = None, teacher_logits: Tensor | None = None
) -> CheckResult:
    """Test a learner's ``kd_loss(student_logits, teacher_logits, temperature)`` against the reference.

    Value and gradient are compared, to float tolerance, on real batches (the lesson's student and teacher
    logits, when given) and on random ones of other shapes; a wrong value that matches one of the common
    mistakes gets that mistake's hint. An answer that calls the package's own loss is not an answer.
    """
    if uses(candidate, ("kd_loss", "soft_cross_entropy", "KDLoss")):
        return KD_LOSS.incorrect("Write the loss yourself from torch operations: your function calls the "
                                 "package's own KD loss, which the check compares it with.")  # fmt: skip
    for student, teacher, temperature in _cases(student_logits, teacher_logits):
        batch, classes = student.shape
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
    real = " (the lesson's own logits among them)" if student_logits is not None else ""
    return KD_LOSS.correct(
        f"Your kd_loss matches the reference on every test batch{real}, value and gradient."
    )


LimitFunction = Callable[[Tensor, Tensor], Tensor]


@never_raises(HIGH_TEMPERATURE)
def check_high_temperature_limit(
    candidate: LimitFunction, student_logits: Tensor | None = None, teacher_logits: Tensor | None = None
) -> CheckResult:
    """Test a learner's derivation of ``lim_{T -> inf} kd_loss(z, v, T)`` written as ``limit(z, v)``.

    Compared with the limit on the lesson's real logits (when given) and on random ones whose rows have
    non-zero means (so that forgetting to centre shows); a wrong value that matches a known slip gets its
    hint. The hints say which step of the derivation to look at, never the formula.
    """
    if uses(candidate, ("logit_matching_limit", "kd_loss", "high_temperature")):
        return HIGH_TEMPERATURE.incorrect("Derive the limit and write it from torch operations: your function "
                                          "calls one of the package's own functions.")  # fmt: skip
    for student, teacher, _ in _cases(student_logits, teacher_logits)[::2]:
        student, teacher = student.double() + 2.0, teacher.double() - 1.0  # rows with non-zero means
        value, failed = HIGH_TEMPERATURE.call(candidate, student.clone(), teacher.clone())
        if failed is not None:
            return failed
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            return HIGH_TEMPERATURE.incorrect(f"Return one number for the batch (a scalar tensor), not {shape}: "
                                              "average over the images of the batch.")  # fmt: skip
        got, reference = float(value.detach().double()), float(logit_matching_limit(student, teacher))
        if _close(got, reference, 1e-6):
            continue
        batch, classes = student.shape
        uncentred = ((student - teacher) ** 2).sum(dim=1).mean().item() / (2 * classes)
        slips = [
            (reference * 2, ("Your value is twice the limit: look at where the 1/2 of the expansion comes from "
                            "(the second-order term of exp(x/T), or integrating the gradient).")),
            (reference * classes, ("Your value is C times the limit (C, the number of classes): check the "
                                  "factor the softmax's denominator contributes at high temperature.")),
            (reference / classes, ("Your value is 1/C times the limit: you divided by the number of classes "
                                  "twice, or averaged over classes instead of summing.")),
            (reference * batch, "Your value is B times the limit: average over the batch, do not sum."),
            (uncentred, ("Your value changes when every logit of an image is shifted by the same amount, which "
                        "a softmax ignores: centre each image's logits first.")),
        ]  # fmt: skip
        for wrong, hint in slips:
            if _close(got, wrong, 1e-6):
                return HIGH_TEMPERATURE.incorrect(hint)
        return HIGH_TEMPERATURE.incorrect(
            f"For a batch of {batch} images and {classes} classes your limit is {got:.5f}, which does not match. "
            "Start from the gradient of section 2, dKL/dz_i ~ (z_i - v_i) / (N T^2) for centred logits, "
            "multiply by T^2, and integrate in z."
        )
    return HIGH_TEMPERATURE.correct("Your limit matches on every test batch. The next cell measures kd_loss at "
                                    "growing temperatures against it.")  # fmt: skip


@never_raises(FEWER_IMAGES)
def check_fewer_images(
    jobs: object, runs: object, prediction: object, verdict: object, explanation: object, lesson_images: int
) -> CheckResult:
    """Check the experiment of exercise 3: the jobs train the student alone and with KD on fewer images
    than the lesson's students had, both over the same seeds (two or more); the verdict is the one the
    paired comparison of those runs gives; the explanation quotes the run's own mean difference."""
    if jobs is None or runs is None:
        return FEWER_IMAGES.not_done("Define FEWER (the two jobs), run them into fewer_runs, then fill in your "
                                     "prediction, verdict and explanation.")  # fmt: skip
    if not isinstance(jobs, dict) or len(jobs) != 2:
        return FEWER_IMAGES.incorrect("FEWER must be a dict of two jobs, {label: job}: the student alone and "
                                      "the student with KD.")  # fmt: skip
    methods = sorted(str(job.get("method")) for job in jobs.values() if isinstance(job, dict))
    if methods != ["KD", "student alone"]:
        return FEWER_IMAGES.incorrect(
            f"The two jobs' methods are {methods}; one must be ALONE, the other KD."
        )
    sizes = {job.get("images") for job in jobs.values()}
    if len(sizes) != 1 or None in sizes:
        return FEWER_IMAGES.incorrect("Give both jobs the same number of images (the 'images' key), so the "
                                      "comparison is paired.")  # fmt: skip
    (images,) = sizes
    if not isinstance(images, int) or not 10 <= images < lesson_images:
        return FEWER_IMAGES.incorrect(f"'images' is {images!r}: it must be a whole number of images, at least "
                                      f"10 and fewer than the lesson's {lesson_images}.")  # fmt: skip
    if not str(prediction or "").strip():
        return FEWER_IMAGES.not_done("Write your prediction in MY_PREDICTION before you run the experiment.")
    kd_label = next(label for label, job in jobs.items() if job.get("method") == "KD")
    alone_label = next(label for label in jobs if label != kd_label)
    return experiment_report(FEWER_IMAGES, runs, alone_label, kd_label, verdict, explanation)
