"""Checks for the exercises of lesson 2, Layer Selectivity Learning (``notebooks/02_lsl_layer_selection``).

Each ``check_*`` function runs the student's answer on test cases, prints what is right, and raises an
``AssertionError`` with a hint when something is wrong. An answer that still raises ``NotImplementedError``
is reported as not attempted (so the notebook runs top to bottom before the exercises are done).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from kdbook_utils.methods import lsl

InterClassGram = Callable[[Tensor, Tensor, int], Tensor]


def _not_attempted(exercise: str, what_to_fill: str) -> bool:
    print(f"{exercise}: not attempted yet. {what_to_fill}, then run the check again.")
    return False


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


def check_inter_class_gram(candidate: InterClassGram) -> bool:
    """Check ``candidate(features, labels, num_classes) -> (num_classes, num_classes)`` against Eq. 6:
    the cosine similarity of the class-mean features (flattened per image)."""
    exercise = "Exercise 1 (inter-class Gram matrix)"
    cases = [_hand_case(), _random_case(0), _random_case(1)]
    for index, (features, labels, num_classes) in enumerate(cases):
        try:
            answer = candidate(features.clone(), labels.clone(), num_classes)
        except NotImplementedError:
            return _not_attempted(exercise, "Replace the `raise NotImplementedError` with your code")
        expected = lsl.inter_class_gram(features, labels, num_classes)
        if not isinstance(answer, Tensor):
            raise AssertionError(f"Return a torch.Tensor, got {type(answer).__name__}.")  # noqa: TRY004 (a failed check)
        if tuple(answer.shape) != (num_classes, num_classes):
            raise AssertionError(
                f"Case {index + 1}: the matrix should be (num_classes, num_classes) = {(num_classes,) * 2}, "
                f"got {tuple(answer.shape)}. One row and one column per class, not per image or channel."
            )
        answer = answer.detach().double()
        if torch.allclose(answer, expected.double(), atol=1e-5):
            continue
        if not torch.allclose(answer, answer.T, atol=1e-5):
            raise AssertionError(
                f"Case {index + 1}: H must be symmetric (H[c, c'] = H[c', c]); yours is not."
            )
        flat = features.reshape(len(features), -1).double()
        per_image = torch.nn.functional.normalize(flat, dim=1)
        averaged_cosines = lsl.class_means(per_image, labels, num_classes)
        if torch.allclose(answer, averaged_cosines @ averaged_cosines.T, atol=1e-5):
            raise AssertionError(
                f"Case {index + 1}: you normalised each image before averaging. Eq. 6 compares the class "
                "*means* f_c: average the raw features of each class first, then take cosines."
            )
        if not torch.allclose(answer.diagonal(), torch.ones(num_classes, dtype=torch.double), atol=1e-5):
            raise AssertionError(
                f"Case {index + 1}: the diagonal should be all 1 (a class is perfectly similar to itself), got "
                f"{answer.diagonal().numpy().round(3)}. Normalise the class means to unit length (cosine), "
                "rather than taking raw dot products."
            )
        raise AssertionError(
            f"Case {index + 1}: values differ from the cosine of class-mean features.\nExpected:\n"
            f"{expected.numpy().round(4)}\nGot:\n{answer.numpy().round(4)}"
        )
    print(f"{exercise}: correct. Symmetric, unit diagonal, and equal to the cosine of the class means.")
    return True


def check_bindings(
    bindings: Sequence[tuple[str, str]] | None,
    teacher_table: pd.DataFrame,
    student_table: pd.DataFrame,
    justification: str,
) -> pd.DataFrame | bool:
    """Check bindings ``[(teacher_layer, student_layer), ...]`` chosen from two LSP tables (Eq. 7).

    A good choice binds, for ``k`` pairs, the ``k`` lowest-LSP layers of the teacher to the ``k``
    lowest-LSP layers of the student, shallow to shallow (no crossing pairs), and says why in
    ``justification`` (a sentence or two). Returns a table of the chosen pairs with their scores.
    """
    exercise = "Exercise 2 (choose bindings)"
    if bindings is None:
        return _not_attempted(exercise, "Set your bindings (a list of (teacher_layer, student_layer) pairs)")
    bindings = [tuple(pair) for pair in bindings]
    if not 1 <= len(bindings) <= 3 or any(len(pair) != 2 for pair in bindings):
        raise AssertionError("Give one to three bindings, each a pair (teacher_layer, student_layer).")
    for side, table, position in (("teacher", teacher_table, 0), ("student", student_table, 1)):
        chosen = [pair[position] for pair in bindings]
        unknown = [layer for layer in chosen if layer not in table.index]
        if unknown:
            raise AssertionError(
                f"{unknown} are not scored {side} layers. The {side}'s LSP table has: {', '.join(table.index)}."
            )
        if len(set(chosen)) != len(chosen):
            raise AssertionError(f"Each {side} layer may be bound once; you repeated one in {chosen}.")
    teacher_order = {layer: i for i, layer in enumerate(teacher_table.index)}
    student_order = {layer: i for i, layer in enumerate(student_table.index)}
    ordered = sorted(bindings, key=lambda pair: teacher_order[pair[0]])
    student_positions = [student_order[s] for _, s in ordered]
    if student_positions != sorted(student_positions):
        raise AssertionError(
            f"Your pairs cross: {ordered}. Bind shallow teacher layers to shallow student layers (in forward "
            "order), as every configuration of the paper's Tables 4-8 does."
        )
    count = len(bindings)
    lowest_teacher = lsl.select_layers(teacher_table, count)
    lowest_student = lsl.select_layers(student_table, count)
    if [t for t, _ in ordered] != lowest_teacher or [s for _, s in ordered] != lowest_student:
        raise AssertionError(
            f"LSP binds the {count} lowest-scoring layers of each network (Eq. 7, l* = argmin LSP): teacher "
            f"{lowest_teacher}, student {lowest_student}. You chose teacher {[t for t, _ in ordered]}, "
            f"student {[s for _, s in ordered]}. Look at the LSP column again."
        )
    if len(str(justification).split()) < 8:
        raise AssertionError(
            "Justify the choice in a sentence or two (at least 8 words): which scores made you pick these "
            "layers, and what a low G_diversity and a low H_class mean."
        )
    summary = pd.DataFrame(
        {
            "teacher": [t for t, _ in ordered],
            "teacher LSP": [float(teacher_table.loc[t, "LSP"]) for t, _ in ordered],
            "student": [s for _, s in ordered],
            "student LSP": [float(student_table.loc[s, "LSP"]) for _, s in ordered],
        }
    )
    print(f"{exercise}: these are the LSP choices. Your reasoning: {justification.strip()}")
    return summary
