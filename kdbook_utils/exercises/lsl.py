"""Checks for the exercises of lesson 2, Layer Selectivity Learning (``notebooks/02_lsl_layer_selection``).

1. :func:`check_inter_class_gram`: compute the inter-class Gram matrix of Eq. 6.
2. :func:`check_own_bindings`: an experiment: bindings of the learner's choosing against LSP's own, over
   the seeds, with the verdict and an explanation that quotes the run.

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with
what is wrong and a hint, or "Not done yet.") and never raises: a notebook whose exercises are not done
yet still runs top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from kdbook_utils.exercises.result import CheckResult, Exercise, experiment_report, never_raises, uses
from kdbook_utils.methods.lsl import inter_class_gram

__all__ = [
    "BINDINGS",
    "INTER_CLASS_GRAM",
    "LSP_LABEL",
    "OWN_LABEL",
    "check_inter_class_gram",
    "check_own_bindings",
]

InterClassGram = Callable[[Tensor, Tensor, int], Tensor]

INTER_CLASS_GRAM = Exercise("lsl-inter-class-gram", "Lesson 2, exercise 1: the inter-class Gram matrix")
BINDINGS = Exercise("lsl-bindings", "Lesson 2, exercise 2: your bindings against LSP's, an experiment")


def _hand_case() -> tuple[Tensor, Tensor, int]:
    """2 classes, 3 channels of 1x1: class means (1, 1, 0) and (0, 1, 1), whose cosine is 1/2."""
    features = torch.tensor([[1.0, 0, 0], [1, 2, 0], [0, 1, 1], [0, 1, 1]]).reshape(4, 3, 1, 1)
    return features, torch.tensor([0, 0, 1, 1]), 2


def _random_case(seed: int) -> tuple[Tensor, Tensor, int]:
    """ReLU conv features of 30 images in 3 classes of very different sizes and scales."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 4 + [1] * 20 + [2] * 6)
    features = torch.relu(torch.randn(30, 5, 3, 3, generator=generator))
    features = features * (1 + 4 * labels.float()).reshape(-1, 1, 1, 1)  # class 2 has 9x larger values
    return features, labels, 3


def _class_means(flat: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    return torch.stack([flat[labels == c].mean(dim=0) for c in range(num_classes)])


@never_raises(INTER_CLASS_GRAM)
def check_inter_class_gram(candidate: InterClassGram) -> CheckResult:
    """Check ``candidate(features, labels, num_classes) -> (num_classes, num_classes)`` against Eq. 6:
    the cosine similarity of the class-mean features (flattened per image)."""
    if uses(candidate, ("inter_class_gram", "layer_grams")):
        return INTER_CLASS_GRAM.incorrect("Write it yourself from torch operations: your function calls the "
                                          "package's own, which the check compares it with.")  # fmt: skip
    cases = [_hand_case(), _random_case(0), _random_case(1)]
    for index, (features, labels, num_classes) in enumerate(cases):
        answer, failed = INTER_CLASS_GRAM.call(candidate, features.clone(), labels.clone(), num_classes)
        if failed is not None:
            return failed
        expected = inter_class_gram(features, labels, num_classes).double()
        if not isinstance(answer, Tensor):
            return INTER_CLASS_GRAM.incorrect(f"Return a torch.Tensor, got {type(answer).__name__}.")
        if tuple(answer.shape) != (num_classes, num_classes):
            return INTER_CLASS_GRAM.incorrect(
                f"Case {index + 1}: the matrix should be (num_classes, num_classes) = {(num_classes,) * 2}, "
                f"got {tuple(answer.shape)}. One row and one column per class, not per image or channel."
            )
        answer = answer.detach().double()
        if torch.allclose(answer, expected, atol=1e-5):
            continue
        if not torch.allclose(answer, answer.T, atol=1e-5):
            return INTER_CLASS_GRAM.incorrect(
                f"Case {index + 1}: H must be symmetric (H[c, c'] = H[c', c]); yours is not."
            )
        flat = features.reshape(len(features), -1).double()
        averaged_cosines = _class_means(torch.nn.functional.normalize(flat, dim=1), labels, num_classes)
        if torch.allclose(answer, averaged_cosines @ averaged_cosines.T, atol=1e-5):
            return INTER_CLASS_GRAM.incorrect(
                f"Case {index + 1}: you normalised each image before averaging. Eq. 6 compares the class "
                "*means* f_c: average the raw features of each class first, then take cosines."
            )
        if not torch.allclose(answer.diagonal(), torch.ones(num_classes, dtype=torch.double), atol=1e-5):
            return INTER_CLASS_GRAM.incorrect(
                f"Case {index + 1}: the diagonal should be all 1 (a class is perfectly similar to itself), got "
                f"{answer.diagonal().numpy().round(3)}. Normalise the class means to unit length (cosine), "
                "rather than taking raw dot products."
            )
        return INTER_CLASS_GRAM.incorrect(
            f"Case {index + 1}: values differ from the cosine of class-mean features.\nExpected:\n"
            f"{expected.numpy().round(4)}\nGot:\n{answer.numpy().round(4)}"
        )
    return INTER_CLASS_GRAM.correct("Symmetric, unit diagonal, and equal to the cosine of the class means.")


def _pairs(
    bindings: object, teacher_table: pd.DataFrame, student_table: pd.DataFrame
) -> list[tuple[str, str]] | str:
    """The bindings as ``[(teacher layer, student layer), ...]``, or what is wrong with them."""
    if not isinstance(bindings, (list, tuple)) or not bindings:
        return "MY_BINDINGS must be a non-empty list of (teacher layer, student layer) pairs."
    pairs = []
    for pair in bindings:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return f"{pair!r} is not a (teacher layer, student layer) pair."
        teacher_layer, student_layer = (str(name) for name in pair)
        if teacher_layer not in teacher_table.index:
            return f"{teacher_layer!r} is not a scored teacher layer; the teacher's are {list(teacher_table.index)}."
        if student_layer not in student_table.index:
            return f"{student_layer!r} is not a scored student layer; the student's are {list(student_table.index)}."
        pairs.append((teacher_layer, student_layer))
    if len(set(pairs)) != len(pairs):
        return "A pair appears twice in MY_BINDINGS: bind each pair once."
    return pairs


@never_raises(BINDINGS)
def check_own_bindings(
    bindings: object,
    lsp_bindings: Sequence[tuple[str, str]],
    runs: object,
    prediction: object,
    verdict: object,
    explanation: object,
    teacher_table: pd.DataFrame,
    student_table: pd.DataFrame,
) -> CheckResult:
    """Check the experiment of exercise 2: bindings of the learner's own choosing (valid layers of the two
    LSP tables, not LSP's own), trained over the seeds beside LSP's (labels ``"LSP's bindings"`` and ``"my
    bindings"``), the verdict the paired comparison of those runs gives, and an explanation that quotes
    the run's mean difference."""
    if bindings is None or runs is None:
        return BINDINGS.not_done("Choose MY_BINDINGS, write your prediction, run the two jobs into own_runs, "
                                 "then fill in your verdict and explanation.")  # fmt: skip
    pairs = _pairs(bindings, teacher_table, student_table)
    if isinstance(pairs, str):
        return BINDINGS.incorrect(pairs)
    if sorted(pairs) == sorted((str(t), str(s)) for t, s in lsp_bindings):
        return BINDINGS.incorrect("Those are LSP's own bindings: the experiment compares them with a choice of "
                                  "yours, so choose at least one pair LSP did not.")  # fmt: skip
    if not str(prediction or "").strip():
        return BINDINGS.not_done("Write your prediction in MY_PREDICTION before you run the experiment.")
    return experiment_report(BINDINGS, runs, LSP_LABEL, OWN_LABEL, verdict, explanation)


LSP_LABEL = "LSP's bindings"
OWN_LABEL = "my bindings"
