"""Exercises of lesson 3 (cross-layer FSP): compute an FSP matrix; predict the pairs of "cross two layers"."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kdbook_utils.methods.crosslayer import cross_layer_pairs, fsp_matrix

__all__ = ["RESNET_CHECKPOINTS", "check_cross_two_layers", "check_fsp_matrix"]

FSPFunction = Callable[[Tensor, Tensor], Tensor]

#: The checkpoints of a CIFAR ResNet, in forward order, as the exercise names them.
RESNET_CHECKPOINTS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3")


def _report(correct: bool, message: str) -> bool:
    print(("Correct. " if correct else "Not yet. ") + message)
    return correct


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


def check_fsp_matrix(candidate: FSPFunction) -> bool:
    """Test a student's ``fsp(a, b)`` for two maps of equal spatial size: ``(B, C_a, C_b)``.

    ``G[n, i, j] = 1/(H*W) * sum_{s,t} a[n, i, s, t] * b[n, j, s, t]``. Prints ``Correct.`` or what is
    wrong with a hint; returns whether it is correct; never raises.
    """
    generator = torch.Generator().manual_seed(0)
    for batch, c_a, c_b, size in [(2, 3, 5, 4), (1, 4, 4, 2), (3, 2, 6, 5)]:
        a = torch.randn(batch, c_a, size, size, generator=generator)
        b = torch.randn(batch, c_b, size, size, generator=generator)
        try:
            got = candidate(a.clone(), b.clone())
        except NotImplementedError:
            return _report(False, "The function is not written yet (it raises NotImplementedError).")
        except Exception as error:  # noqa: BLE001 (the student's code: report whatever it raises)
            return _report(False, f"Calling it raised {type(error).__name__}: {error}")
        if got is None:
            return _report(False, "Your function returns None: finish it and `return` the matrix.")
        if not isinstance(got, Tensor):
            return _report(False, f"Return a torch tensor, not a {type(got).__name__}.")
        reference = fsp_matrix(a, b)
        if got.shape != reference.shape:
            for hint, mistake in _fsp_mistakes(a, b):
                if mistake().shape == got.shape and torch.allclose(got, mistake(), atol=1e-5):
                    return _report(False, hint)
            return _report(False, f"For a of shape {tuple(a.shape)} and b of shape {tuple(b.shape)} the FSP matrix "
                                  f"has shape {tuple(reference.shape)} = (B, C_a, C_b); yours is {tuple(got.shape)}.")
        if not torch.allclose(got, reference, atol=1e-5):
            for hint, mistake in _fsp_mistakes(a, b):
                if mistake().shape == got.shape and torch.allclose(got, mistake(), atol=1e-5):
                    return _report(False, hint)
            return _report(False, "The shape is right but the values are not: G[n, i, j] is the mean over "
                                  "positions (s, t) of a[n, i, s, t] * b[n, j, s, t].")
    return _report(True, "Your FSP matrix matches fsp_matrix on every test case.")


def check_cross_two_layers(pairs: Sequence[tuple[str, str]], points: Sequence[str] = RESNET_CHECKPOINTS) -> bool:
    """Check a prediction of the pairs that "cross two layers" gives (our REC, cumulative reading).

    ``pairs`` is a list of ``(earlier, later)`` checkpoint names from ``points``. Prints ``Correct.`` or
    what is missing or extra; returns whether it is correct; never raises.
    """
    try:
        given = {tuple(pair) for pair in pairs}
    except TypeError:
        return _report(False, "Give a list of (earlier, later) pairs, e.g. [('stem', 'stage1'), ...].")
    if any(len(pair) != 2 for pair in given):
        return _report(False, "Every pair has exactly two checkpoint names: (earlier, later).")
    unknown = sorted({name for pair in given for name in pair} - set(points))
    if unknown:
        return _report(False, f"Unknown checkpoint name(s) {unknown}; the checkpoints are {list(points)}.")
    reversed_pairs = [pair for pair in given if list(points).index(pair[0]) > list(points).index(pair[1])]
    if reversed_pairs:
        return _report(False, f"Write each pair in forward order (earlier, later): {sorted(reversed_pairs)}.")
    expected = set(cross_layer_pairs(points, 2, "cumulative"))
    if given == expected:
        return _report(True, f"Cross two layers pairs every checkpoint with the next one and with the one after: "
                             f"{len(expected)} pairs (FSP's {len(points) - 1} plus {len(points) - 2} that skip a stage).")
    if given == set(cross_layer_pairs(points, 2, "exact")):
        return _report(False, "That is the 'exact' reading (only pairs exactly two apart). Our REC reading is "
                              "cumulative: cross two layers keeps FSP's adjacent pairs too (spec C1).")
    missing, extra = sorted(expected - given), sorted(given - expected)
    return _report(False, f"Missing {missing}; not part of it {extra}. Cumulative cross-2 takes every pair at "
                          "most two checkpoints apart.")
