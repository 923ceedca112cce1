"""Checks for lesson 4's exercises (multi-exit students, MSKD).

1. :func:`check_exit_loss`: write one exit's loss ``alpha * CE + beta * T^2 * KL(teacher || exit)``.
2. :func:`check_threshold_for_budget`: pick an early-exit confidence threshold that meets a MACs budget.

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with what
is wrong and a hint, or "Not done yet.") and never raises: a notebook whose exercises are not done yet
still runs top to bottom.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from kdbook_utils.exercises.result import CheckResult, Exercise, never_raises
from kdbook_utils.methods.mskd import early_exit, exit_loss, threshold_sweep

__all__ = ["EXIT_LOSS", "THRESHOLD_FOR_BUDGET", "check_exit_loss", "check_threshold_for_budget"]

ExitLossFunction = Callable[[Tensor, Tensor, Tensor, float, float, float], Tensor]

EXIT_LOSS = Exercise("mskd-exit-loss", "Lesson 4, exercise 1: the per-exit loss")
THRESHOLD_FOR_BUDGET = Exercise("mskd-threshold-for-budget", "Lesson 4, exercise 2: a threshold for a budget")


def _common_mistakes(
    logits: Tensor, labels: Tensor, teacher: Tensor, temperature: float, alpha: float, beta: float
) -> dict[str, Tensor]:
    """Values that typical slips produce, so the hint can name the slip."""
    ce = F.cross_entropy(logits, labels)
    log_s = F.log_softmax(logits / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    forward_kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    reverse_kl = (log_s.exp() * (log_s - log_t)).sum(dim=1)
    return {
        "the T^2 factor is missing": alpha * ce + beta * forward_kl.mean(),
        "the KL direction is reversed (it should be KL(teacher || exit))": alpha * ce
        + beta * temperature**2 * reverse_kl.mean(),
        "the KL is averaged over classes too (use the sum over classes, mean over the batch)": alpha * ce
        + beta * temperature**2 * forward_kl.mean() / logits.shape[1],
        "the KL is summed over the batch instead of averaged": alpha * ce
        + beta * temperature**2 * forward_kl.sum(),
        "the temperature is not applied to the logits": alpha * ce
        + beta
        * temperature**2
        * (F.softmax(teacher, 1) * (F.log_softmax(teacher, 1) - F.log_softmax(logits, 1))).sum(1).mean(),
        "alpha and beta are swapped": beta * ce + alpha * temperature**2 * forward_kl.mean(),
    }


@never_raises(EXIT_LOSS)
def check_exit_loss(candidate: ExitLossFunction, seed: int = 0) -> CheckResult:
    """Compare ``candidate(exit_logits, labels, teacher_logits, temperature, alpha, beta)`` with the reference.

    The reference is ``alpha * CE(y, z_k) + beta * T^2 * KL(softmax(z_T / T) || softmax(z_k / T))`` with the
    KL summed over classes and averaged over the batch. Several random batches and settings are tried; the
    loss must also pass a gradient to the exit's logits.
    """
    generator = torch.Generator().manual_seed(seed)
    settings = [(3.0, 1.0, 1.0), (4.0, 0.3, 0.7), (1.0, 1.0, 2.0), (2.5, 0.0, 1.0)]
    for temperature, alpha, beta in settings:
        batch, classes = 6, 5
        logits = torch.randn(batch, classes, generator=generator) * 2
        teacher = torch.randn(batch, classes, generator=generator) * 3
        labels = torch.randint(0, classes, (batch,), generator=generator)
        logits_input = logits.clone().requires_grad_(True)
        value, failed = EXIT_LOSS.call(
            candidate, logits_input, labels.clone(), teacher.clone(), temperature, alpha, beta
        )
        if failed is not None:
            return failed
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else ""
            return EXIT_LOSS.incorrect(
                f"Return one scalar tensor (the loss of this exit), got {type(value).__name__}{shape}."
            )
        ce, kd = exit_loss(logits, labels, teacher, temperature, alpha, beta)
        expected = (ce + kd).double()
        got = value.detach().double().reshape(())
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            feedback = (
                f"With T={temperature}, alpha={alpha}, beta={beta} you return {got.item():.5f}, the reference "
                f"gives {expected.item():.5f}."
            )
            for slip, wrong in _common_mistakes(logits, labels, teacher, temperature, alpha, beta).items():
                if torch.allclose(got, wrong.double(), rtol=1e-4, atol=1e-5):
                    feedback += f" Hint: {slip}."
                    break
            return EXIT_LOSS.incorrect(feedback)
        no_gradient = EXIT_LOSS.incorrect(
            "The value is right but no gradient reaches the exit's logits: avoid .item(), .detach(), numpy or "
            "torch.no_grad() inside the loss, or the exit would not learn from it."
        )
        if not value.requires_grad:
            return no_gradient
        try:
            torch.autograd.grad(value.reshape(()), logits_input)
        except RuntimeError:  # the value does not depend on the exit's logits
            return no_gradient
    return EXIT_LOSS.correct(
        "Your per-exit loss matches alpha * CE + beta * T^2 * KL(teacher || exit) in every case."
    )


@never_raises(THRESHOLD_FOR_BUDGET)
def check_threshold_for_budget(
    threshold: float,
    exit_logits: Sequence[Tensor],
    labels: Tensor,
    exit_macs: Sequence[float],
    budget_macs: float,
    tolerance: float = 1.0,
    test_logits: Sequence[Tensor] | None = None,
    test_labels: Tensor | None = None,
    reported_accuracy: object = None,
    reported_macs: object = None,
) -> CheckResult:
    """Does early exit at ``threshold`` stay within ``budget_macs`` per image, at near the best accuracy,
    on the validation split (``exit_logits``, ``labels``)? And, given the test split, do the reported test
    accuracy (percent) and mean MACs per image match what the threshold gives there?

    Right when the mean MACs per image are at most the budget, the accuracy is within ``tolerance``
    percentage points of the best any threshold on a fine grid reaches within the same budget, and the
    report matches the test split's measurement. The feedback never names the best threshold.
    """
    if threshold is None or threshold is ...:
        return THRESHOLD_FOR_BUDGET.not_done("Set your threshold: a number between 0 and 1.01.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        try:
            threshold = float(threshold)  # a numpy or torch number
        except (TypeError, ValueError):
            return THRESHOLD_FOR_BUDGET.incorrect(
                f"Could not use threshold {threshold!r}: give a number between 0 and 1.01."
            )
    if math.isnan(threshold):
        return THRESHOLD_FOR_BUDGET.incorrect("The threshold is NaN: give a number between 0 and 1.01.")
    try:
        result = early_exit(exit_logits, threshold, exit_macs)
    except ValueError as error:
        return THRESHOLD_FOR_BUDGET.incorrect(str(error))
    mean, accuracy = result.mean_macs, result.accuracy(labels)
    grid = [k / 200 for k in range(201)] + [1.01]
    sweep = threshold_sweep(exit_logits, labels, exit_macs, grid)
    affordable = sweep[sweep["mean_macs"] <= budget_macs]
    measured = (
        f"Threshold {threshold:g}: accuracy {accuracy:.2f} %, {mean / 1e6:.3g} M MACs per image on average."
    )
    if affordable.empty:
        return THRESHOLD_FOR_BUDGET.incorrect(
            f"{measured} No threshold meets a budget of {budget_macs / 1e6:.3g} M MACs: even exit 1 alone "
            "costs more."
        )
    best = affordable.loc[affordable["accuracy"].idxmax()]
    if mean > budget_macs:
        return THRESHOLD_FOR_BUDGET.incorrect(
            f"{measured} Over budget ({budget_macs / 1e6:.3g} M MACs). A lower threshold lets more images "
            "leave early; read the accuracy-versus-MACs table to find where the cost drops below the budget."
        )
    if accuracy < best["accuracy"] - tolerance:
        return THRESHOLD_FOR_BUDGET.incorrect(
            f"{measured} Within budget, but another threshold that fits the same budget is more than "
            f"{tolerance:g} point(s) more accurate on validation: sweep a finer grid of thresholds and take the "
            "most accurate one whose mean MACs fit."
        )
    if test_logits is not None and test_labels is not None:
        on_test = early_exit(test_logits, threshold, exit_macs)
        if reported_accuracy is None or reported_macs is None:
            return THRESHOLD_FOR_BUDGET.not_done(f"{measured} Now measure it once on the test split and report "
                                                 "MY_TEST_ACCURACY (%) and MY_TEST_MACS (per image).")  # fmt: skip
        try:
            got_accuracy, got_macs = float(reported_accuracy), float(reported_macs)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return THRESHOLD_FOR_BUDGET.incorrect("MY_TEST_ACCURACY and MY_TEST_MACS must be numbers.")
        if abs(got_accuracy - on_test.accuracy(test_labels)) > 0.05 or abs(
            got_macs - on_test.mean_macs
        ) > max(1.0, 1e-3 * on_test.mean_macs):
            return THRESHOLD_FOR_BUDGET.incorrect(
                "Your reported test accuracy or mean MACs are not what your threshold gives on the test split: "
                "measure them with mskd.early_exit on the test logits (accuracy in percent, MACs per image)."
            )
    return THRESHOLD_FOR_BUDGET.correct(
        f"{measured} Within the {budget_macs / 1e6:.3g} M MACs budget at near the best accuracy possible."
    )
