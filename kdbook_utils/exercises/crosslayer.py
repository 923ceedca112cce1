"""Exercises of lesson 3 (cross-layer FSP): compute an FSP matrix; an experiment: an ablation row of your
own, with its verdict against the student alone.

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with what
is wrong and a hint, or "Not done yet.") and never raises: a notebook whose exercises are not done yet
still runs top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kdbook_utils.exercises.result import CheckResult, Exercise, experiment_report, never_raises, uses
from kdbook_utils.methods.crosslayer import fsp_matrix

__all__ = ["ABLATION_ROW", "FSP_MATRIX", "check_ablation_row", "check_fsp_matrix"]

FSPFunction = Callable[[Tensor, Tensor], Tensor]

FSP_MATRIX = Exercise("crosslayer-fsp-matrix", "Lesson 3, exercise 1: an FSP matrix")
ABLATION_ROW = Exercise("crosslayer-ablation-row", "Lesson 3, exercise 2: an ablation row of your own")


def _fsp_mistakes(a: Tensor, b: Tensor) -> list[tuple[str, Callable[[], Tensor]]]:
    """Wrong FSP matrices students often compute, each with the hint that fixes it."""
    hw = a.shape[2] * a.shape[3]
    products = torch.einsum("nihw,njhw->nij", a, b)
    return [
        ("You forgot to divide by the number of spatial positions H*W (FSP averages over positions).",
         lambda: products),
        ("You divided by the number of channels instead of by H*W.", lambda: products / a.shape[1]),
        ("You divided by H*W*C: only the spatial positions are averaged, each channel pair keeps its own entry.",
         lambda: products / (hw * a.shape[1])),
        (("Rows and columns are swapped: G[n, i, j] pairs channel i of the *first* map with channel j of the "
          "second, so the shape is (B, C_a, C_b)."), lambda: products.transpose(1, 2) / hw),
    ]  # fmt: skip


@never_raises(FSP_MATRIX)
def check_fsp_matrix(candidate: FSPFunction) -> CheckResult:
    """Test a student's ``fsp(a, b)`` for two maps of equal spatial size: ``(B, C_a, C_b)``.

    ``G[n, i, j] = 1/(H*W) * sum_{s,t} a[n, i, s, t] * b[n, j, s, t]``; a wrong matrix that matches one of
    the common mistakes gets that mistake's hint.
    """
    if uses(candidate, ("fsp_matrix", "fsp_matrices")):
        return FSP_MATRIX.incorrect("Write it yourself from torch operations: your function calls the package's "
                                    "own FSP matrix, which the check compares it with.")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for batch, c_a, c_b, size in [(2, 3, 5, 4), (1, 4, 4, 2), (3, 2, 6, 5)]:
        a = torch.randn(batch, c_a, size, size, generator=generator)
        b = torch.randn(batch, c_b, size, size, generator=generator)
        got, failed = FSP_MATRIX.call(candidate, a.clone(), b.clone())
        if failed is not None:
            return failed
        if not isinstance(got, Tensor):
            return FSP_MATRIX.incorrect(f"Return a torch tensor, not a {type(got).__name__}.")
        got = got.detach().double()
        reference = fsp_matrix(a, b).double()
        if got.shape == reference.shape and torch.allclose(got, reference, atol=1e-5):
            continue
        for hint, mistake in _fsp_mistakes(a, b):
            wrong = mistake().double()
            if wrong.shape == got.shape and torch.allclose(got, wrong, atol=1e-5):
                return FSP_MATRIX.incorrect(hint)
        if got.shape != reference.shape:
            return FSP_MATRIX.incorrect(
                f"For a of shape {tuple(a.shape)} and b of shape {tuple(b.shape)} the FSP matrix has shape "
                f"{tuple(reference.shape)} = (B, C_a, C_b); yours is {tuple(got.shape)}."
            )
        return FSP_MATRIX.incorrect(
            "The shape is right but the values are not: G[n, i, j] is the mean over positions (s, t) of "
            "a[n, i, s, t] * b[n, j, s, t]."
        )
    return FSP_MATRIX.correct("Your FSP matrix matches fsp_matrix on every test case.")


@never_raises(ABLATION_ROW)
def check_ablation_row(
    row: object,
    grid_labels: Sequence[str],
    runs: object,
    prediction: object,
    verdict: object,
    explanation: object,
    alone_label: str,
) -> CheckResult:
    """Check the experiment of exercise 2: an ablation row of the learner's own (an ``Ablation`` the
    lesson's grid does not have), trained over the seeds beside the student alone, with the verdict their
    paired comparison gives and an explanation that quotes the run's mean difference."""
    if row is None or runs is None:
        return ABLATION_ROW.not_done("Define MY_ROW, write your prediction, run it with lesson.grid into "
                                     "row_runs, then fill in your verdict and explanation.")  # fmt: skip
    label = getattr(row, "label", None)
    if not isinstance(label, str) or not hasattr(row, "num_teachers"):
        return ABLATION_ROW.incorrect(
            f"MY_ROW must be an Ablation, e.g. P1_P2.replace(k=2); got {type(row).__name__}."
        )
    if getattr(row, "num_teachers", 0) == 0:
        return ABLATION_ROW.incorrect(
            "MY_ROW has no teacher: that is the student alone, the baseline itself."
        )
    if label in set(grid_labels):
        return ABLATION_ROW.incorrect(f"{label!r} is already a row of the lesson's ablation: change one of its "
                                      "fields (k, mode, use_kl, kl_mode, num_teachers, ensemble, gram).")  # fmt: skip
    if not str(prediction or "").strip():
        return ABLATION_ROW.not_done("Write your prediction in MY_PREDICTION before you run the experiment.")
    return experiment_report(ABLATION_ROW, runs, alone_label, label, verdict, explanation)
