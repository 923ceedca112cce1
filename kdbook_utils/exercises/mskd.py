"""Checks for lesson 4's exercises (multi-exit students, MSKD).

1. :func:`check_exit_loss`: write one exit's loss ``alpha * CE + beta * T^2 * KL(teacher || exit)``.
2. :func:`check_threshold_for_budget`: pick an early-exit confidence threshold that meets a FLOPs budget.

Each check prints what it found and returns True when the answer is right; a wrong answer gets a hint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from kdbook_utils.methods.mskd import early_exit, exit_loss, threshold_sweep

ExitLossFunction = Callable[[Tensor, Tensor, Tensor, float, float, float], Tensor]


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


def check_exit_loss(candidate: ExitLossFunction, seed: int = 0) -> bool:
    """Compare ``candidate(exit_logits, labels, teacher_logits, temperature, alpha, beta)`` with the reference.

    The reference is ``alpha * CE(y, z_k) + beta * T^2 * KL(softmax(z_T / T) || softmax(z_k / T))`` with the
    KL summed over classes and averaged over the batch. Several random batches and settings are tried.
    """
    generator = torch.Generator().manual_seed(seed)
    settings = [(3.0, 1.0, 1.0), (4.0, 0.3, 0.7), (1.0, 1.0, 2.0), (2.5, 0.0, 1.0)]
    for temperature, alpha, beta in settings:
        batch, classes = 6, 5
        logits = torch.randn(batch, classes, generator=generator) * 2
        teacher = torch.randn(batch, classes, generator=generator) * 3
        labels = torch.randint(0, classes, (batch,), generator=generator)
        try:
            value = candidate(logits.clone(), labels.clone(), teacher.clone(), temperature, alpha, beta)
        except Exception as error:  # noqa: BLE001 (report any failure of the student's code plainly)
            print(f"Your function raised {type(error).__name__}: {error}")
            return False
        if not isinstance(value, Tensor) or value.numel() != 1:
            print(f"Return one scalar tensor (the loss of this exit), got {type(value).__name__} {value!r}.")
            return False
        ce, kd = exit_loss(logits, labels, teacher, temperature, alpha, beta)
        expected = ce + kd
        if not torch.allclose(value.detach().float().reshape(()), expected, rtol=1e-4, atol=1e-5):
            print(
                f"Not yet: with T={temperature}, alpha={alpha}, beta={beta} you return {value.item():.5f}, "
                f"the reference gives {expected.item():.5f}."
            )
            for slip, wrong in _common_mistakes(logits, labels, teacher, temperature, alpha, beta).items():
                if torch.allclose(value.detach().float().reshape(()), wrong, rtol=1e-4, atol=1e-5):
                    print(f"Hint: {slip}.")
                    break
            return False
    print("Correct: your per-exit loss matches alpha * CE + beta * T^2 * KL(teacher || exit) in every case.")
    return True


def check_threshold_for_budget(
    threshold: float,
    exit_logits: Sequence[Tensor],
    labels: Tensor,
    exit_flops: Sequence[float],
    budget_flops: float,
    tolerance: float = 0.01,
) -> bool:
    """Does early exit at ``threshold`` stay within ``budget_flops`` per image, at near the best accuracy?

    Right when the mean FLOPs per image are at most the budget and the accuracy is within ``tolerance``
    (a fraction) of the best any threshold on a fine grid reaches within the same budget.
    """
    try:
        result = early_exit(exit_logits, float(threshold), exit_flops)
    except (TypeError, ValueError) as error:
        print(f"Could not use threshold {threshold!r}: {error}. Give a number between 0 and 1.01.")
        return False
    mean, accuracy = result.mean_flops, result.accuracy(labels)
    grid = [k / 200 for k in range(201)] + [1.01]
    sweep = threshold_sweep(exit_logits, labels, exit_flops, grid)
    affordable = sweep[sweep["mean_flops"] <= budget_flops]
    print(f"threshold {threshold}: accuracy {accuracy:.2%}, {mean / 1e6:.2f} M FLOPs per image on average.")
    if affordable.empty:
        print(
            f"No threshold meets a budget of {budget_flops / 1e6:.2f} M FLOPs: even exit 1 alone costs more."
        )
        return False
    best = affordable.loc[affordable["accuracy"].idxmax()]
    if mean > budget_flops:
        print(
            f"Over budget ({budget_flops / 1e6:.2f} M FLOPs). A lower threshold lets more images leave early; "
            "read the accuracy-versus-FLOPs table to find where the cost drops below the budget."
        )
        return False
    if accuracy < best["accuracy"] - tolerance:
        print(
            f"Within budget, but a threshold of about {best['threshold']:.3f} reaches {best['accuracy']:.2%} "
            "for the same budget: try a higher threshold that still fits."
        )
        return False
    print(f"Correct: within the {budget_flops / 1e6:.2f} M FLOPs budget at near the best accuracy possible.")
    return True
