"""The exercise checks of every lesson (kdbook_utils.exercises): one style for all of them.

Each check accepts the right answer, names each mistake it knows, reports an unfinished answer as "not
done", and never raises (nor writes to stderr) whatever the answer does. Answers below are written the way
a learner would write them, not taken from the checkers' own lists of mistakes.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from kdbook_utils.exercises import CheckResult
from kdbook_utils.exercises.crosslayer import check_ablation_row, check_fsp_matrix
from kdbook_utils.exercises.hinton import check_fewer_images, check_high_temperature_limit, check_kd_loss
from kdbook_utils.exercises.lsl import LSP_LABEL, OWN_LABEL, check_inter_class_gram, check_own_bindings
from kdbook_utils.exercises.mskd import check_exit_loss, check_threshold_for_budget
from kdbook_utils.exercises.result import Exercise
from kdbook_utils.lessons.crosslayer import P1_P2, STUDENT_ALONE, ablation_grid, unique_settings

EXERCISES = Path(__file__).resolve().parents[1] / "kdbook_utils" / "exercises"


def not_written(*args: Any) -> Any:
    raise NotImplementedError


def returns_none(*args: Any) -> None:
    return None


def assert_result(result: object, status: str, *fragments: str) -> CheckResult:
    assert isinstance(result, CheckResult), f"a check must return a CheckResult, got {type(result).__name__}"
    assert result.status == status, f"expected {status!r}, got {result.status!r}: {result.feedback}"
    for fragment in fragments:
        assert fragment in result.feedback, f"{fragment!r} not in the feedback: {result.feedback}"
    return result


# ----------------------------------------------------------------------------------------- the result type


def test_a_result_shows_its_feedback_as_text_and_html() -> None:
    exercise = Exercise("demo-exercise", "Exercise 0: a demo")
    right = exercise.correct("All good.")
    wrong = exercise.incorrect("Divide by <T^2> & try again.")
    todo = exercise.not_done("Replace the stub.")
    assert (right.passed, wrong.passed, todo.passed) == (True, False, False)
    assert (bool(right), bool(wrong), bool(todo)) == (True, False, False)
    assert (right.points, wrong.points, right.max_points) == (1.0, 0.0, 1.0)
    assert str(right) == "Correct. All good."
    assert str(wrong) == "Not yet. Divide by <T^2> & try again."
    assert str(todo) == "Not done yet. Replace the stub."
    page = wrong._repr_html_()
    assert "Not yet." in page and "Exercise 0: a demo" in page
    assert "Divide by &lt;T^2&gt; &amp; try again." in page and "<T^2>" not in page
    with pytest.raises(ValueError, match="status"):
        CheckResult("x", "x", "maybe", "")  # type: ignore[arg-type]


def test_a_result_shows_its_table() -> None:
    table = pd.DataFrame({"layer": ["conv5"], "LSP": [0.8123]})
    result = Exercise("demo", "demo").correct("Fine.", table)
    assert "conv5" in str(result) and "conv5" in result._repr_html_() and "0.812" in result._repr_html_()


def test_assert_passed_raises_with_the_feedback_only_when_not_passed() -> None:
    exercise = Exercise("demo-exercise", "Exercise 0: a demo")
    assert exercise.correct("Fine.").assert_passed() is None
    with pytest.raises(AssertionError, match=r"^Not yet\. Swap the arguments\.$"):
        exercise.incorrect("Swap the arguments.").assert_passed()
    with pytest.raises(AssertionError, match="Not done yet"):
        exercise.not_done("Write it.").assert_passed()


def test_a_raising_answer_is_reported_with_the_learners_line() -> None:
    def divides_by_zero(*args: Any) -> Any:
        return 1 / 0

    result = assert_result(check_fsp_matrix(divides_by_zero), "incorrect", "ZeroDivisionError")
    assert "`return 1 / 0`" in result.feedback


# ------------------------------------------------------------------------------------- lesson 1: Hinton KD


def right_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student / temperature, dim=1)
    p = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q, log_p = F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


KD_LOSS_MISTAKES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "forgot the factor T^2": lambda s, t, T: F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1),
                                                      reduction="batchmean"),
    "multiplied by T instead of T^2": lambda s, t, T: kl_rows(s, t, T).mean() * T,
    "reduction='batchmean'": lambda s, t, T: F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1),
                                                      reduction="mean") * T * T,
    "summed over the batch": lambda s, t, T: kl_rows(s, t, T).sum() * T * T,
    "wrong way": lambda s, t, T: right_kd_loss(t, s, T),
    "did not divide the logits by the temperature": lambda s, t, T: right_kd_loss(s * T, t * T, T),
    "soft cross-entropy": lambda s, t, T: -(F.softmax(t / T, 1) * F.log_softmax(s / T, 1)).sum(1).mean() * T * T,
    "log-probabilities as its first argument": lambda s, t, T: F.kl_div(F.softmax(s / T, 1), F.softmax(t / T, 1),
                                                                        reduction="batchmean") * T * T,
    "no gradient reaches": lambda s, t, T: right_kd_loss(s.detach(), t, T),
    "its gradient is not": lambda s, t, T: right_kd_loss(s.detach(), t, T) + 0 * s.sum(),
    "one number (a scalar tensor)": lambda s, t, T: kl_rows(s, t, T) * T * T,
    "Return a torch tensor": lambda s, t, T: float(right_kd_loss(s, t, T)),
    "Check the formula": lambda s, t, T: right_kd_loss(s, t, T) + 1,
}  # fmt: skip


def test_check_kd_loss_accepts_the_reference() -> None:
    assert_result(check_kd_loss(right_kd_loss), "correct", "value and gradient")


@pytest.mark.parametrize("hint", list(KD_LOSS_MISTAKES))
def test_check_kd_loss_names_each_known_mistake(hint: str) -> None:
    assert_result(check_kd_loss(KD_LOSS_MISTAKES[hint]), "incorrect", hint)


@pytest.mark.parametrize("stub", [not_written, returns_none], ids=["NotImplementedError", "None"])
def test_check_kd_loss_reports_an_unfinished_answer_as_not_done(stub: Callable) -> None:
    assert_result(check_kd_loss(stub), "not done")


def right_limit(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    centred = (z - z.mean(dim=1, keepdim=True)) - (v - v.mean(dim=1, keepdim=True))
    return centred.pow(2).sum(dim=1).mean() / (2 * z.shape[1])


LIMIT_MISTAKES: dict[str, Callable] = {
    "twice the limit": lambda z, v: 2 * right_limit(z, v),
    "C times the limit": lambda z, v: right_limit(z, v) * z.shape[1],
    "1/C times the limit": lambda z, v: right_limit(z, v) / z.shape[1],
    "B times the limit": lambda z, v: right_limit(z, v) * len(z),
    "centre each image's logits": lambda z, v: (z - v).pow(2).sum(dim=1).mean() / (2 * z.shape[1]),
    "integrate in z": lambda z, v: right_limit(z, v) + 0.3,
}


def test_check_high_temperature_limit_accepts_a_derivation_and_names_each_slip() -> None:
    real_z, real_v = torch.randn(64, 10) * 2, torch.randn(64, 10) * 3
    assert_result(check_high_temperature_limit(right_limit, real_z, real_v), "correct")
    for hint, wrong in LIMIT_MISTAKES.items():
        assert_result(check_high_temperature_limit(wrong, real_z, real_v), "incorrect", hint)
    assert_result(check_high_temperature_limit(not_written), "not done")
    from kdbook_utils.methods.hinton import logit_matching_limit

    result = assert_result(check_high_temperature_limit(logit_matching_limit), "incorrect", "package's own")
    assert "sum(dim=1)" not in result.feedback and "2 * C" not in result.feedback  # never the formula


def test_check_kd_loss_refuses_the_package_loss_itself() -> None:
    from kdbook_utils.methods.hinton import kd_loss

    assert_result(check_kd_loss(kd_loss), "incorrect", "Write the loss yourself")

    def delegates(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
        return kd_loss(s, t, T)

    assert_result(check_kd_loss(delegates), "incorrect", "Write the loss yourself")


def fewer_images_runs(kd_gain: float, seeds: int = 3) -> pd.DataFrame:
    rows = []
    for seed in range(seeds):
        for method, accuracy in (("student alone", 80.0 + seed), ("KD", 80.0 + seed + kd_gain + 0.1 * seed)):
            rows.append({"method": method, "seed": seed, "split": "test", "output": "final",
                         "accuracy": accuracy, "failed": ""})  # fmt: skip
    return pd.DataFrame(rows)


def test_check_fewer_images_checks_the_experiment_the_verdict_and_the_quoted_difference() -> None:
    jobs = {"student alone": {"method": "student alone", "images": 100},
            "KD": {"method": "KD", "temperature": 4.0, "alpha": 0.1, "images": 100}}  # fmt: skip
    runs = fewer_images_runs(3.0)
    right = "The mean paired difference was +3.1 points, larger than before, as I predicted."
    assert_result(check_fewer_images(jobs, runs, "larger", "better", right, 300), "correct")
    assert_result(check_fewer_images(None, None, "", "", "", 300), "not done")
    assert_result(check_fewer_images(jobs, runs, "", "better", right, 300), "not done", "prediction")
    wrong_verdict = assert_result(check_fewer_images(jobs, runs, "larger", "worse", right, 300), "incorrect",
                                  "does not follow")  # fmt: skip
    assert "better" not in wrong_verdict.feedback, "the feedback must not give the verdict away"
    assert_result(check_fewer_images(jobs, runs, "larger", "no difference", right, 300), "incorrect",
                  "three words")  # fmt: skip
    assert_result(check_fewer_images(jobs, runs, "larger", "better", "It got better.", 300), "incorrect",
                  "Quote your run's own")  # fmt: skip
    too_many = {label: {**job, "images": 400} for label, job in jobs.items()}
    assert_result(
        check_fewer_images(too_many, runs, "larger", "better", right, 300), "incorrect", "fewer than"
    )
    unpaired = {**jobs, "KD": {**jobs["KD"], "images": 50}}
    assert_result(
        check_fewer_images(unpaired, runs, "larger", "better", right, 300), "incorrect", "same number"
    )
    one_seed = fewer_images_runs(3.0, seeds=1)
    assert_result(check_fewer_images(jobs, one_seed, "larger", "better", right, 300), "incorrect", "One seed")
    at_chance = fewer_images_runs(3.0)
    at_chance.loc[at_chance["seed"] > 0, "failed"] = "accuracy 10.0 % on val is at or near chance (10 %)"
    flagged = assert_result(check_fewer_images(jobs, at_chance, "larger", "better", right, 300), "incorrect",
                            "4 of your runs failed (accuracy 10.0 %")  # fmt: skip
    assert "never compared" in flagged.feedback


# ------------------------------------------------------------------------------------------- lesson 2: LSL


def right_inter_class_gram(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = features.reshape(len(features), -1)
    means = torch.stack([flat[labels == c].mean(0) for c in range(num_classes)])
    unit = F.normalize(means, dim=1)
    return unit @ unit.T


def gram_of_dot_products(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = features.reshape(len(features), -1)
    means = torch.stack([flat[labels == c].mean(0) for c in range(num_classes)])
    return means @ means.T


def gram_normalising_each_image_first(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    flat = F.normalize(features.reshape(len(features), -1), dim=1)
    means = torch.stack([flat[labels == c].mean(0) for c in range(num_classes)])
    return means @ means.T


INTER_CLASS_MISTAKES: dict[str, Callable[[torch.Tensor, torch.Tensor, int], Any]] = {
    "diagonal should be all 1": gram_of_dot_products,
    "normalised each image before averaging": gram_normalising_each_image_first,
    "(num_classes, num_classes)": lambda f, y, c: torch.eye(len(y)),
    "symmetric": lambda f, y, c: torch.triu(right_inter_class_gram(f, y, c)),
    "values differ": lambda f, y, c: right_inter_class_gram(f, y, c) ** 2,
    "Return a torch.Tensor": lambda f, y, c: right_inter_class_gram(f, y, c).tolist(),
}


def test_check_inter_class_gram_accepts_the_right_answer_in_any_float_type() -> None:
    assert_result(check_inter_class_gram(right_inter_class_gram), "correct", "class means")
    assert_result(check_inter_class_gram(lambda f, y, c: right_inter_class_gram(f.double(), y, c)), "correct")


@pytest.mark.parametrize("hint", list(INTER_CLASS_MISTAKES))
def test_check_inter_class_gram_names_each_known_mistake(hint: str) -> None:
    assert_result(check_inter_class_gram(INTER_CLASS_MISTAKES[hint]), "incorrect", hint)


@pytest.mark.parametrize("stub", [not_written, returns_none], ids=["NotImplementedError", "None"])
def test_check_inter_class_gram_reports_an_unfinished_answer_as_not_done(stub: Callable) -> None:
    assert_result(check_inter_class_gram(stub), "not done")


@pytest.fixture
def lsp_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two LSP tables in forward order; the three lowest are teacher conv4, conv5, fc1 and student
    conv2, conv3, fc1."""
    teacher = pd.DataFrame(
        {
            "G_diversity": [0.512, 0.431, 0.352, 0.411, 0.301, 0.702],
            "H_class": [0.688, 0.669, 0.548, 0.589, 0.499, 0.598],
            "LSP": [1.2, 1.1, 0.9, 1.0, 0.8, 1.3],
        },
        index=pd.Index(["conv2", "conv3", "conv4", "conv5", "fc1", "fc2"], name="layer"),
    )
    student = pd.DataFrame(
        {"G_diversity": [0.5, 0.3, 0.4, 0.6], "H_class": [0.5, 0.4, 0.5, 0.5], "LSP": [1.0, 0.7, 0.9, 1.1]},
        index=pd.Index(["conv2", "conv3", "fc1", "fc2"], name="layer"),
    )
    return teacher, student


LSP_BINDINGS = [("conv4", "conv2"), ("conv5", "conv3"), ("fc1", "fc1")]


def binding_runs(gain: float, seeds: int = 3) -> pd.DataFrame:
    rows = []
    for seed in range(seeds):
        for method, accuracy in ((LSP_LABEL, 70.0 + seed), (OWN_LABEL, 70.0 + seed + gain + 0.2 * seed)):
            rows.append({"method": method, "seed": seed, "split": "test", "output": "final", "accuracy": accuracy,
                         "failed": ""})  # fmt: skip
    return pd.DataFrame(rows)


MINE = [("conv3", "conv2"), ("conv4", "conv3")]
WHY = "My bindings were -2.8 points against LSP's: worse, as I predicted, because they skip the FC layers."


def test_check_own_bindings_accepts_an_experiment_that_follows_from_its_runs(lsp_tables: tuple) -> None:
    runs = binding_runs(-3.0)
    assert_result(check_own_bindings(MINE, LSP_BINDINGS, runs, "worse", "worse", WHY, *lsp_tables), "correct",
                  "3 paired seeds")  # fmt: skip


@pytest.mark.parametrize(
    ("bindings", "verdict", "explanation", "hint"),
    [
        (LSP_BINDINGS, "worse", WHY, "LSP's own bindings"),
        ([("conv9", "conv3")], "worse", WHY, "'conv9' is not a scored teacher layer"),
        ([("conv4", "conv7")], "worse", WHY, "'conv7' is not a scored student layer"),
        ([("conv4", "conv2", "fc1")], "worse", WHY, "is not a (teacher layer, student layer) pair"),
        ([("conv4", "conv2"), ("conv4", "conv2")], "worse", WHY, "appears twice"),
        (MINE, "better", WHY, "does not follow from your comparison"),
        (MINE, "same", WHY, "one of the three words"),
        (MINE, "worse", "Mine were worse.", "Quote your run's own mean paired difference"),
    ],
)
def test_check_own_bindings_names_each_mistake(
    lsp_tables: tuple, bindings: Any, verdict: str, explanation: str, hint: str
) -> None:
    result = assert_result(
        check_own_bindings(bindings, LSP_BINDINGS, binding_runs(-3.0), "worse", verdict, explanation, *lsp_tables),
        "incorrect", hint,
    )  # fmt: skip
    assert "better" not in result.feedback.replace("better, worse", ""), "never the verdict itself"


def test_check_own_bindings_needs_both_jobs_over_two_seeds(lsp_tables: tuple) -> None:
    one_seed = binding_runs(-3.0, seeds=1)
    assert_result(check_own_bindings(MINE, LSP_BINDINGS, one_seed, "worse", "worse", WHY, *lsp_tables),
                  "incorrect", "One seed")  # fmt: skip
    only_lsp = binding_runs(-3.0)[lambda t: t["method"] == LSP_LABEL]
    assert_result(check_own_bindings(MINE, LSP_BINDINGS, only_lsp, "worse", "worse", WHY, *lsp_tables),
                  "incorrect", "no rows of")  # fmt: skip


@pytest.mark.parametrize("unfinished", [None, ..., []])
def test_check_own_bindings_reports_unset_bindings_as_not_done(lsp_tables: tuple, unfinished: Any) -> None:
    result = check_own_bindings(unfinished, LSP_BINDINGS, None, "", "", "", *lsp_tables)
    assert result.status in ("not done", "incorrect") and not result.passed
    assert_result(check_own_bindings(None, LSP_BINDINGS, None, "", "", "", *lsp_tables), "not done")
    assert_result(check_own_bindings(MINE, LSP_BINDINGS, binding_runs(-3.0), "", "worse", WHY, *lsp_tables),
                  "not done", "prediction")  # fmt: skip


# ----------------------------------------------------------------------------------- lesson 3: cross-layer


def right_fsp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (a.shape[2] * a.shape[3])


FSP_MISTAKES: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "forgot to divide by the number of spatial positions H*W": lambda a, b: torch.einsum(
        "nihw,njhw->nij", a, b
    ),
    "divided by the number of channels": lambda a, b: torch.einsum("nihw,njhw->nij", a, b) / a.shape[1],
    "divided by H*W*C": lambda a, b: right_fsp(a, b) / a.shape[1],
    "swapped": lambda a, b: right_fsp(b, a),
    "has shape": lambda a, b: right_fsp(a, b).mean(0),
    "the values are not": lambda a, b: right_fsp(a, b) * 2,
    "Return a torch tensor": lambda a, b: right_fsp(a, b).numpy(),
}


def test_check_fsp_matrix_accepts_the_right_answer() -> None:
    assert_result(check_fsp_matrix(right_fsp), "correct")


@pytest.mark.parametrize("hint", list(FSP_MISTAKES))
def test_check_fsp_matrix_names_each_known_mistake(hint: str) -> None:
    assert_result(check_fsp_matrix(FSP_MISTAKES[hint]), "incorrect", hint)


@pytest.mark.parametrize("stub", [not_written, returns_none], ids=["NotImplementedError", "None"])
def test_check_fsp_matrix_reports_an_unfinished_answer_as_not_done(stub: Callable) -> None:
    assert_result(check_fsp_matrix(stub), "not done")


GRID = [setting.label for setting in unique_settings(ablation_grid())]
MY_ROW = P1_P2.replace(k=2, num_teachers=3)
ROW_WHY = "My row gave +2.1 points over the student alone, better, as I predicted."


def row_runs(gain: float, seeds: int = 3) -> pd.DataFrame:
    rows = []
    for seed in range(seeds):
        for method, accuracy in (
            (STUDENT_ALONE.label, 60.0 + seed),
            (MY_ROW.label, 60.0 + seed + gain + 0.1 * seed),
        ):
            rows.append({"method": method, "seed": seed, "split": "test", "output": "final", "accuracy": accuracy,
                         "failed": ""})  # fmt: skip
    return pd.DataFrame(rows)


def test_check_ablation_row_accepts_a_new_row_whose_report_follows_from_its_runs() -> None:
    assert_result(check_ablation_row(MY_ROW, GRID, row_runs(2.0), "better", "better", ROW_WHY, STUDENT_ALONE.label),
                  "correct")  # fmt: skip


@pytest.mark.parametrize(
    ("row", "verdict", "explanation", "hint"),
    [
        (P1_P2, "better", ROW_WHY, "already a row"),
        (STUDENT_ALONE, "better", ROW_WHY, "no teacher"),
        ("cross-2 + KL", "better", ROW_WHY, "must be an Ablation"),
        (MY_ROW, "worse", ROW_WHY, "does not follow from your comparison"),
        (MY_ROW, "better", "It helped.", "Quote your run's own mean paired difference"),
    ],
)
def test_check_ablation_row_names_each_mistake(row: Any, verdict: str, explanation: str, hint: str) -> None:
    result = assert_result(
        check_ablation_row(row, GRID, row_runs(2.0), "better", verdict, explanation, STUDENT_ALONE.label),
        "incorrect", hint,
    )  # fmt: skip
    assert "better" not in result.feedback.replace("better, worse", ""), "never the verdict itself"


def test_check_ablation_row_reports_unfinished_work_as_not_done() -> None:
    assert_result(check_ablation_row(None, GRID, None, "", "", "", STUDENT_ALONE.label), "not done")
    assert_result(check_ablation_row(MY_ROW, GRID, row_runs(2.0), "", "better", ROW_WHY, STUDENT_ALONE.label),
                  "not done", "prediction")  # fmt: skip
    assert_result(check_ablation_row(MY_ROW, GRID, row_runs(2.0), "better", "", "", STUDENT_ALONE.label),
                  "not done", "verdict")  # fmt: skip


# ------------------------------------------------------------------------------------------ lesson 4: MSKD


def right_exit_loss(z, y, t, temperature, alpha, beta):
    kl = F.kl_div(F.log_softmax(z / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
    return alpha * F.cross_entropy(z, y) + beta * temperature**2 * kl


def exit_kl(z: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    log_s, log_t = F.log_softmax(z / temperature, 1), F.log_softmax(t / temperature, 1)
    return (log_t.exp() * (log_t - log_s)).sum(1)


EXIT_LOSS_MISTAKES: dict[str, Callable[..., Any]] = {
    "the T^2 factor is missing": lambda z, y, t, T, a, b: a * F.cross_entropy(z, y) + b * exit_kl(z, t, T).mean(),
    "the KL direction is reversed": lambda z, y, t, T, a, b: a * F.cross_entropy(z, y)
    + b * T**2 * exit_kl(t, z, T).mean(),
    "averaged over classes too": lambda z, y, t, T, a, b: a * F.cross_entropy(z, y)
    + b * T**2 * F.kl_div(F.log_softmax(z / T, 1), F.softmax(t / T, 1), reduction="mean"),
    "summed over the batch": lambda z, y, t, T, a, b: a * F.cross_entropy(z, y) + b * T**2 * exit_kl(z, t, T).sum(),
    "temperature is not applied": lambda z, y, t, T, a, b: a * F.cross_entropy(z, y)
    + b * T**2 * exit_kl(z, t, 1.0).mean(),
    "alpha and beta are swapped": lambda z, y, t, T, a, b: right_exit_loss(z, y, t, T, b, a),
    "no gradient reaches the exit's logits": lambda z, y, t, T, a, b: right_exit_loss(z.detach(), y, t, T, a, b),
    "Return one scalar tensor": lambda z, y, t, T, a, b: right_exit_loss(z, y, t, T, a, b).item(),
    "the reference gives": lambda z, y, t, T, a, b: torch.zeros(()),
}  # fmt: skip


def test_check_exit_loss_accepts_the_right_answer() -> None:
    assert_result(check_exit_loss(right_exit_loss), "correct")
    assert_result(check_exit_loss(right_exit_loss, seed=3), "correct")


@pytest.mark.parametrize("hint", list(EXIT_LOSS_MISTAKES))
def test_check_exit_loss_names_each_known_mistake(hint: str) -> None:
    assert_result(check_exit_loss(EXIT_LOSS_MISTAKES[hint]), "incorrect", hint)


@pytest.mark.parametrize("stub", [not_written, returns_none], ids=["NotImplementedError", "None"])
def test_check_exit_loss_reports_an_unfinished_answer_as_not_done(stub: Callable) -> None:
    assert_result(check_exit_loss(stub), "not done")


def hand_made_exits() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two exits on four images: exit 1 is sure of images 0-1 and right on them only; exit 2 is right on
    all four."""
    labels = torch.tensor([0, 1, 0, 1])
    exit1 = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 0.1], [0.1, 0.0]])
    exit2 = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    return [exit1, exit2], labels


def test_check_threshold_for_budget() -> None:
    exits, labels = hand_made_exits()
    macs = [10.0e6, 25.0e6]
    assert_result(check_threshold_for_budget(1.01, exits, labels, macs, 30.0e6), "correct", "100.00 %")
    assert_result(check_threshold_for_budget(0.9, exits, labels, macs, 20.0e6), "correct")  # half leave early
    assert_result(check_threshold_for_budget(1.01, exits, labels, macs, 20.0e6), "incorrect", "Over budget")
    assert_result(check_threshold_for_budget(0.0, exits, labels, macs, 12.0e6), "correct")  # only exit 1 fits
    not_best = assert_result(
        check_threshold_for_budget(0.0, exits, labels, macs, 30.0e6), "incorrect", "finer grid of thresholds"
    )
    assert "1.01" not in not_best.feedback and "1.0" not in not_best.feedback.replace("0.0", ""), (
        "no answer given"
    )
    assert_result(
        check_threshold_for_budget(0.5, exits, labels, macs, 5.0e6), "incorrect", "No threshold meets"
    )
    assert_result(check_threshold_for_budget("high", exits, labels, macs, 30.0e6), "incorrect", "a number")
    assert_result(check_threshold_for_budget(90, exits, labels, macs, 30.0e6), "incorrect", "divided by 100")
    assert_result(check_threshold_for_budget(np.float32(0.9), exits, labels, macs, 20.0e6), "correct")
    assert_result(check_threshold_for_budget(float("nan"), exits, labels, macs, 30.0e6), "incorrect", "NaN")
    assert_result(check_threshold_for_budget(None, exits, labels, macs, 30.0e6), "not done")


def test_check_threshold_for_budget_checks_the_reported_test_measurement() -> None:
    exits, labels = hand_made_exits()
    macs = [10.0e6, 25.0e6]
    test = {"test_logits": exits, "test_labels": labels}
    assert_result(check_threshold_for_budget(0.9, exits, labels, macs, 20.0e6, **test), "not done", "MY_TEST")
    right = {"reported_accuracy": 100.0, "reported_macs": 17.5e6}  # images 0-1 leave at exit 1, 2-3 at exit 2
    assert_result(check_threshold_for_budget(0.9, exits, labels, macs, 20.0e6, **test, **right), "correct")
    wrong = {"reported_accuracy": 75.0, "reported_macs": 17.5e6}
    assert_result(check_threshold_for_budget(0.9, exits, labels, macs, 20.0e6, **test, **wrong), "incorrect",
                  "not what your threshold gives")  # fmt: skip


# ------------------------------------------------------------------------------------- never raises, anywhere


def _raise_type_error(*args: Any) -> Any:
    raise TypeError("unexpected argument")


ODD_FUNCTIONS: list[Any] = [
    _raise_type_error,
    lambda *args: "a string",
    lambda *args: torch.tensor([float("nan")]),
    lambda *args: torch.full((2, 2), float("nan")),
    lambda *args: torch.ones(3, dtype=torch.long),
    lambda *args: np.zeros(3),
    lambda *args: torch.zeros((), dtype=torch.complex64),
    lambda: torch.zeros(()),  # takes no arguments
    42,  # not a function
]
ODD_VALUES: list[Any] = [42, -1.5, object(), [1, 2], {"a": 1}, float("nan"), [[1, 2, 3]], b"bytes", ("a",)]


def _checks(answer: Any, tables: tuple[pd.DataFrame, pd.DataFrame]) -> dict[str, Callable[[], CheckResult]]:
    exits, labels = hand_made_exits()
    return {
        "kd_loss": lambda: check_kd_loss(answer),
        "inter_class_gram": lambda: check_inter_class_gram(answer),
        "fsp_matrix": lambda: check_fsp_matrix(answer),
        "exit_loss": lambda: check_exit_loss(answer),
        "high_temperature": lambda: check_high_temperature_limit(answer),
        "fewer_images": lambda: check_fewer_images(answer, answer, answer, answer, answer, 300),
        "bindings": lambda: check_own_bindings(answer, LSP_BINDINGS, answer, answer, answer, answer, *tables),
        "ablation_row": lambda: check_ablation_row(
            answer, GRID, answer, answer, answer, answer, "student alone"
        ),
        "threshold": lambda: check_threshold_for_budget(answer, exits, labels, [1.0, 2.0], 3.0),
    }


@pytest.mark.parametrize("answer", ODD_FUNCTIONS + ODD_VALUES, ids=lambda a: type(a).__name__)
def test_no_check_raises_or_writes_to_stderr_whatever_the_answer(
    answer: Any, lsp_tables: tuple, capfd: pytest.CaptureFixture[str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping a check would fail here
        for name, check in _checks(answer, lsp_tables).items():
            result = check()
            assert isinstance(result, CheckResult), name
            assert result.feedback, name
    assert capfd.readouterr().err == "", "nbgrader scores a cell that writes to stderr as failed"


def test_a_warning_from_the_learners_code_stays_off_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    def warns(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
        warnings.warn("deprecated", DeprecationWarning, stacklevel=1)
        return right_kd_loss(s, t, T)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_result(check_kd_loss(warns), "correct")
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------------------------- one style


@pytest.mark.parametrize("module", sorted(path.name for path in EXERCISES.glob("*.py")))
def test_checks_return_results_instead_of_printing_or_raising(module: str) -> None:
    tree = ast.parse((EXERCISES / module).read_text())
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert "print" not in calls, "a check returns its feedback in a CheckResult instead of printing it"
    raises = [node for node in ast.walk(tree) if isinstance(node, ast.Raise)]
    assert module == "result.py" or not raises, "a check never raises: return a 'not yet' result instead"
    checks = [
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("check_")
    ]
    for check in checks:
        assert ast.unparse(check.returns) == "CheckResult", f"{check.name} must return a CheckResult"
        decorators = [ast.unparse(decorator) for decorator in check.decorator_list]
        assert any(text.startswith("never_raises(") for text in decorators), f"{check.name} is not guarded"


STABLE_METHOD_NAMES = {
    "kdbook_utils.methods.hinton": {"kd_loss", "logit_matching_limit"},
    "kdbook_utils.methods.lsl": {"inter_class_gram"},
    "kdbook_utils.methods.crosslayer": {"fsp_matrix", "cross_layer_pairs"},
    "kdbook_utils.methods.mskd": {"exit_loss", "early_exit", "threshold_sweep"},
    "kdbook_utils.methods.lm": {"forward_kl", "reverse_kl"},
}


@pytest.mark.parametrize("module", sorted(path.name for path in EXERCISES.glob("*.py")))
def test_checks_use_only_the_stable_method_functions(module: str) -> None:
    tree = ast.parse((EXERCISES / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdbook_utils.methods"):
            allowed = STABLE_METHOD_NAMES.get(node.module or "", set())
            names = {alias.name for alias in node.names}
            assert names <= allowed, f"{module} imports {sorted(names - allowed)} from {node.module}"
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("kdbook_utils.methods") for alias in node.names), module
