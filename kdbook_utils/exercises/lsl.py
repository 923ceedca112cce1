"""Checks for the exercises of lesson 2, Layer Selectivity Learning (``notebooks/02_lsl_layer_selection``).

1. :func:`check_inter_class_gram`: compute the inter-class Gram matrix of Eq. 6.
2. :func:`check_bindings`: choose bindings from the two LSP tables (Eq. 7) and justify them.

Each check returns a :class:`~kdbook_utils.exercises.result.CheckResult` ("Correct.", "Not yet." with
what is wrong and a hint, or "Not done yet.") and never raises: a notebook whose exercises are not done
yet still runs top to bottom.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from kdbook_utils.exercises.result import CheckResult, Exercise, never_raises
from kdbook_utils.methods.lsl import inter_class_gram

__all__ = ["BINDINGS", "INTER_CLASS_GRAM", "check_bindings", "check_inter_class_gram"]

InterClassGram = Callable[[Tensor, Tensor, int], Tensor]

INTER_CLASS_GRAM = Exercise("lsl-inter-class-gram", "Lesson 2, exercise 1: the inter-class Gram matrix")
BINDINGS = Exercise("lsl-bindings", "Lesson 2, exercise 2: choose bindings from the LSP tables")

#: Numbers quoted in a justification with at least this many decimals are taken as quoted scores.
QUOTED_SCORE_DECIMALS = 2


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


def _lowest_layers(table: pd.DataFrame, count: int) -> list[str]:
    """The ``count`` layers with the lowest LSP score (``l* = argmin LSP``, Eq. 7), in forward order."""
    chosen = set(table["LSP"].nsmallest(count).index)
    return [layer for layer in table.index if layer in chosen]


def _canonical_names(names: Sequence[object], table: pd.DataFrame) -> list[object]:
    """Map each name to the table's spelling when only the case differs (``"Conv5"`` -> ``"conv5"``)."""
    by_lower = {str(layer).lower(): layer for layer in table.index}
    return [name if name in table.index else by_lower.get(str(name).lower(), name) for name in names]


def _quoted_scores(text: str) -> list[str]:
    """Decimal numbers with at least two decimals that are not percentages: the scores a text quotes."""
    pattern = rf"(?<![\w.])\d*\.\d{{{QUOTED_SCORE_DECIMALS},}}(?![\d.]|\s*%)"
    return re.findall(pattern, text)


def _matches_a_score(quoted: str, scores: list[float]) -> bool:
    """Whether ``quoted`` is one of ``scores`` rounded (or cut) to the quoted number of decimals."""
    decimals = len(quoted.split(".")[1])
    value, unit = float(quoted), 10.0**-decimals
    return any(abs(score - value) <= unit / 2 + 1e-12 or 0 <= score - value < unit for score in scores)


def _check_justification(
    justification: object,
    bound: list[str],
    teacher_table: pd.DataFrame,
    student_table: pd.DataFrame,
) -> tuple[bool, str]:
    """What the code can verify in a justification: the layers it names and the scores it quotes.

    Returns ``(consistent, feedback)``; the reasoning itself is left to the instructor's rubric.
    """
    text = "" if justification is None or justification is ... else str(justification).strip()
    rubric = "Your instructor grades the reasoning with the course rubric."
    if not text:
        return True, (
            "Now write your justification (a sentence or two on the scores that made you pick these layers) "
            f"in the justification string. {rubric}"
        )
    layers = [str(layer) for table in (teacher_table, student_table) for layer in table.index]
    prefixes = sorted({re.sub(r"\d+$", "", layer) for layer in layers} - {""}, key=len, reverse=True)
    named: list[str] = []
    if prefixes:
        pattern = rf"\b(?:{'|'.join(map(re.escape, prefixes))})\d+\b"
        named = list(dict.fromkeys(match.lower() for match in re.findall(pattern, text, flags=re.IGNORECASE)))
    known = {layer.lower() for layer in layers}
    unknown = [name for name in named if name not in known]
    if unknown:
        return False, (
            f"Your justification names {', '.join(unknown)}, which no LSP table scores (teacher: "
            f"{', '.join(map(str, teacher_table.index))}; student: {', '.join(map(str, student_table.index))})."
        )
    if named and not {layer.lower() for layer in bound} & set(named):
        return False, (
            f"Your justification talks about {', '.join(named)} only, but you bound {_describe(bound)}: "
            "explain the layers you chose."
        )
    scores = [
        float(value)
        for table in (teacher_table, student_table)
        for value in table.select_dtypes("number").to_numpy().ravel()
    ]
    quoted = _quoted_scores(text)
    wrong = [number for number in quoted if not _matches_a_score(number, scores)]
    if wrong:
        return False, (
            f"Your justification quotes {', '.join(wrong)}, which is no score in the LSP tables. Copy the "
            f"numbers from the tables (the LSP of {_describe(bound, teacher_table, student_table)})."
        )
    verified = [f"names scored layers ({', '.join(named)})"] if named else []
    verified += [f"quotes scores that are in the tables ({', '.join(quoted)})"] if quoted else []
    return True, (f"Your justification {' and '.join(verified)}. " if verified else "") + rubric


def _describe(
    bound: list[str], teacher_table: pd.DataFrame | None = None, student_table: pd.DataFrame | None = None
) -> str:
    """``"teacher conv4, fc1 and student conv2, fc1"``, with each layer's LSP when the tables are given."""
    sides = []
    for side, layers, table in (
        ("teacher", bound[0::2], teacher_table),
        ("student", bound[1::2], student_table),
    ):
        named = [
            layer if table is None else f"{layer} {float(table.loc[layer, 'LSP']):.3f}" for layer in layers
        ]
        sides.append(f"{side} {', '.join(named)}")
    return " and ".join(sides)


@never_raises(BINDINGS)
def check_bindings(
    bindings: Sequence[tuple[str, str]] | None,
    teacher_table: pd.DataFrame,
    student_table: pd.DataFrame,
    justification: str,
) -> CheckResult:
    """Check bindings ``[(teacher_layer, student_layer), ...]`` chosen from two LSP tables (Eq. 7).

    A good choice binds, for ``k`` pairs, the ``k`` lowest-LSP layers of the teacher to the ``k``
    lowest-LSP layers of the student, shallow to shallow (no crossing pairs). The ``justification`` is
    checked only for what code can verify: the layers it names exist (and include a bound one), and any
    score it quotes with two or more decimals is in the tables. Its reasoning is left to the instructor's
    rubric; an empty justification does not cost the binding points. The result's ``table`` lists the
    chosen pairs with their scores.
    """
    if bindings is None or bindings is ...:
        return BINDINGS.not_done(
            "Set your bindings: a list of (teacher_layer, student_layer) pairs, e.g. [('conv5', 'conv3'), ...]."
        )
    if isinstance(bindings, (str, bytes)):
        return BINDINGS.incorrect("Give a list of (teacher_layer, student_layer) pairs, not one string.")
    try:
        pairs = [tuple(pair) for pair in bindings]
    except TypeError:
        return BINDINGS.incorrect("Give a list of (teacher_layer, student_layer) pairs.")
    if not pairs:
        return BINDINGS.not_done("Your list of bindings is empty: add (teacher_layer, student_layer) pairs.")
    if len(pairs) > 3 or any(len(pair) != 2 or isinstance(pair, str) for pair in pairs):
        return BINDINGS.incorrect("Give one to three bindings, each a pair (teacher_layer, student_layer).")
    teacher_layers = _canonical_names([pair[0] for pair in pairs], teacher_table)
    student_layers = _canonical_names([pair[1] for pair in pairs], student_table)
    for side, table, chosen in (
        ("teacher", teacher_table, teacher_layers),
        ("student", student_table, student_layers),
    ):
        unknown = [layer for layer in chosen if layer not in table.index]
        if unknown:
            return BINDINGS.incorrect(
                f"{unknown} are not scored {side} layers. The {side}'s LSP table has: "
                f"{', '.join(map(str, table.index))}."
            )
        if len(set(chosen)) != len(chosen):
            return BINDINGS.incorrect(f"Each {side} layer may be bound once; you repeated one in {chosen}.")
    teacher_order = {layer: i for i, layer in enumerate(teacher_table.index)}
    student_order = {layer: i for i, layer in enumerate(student_table.index)}
    ordered = sorted(zip(teacher_layers, student_layers), key=lambda pair: teacher_order[pair[0]])
    student_positions = [student_order[s] for _, s in ordered]
    if student_positions != sorted(student_positions):
        return BINDINGS.incorrect(
            f"Your pairs cross: {ordered}. Bind shallow teacher layers to shallow student layers (in forward "
            "order), as every configuration of the paper's Tables 4-8 does."
        )
    count = len(ordered)
    lowest_teacher, lowest_student = (
        _lowest_layers(teacher_table, count),
        _lowest_layers(student_table, count),
    )
    chosen_teacher, chosen_student = [t for t, _ in ordered], [s for _, s in ordered]
    if chosen_teacher != lowest_teacher or chosen_student != lowest_student:
        return BINDINGS.incorrect(
            f"LSP binds the {count} lowest-scoring layers of each network (Eq. 7, l* = argmin LSP): teacher "
            f"{lowest_teacher}, student {lowest_student}. You chose teacher {chosen_teacher}, "
            f"student {chosen_student}. Look at the LSP column again."
        )
    summary = pd.DataFrame(
        {
            "teacher": chosen_teacher,
            "teacher LSP": [float(teacher_table.loc[t, "LSP"]) for t in chosen_teacher],
            "student": chosen_student,
            "student LSP": [float(student_table.loc[s, "LSP"]) for s in chosen_student],
        }
    )
    bound = [str(layer) for pair in ordered for layer in pair]
    consistent, about_justification = _check_justification(justification, bound, teacher_table, student_table)
    verdict = f"These are LSP's choices: the {count} lowest-scoring layers of each network, in forward order."
    if not consistent:
        return BINDINGS.incorrect(f"The bindings are right. {about_justification}", summary)
    return BINDINGS.correct(f"{verdict} {about_justification}", summary)
