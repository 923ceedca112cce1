"""Exercises of lesson 3 (cross-layer FSP): compute an FSP matrix; predict the pairs of "cross two layers".

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with what
is wrong and a hint, or "Not done yet.") and never raises: a notebook whose exercises are not done yet
still runs top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kdbook_utils.exercises.result import CheckResult, Exercise, never_raises
from kdbook_utils.methods.crosslayer import cross_layer_pairs, fsp_matrix

__all__ = [
    "CROSS_TWO_LAYERS",
    "FSP_MATRIX",
    "RESNET_CHECKPOINTS",
    "check_cross_two_layers",
    "check_fsp_matrix",
]

FSPFunction = Callable[[Tensor, Tensor], Tensor]

#: The checkpoints of a CIFAR ResNet, in forward order, as the exercise names them.
RESNET_CHECKPOINTS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3")

FSP_MATRIX = Exercise("crosslayer-fsp-matrix", "Lesson 3, exercise 1: an FSP matrix")
CROSS_TWO_LAYERS = Exercise(
    "crosslayer-cross-two-layers", 'Lesson 3, exercise 2: the pairs of "cross two layers"'
)


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


@never_raises(CROSS_TWO_LAYERS)
def check_cross_two_layers(
    pairs: Sequence[tuple[str, str]] | None, points: Sequence[str] = RESNET_CHECKPOINTS
) -> CheckResult:
    """Check a prediction of the pairs that "cross two layers" gives, in the lesson's cumulative reading.

    ``pairs`` is a list of ``(earlier, later)`` checkpoint names from ``points``; their order in the list
    does not matter.
    """
    if pairs is None or pairs is ...:
        return CROSS_TWO_LAYERS.not_done(
            "List the pairs as (earlier, later) tuples, e.g. [('stem', 'stage1'), ...]."
        )
    if isinstance(pairs, (str, bytes)):
        return CROSS_TWO_LAYERS.incorrect(
            "Give a list of (earlier, later) pairs, e.g. [('stem', 'stage1'), ...]."
        )
    try:
        given = {tuple(pair) for pair in pairs}
    except TypeError:
        return CROSS_TWO_LAYERS.incorrect(
            "Give a list of (earlier, later) pairs, e.g. [('stem', 'stage1'), ...]."
        )
    if not given:
        return CROSS_TWO_LAYERS.not_done("Your list is empty: add the (earlier, later) pairs.")
    if any(len(pair) != 2 or isinstance(pair, str) for pair in given):
        return CROSS_TWO_LAYERS.incorrect("Every pair has exactly two checkpoint names: (earlier, later).")
    points = list(points)
    unknown = sorted({str(name) for pair in given for name in pair if name not in points})
    if unknown:
        return CROSS_TWO_LAYERS.incorrect(
            f"Unknown checkpoint name(s) {unknown}; the checkpoints are {points}."
        )
    reversed_pairs = [pair for pair in given if points.index(pair[0]) > points.index(pair[1])]
    if reversed_pairs:
        return CROSS_TWO_LAYERS.incorrect(
            f"Write each pair in forward order (earlier, later): {sorted(reversed_pairs)}."
        )
    expected = set(cross_layer_pairs(points, 2, "cumulative"))
    if given == expected:
        return CROSS_TWO_LAYERS.correct(
            f"Cross two layers pairs every checkpoint with the next one and with the one after: {len(expected)} "
            f"pairs (FSP's {len(points) - 1} plus {len(points) - 2} that skip a stage)."
        )
    if given == set(cross_layer_pairs(points, 2, "exact")):
        return CROSS_TWO_LAYERS.incorrect(
            "That is the 'exact' reading (only pairs exactly two apart). This lesson reads cross two layers "
            "cumulatively: it keeps FSP's adjacent pairs too."
        )
    missing, extra = sorted(expected - given), sorted(given - expected)
    return CROSS_TWO_LAYERS.incorrect(
        f"Missing {missing}; not part of it {extra}. Cumulative cross-2 takes every pair at most two "
        "checkpoints apart."
    )
