"""What every exercise check returns: a :class:`CheckResult` that shows its feedback and never raises.

A check runs the learner's answer on test cases and says one of three things:

* ``Correct.`` the answer passed every test case;
* ``Not yet.`` the answer is wrong, with what is wrong and a hint (the mistakes a checker knows are named);
* ``Not done yet.`` the answer is still the starting stub (``NotImplementedError``, ``None``, an empty value).

Whatever the answer does (raises, returns the wrong type or shape, prints warnings) the check returns a
result; it never raises, so a notebook whose exercises are not done still runs top to bottom. As the last
line of a cell the result shows itself (HTML in Jupyter, plain text elsewhere); ``bool(result)`` is
``result.passed``. The autograder's hidden tests call :meth:`CheckResult.assert_passed`, which raises an
``AssertionError`` carrying the feedback when the answer did not pass.
"""

from __future__ import annotations

import functools
import html
import inspect
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pandas as pd
from IPython.display import display

from kdbook_utils.experiments import compare

__all__ = ["CheckResult", "Exercise", "Status", "experiment_report", "uses"]

Status = Literal["correct", "incorrect", "not done"]

HEADLINES: dict[str, str] = {"correct": "Correct.", "incorrect": "Not yet.", "not done": "Not done yet."}
_STYLE: dict[str, tuple[str, str]] = {  # status -> (symbol, colour); the word carries the meaning too
    "correct": ("\u2713", "#2e7d32"),
    "incorrect": ("\u2717", "#c62828"),
    "not done": ("\u25cb", "#5c6bc0"),
}
_PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one exercise check: its status, the feedback, and the points it earns.

    ``exercise`` is a stable id (``"hinton-kd-loss"``); ``title`` is what the learner sees
    ("Lesson 1, exercise 1: the KD loss"). ``table`` is an optional table shown under the feedback.
    """

    exercise: str
    title: str
    status: Status
    feedback: str
    max_points: float = 1.0
    table: pd.DataFrame | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.status not in HEADLINES:
            raise ValueError(f"status must be one of {sorted(HEADLINES)}, got {self.status!r}.")

    @property
    def passed(self) -> bool:
        return self.status == "correct"

    @property
    def points(self) -> float:
        return self.max_points if self.passed else 0.0

    @property
    def headline(self) -> str:
        return HEADLINES[self.status]

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        text = f"{self.headline} {self.feedback}".strip()
        if self.table is not None:
            text += "\n" + self.table.to_string()
        return text

    def assert_passed(self, show: bool = True) -> None:
        """Raise ``AssertionError`` with the feedback unless the answer passed (the autograder's test).

        In IPython the result is displayed first (``show=False`` skips that), so a graded notebook shows
        the feedback of every exercise. Returns None, so a grade cell ending with this call has no
        ``execute_result`` for nbgrader to read as partial credit.
        """
        if show and _in_ipython():
            display(self)
        if not self.passed:
            raise AssertionError(str(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        symbol, colour = _STYLE[self.status]
        table = (
            "" if self.table is None else self.table.to_html(index=False, float_format=lambda v: f"{v:.3f}")
        )
        return (
            f'<div class="kdbook-check kdbook-check-{self.status.replace(" ", "-")}" style="border-left: 4px '
            f'solid {colour}; padding: 0.35em 0.8em; margin: 0.3em 0; background: {colour}14;">'
            f'<div><strong style="color: {colour}">{symbol} {html.escape(self.headline)}</strong> '
            f'<span style="opacity: 0.7; font-size: 0.9em">{html.escape(self.title)}</span></div>'
            f'<div style="white-space: pre-wrap">{html.escape(self.feedback)}</div>{table}</div>'
        )


@dataclass(frozen=True)
class Exercise:
    """One exercise's id and title; makes its :class:`CheckResult` objects."""

    id: str
    title: str
    max_points: float = 1.0

    def correct(self, feedback: str, table: pd.DataFrame | None = None) -> CheckResult:
        return CheckResult(self.id, self.title, "correct", feedback, self.max_points, table)

    def incorrect(self, feedback: str, table: pd.DataFrame | None = None) -> CheckResult:
        return CheckResult(self.id, self.title, "incorrect", feedback, self.max_points, table)

    def not_done(self, feedback: str) -> CheckResult:
        return CheckResult(self.id, self.title, "not done", feedback, self.max_points)

    def call(self, function: Callable[..., Any], *args: Any) -> tuple[Any, CheckResult | None]:
        """Call the learner's ``function``: ``(value, None)``, or ``(None, result)`` when it could not run.

        ``NotImplementedError`` (the starting stub) and a returned ``None`` or ``...`` are "not done";
        any other exception is "not yet", naming the exception and the learner's line that raised it.
        """
        if function is None or function is Ellipsis:
            return None, self.not_done(
                "The function is not written yet: define it, then run the check again."
            )
        if not callable(function):
            return None, self.incorrect(
                f"Expected a function, got {type(function).__name__}: define it with `def` and pass its name."
            )
        try:
            value = function(*args)
        except NotImplementedError:
            return None, self.not_done(
                "The function is not written yet (it still raises NotImplementedError): replace the stub "
                "with your code, then run the check again."
            )
        except Exception as error:  # noqa: BLE001 (the learner's code: report whatever it raises)
            return None, self.incorrect(f"Calling your function raised {describe_error(error)}")
        if value is None or value is Ellipsis:
            return None, self.not_done(
                "Your function returns None: finish it and `return` the result, then run the check again."
            )
        return value, None


def describe_error(error: BaseException) -> str:
    """``"ZeroDivisionError: division by zero (at `1 / 0`)"``: the learner's last line that raised."""
    text = f"{type(error).__name__}: {error}"
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if _is_learner_frame(frame.filename)]
    if own and own[-1].line:
        text += f" (at `{own[-1].line.strip()}`)"
    return text


def _is_learner_frame(filename: str) -> bool:
    """Whether a traceback frame is the learner's code: not this package, Python, or an installed library."""
    if filename.startswith("<"):
        return filename.startswith("<ipython-input")
    path = Path(filename).resolve()
    outside = (_PACKAGE, *{Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    return not any(path.is_relative_to(folder) for folder in outside) and not any(
        part in ("site-packages", "dist-packages") for part in path.parts
    )


def _in_ipython() -> bool:
    shell = sys.modules.get("IPython")
    return shell is not None and getattr(shell, "get_ipython", lambda: None)() is not None


CheckFunction = TypeVar("CheckFunction", bound=Callable[..., CheckResult])


def never_raises(exercise: Exercise) -> Callable[[CheckFunction], CheckFunction]:
    """Make a check return a "not yet" result instead of raising, and keep warnings off stderr.

    nbgrader scores a grade cell zero when it writes to stderr, so the warnings that a learner's answer
    (or a known mistake rebuilt for comparison) triggers are silenced while the check runs.
    """

    def decorate(check: CheckFunction) -> CheckFunction:
        @functools.wraps(check)
        def guarded(*args: Any, **kwargs: Any) -> CheckResult:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    return check(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 (an odd answer must not crash the notebook)
                    return exercise.incorrect(f"Checking your answer failed with {describe_error(error)}")

        return guarded  # type: ignore[return-value]

    return decorate


def uses(function: object, names: tuple[str, ...]) -> bool:
    """Whether ``function`` is, or its source code calls, one of the package's functions ``names``: an
    answer that hands the exercise to the code it is checked against."""
    if getattr(function, "__name__", None) in names and getattr(function, "__module__", "").startswith(
        "kdbook_utils"
    ):
        return True
    try:
        source = inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return any(re.search(rf"\b{re.escape(name)}\s*\(", source) for name in names)


def experiment_report(
    exercise: Exercise, runs: object, baseline: str, method: str, verdict: object, explanation: object
) -> CheckResult:
    """The shared end of every experiment exercise: the learner's ``runs`` (a tidy table from
    ``lesson.table``) hold ``baseline`` and ``method`` over the same two or more seeds; ``verdict`` is the
    one their paired comparison on the test split gives; ``explanation`` quotes the run's own mean
    paired difference (to one decimal). Says what is wrong and where to look, never the verdict."""
    if not isinstance(runs, pd.DataFrame) or not {"method", "seed", "split", "accuracy"} <= set(runs.columns):
        return exercise.incorrect("The runs must be the table lesson.table(...) returns (columns method, seed, "
                                  "split, accuracy, ...).")  # fmt: skip
    present = set(runs["method"])
    missing = [name for name in (baseline, method) if name not in present]
    if missing:
        return exercise.incorrect(f"Your runs have no rows of {missing}: run both jobs with lesson.table.")
    comparison = compare(runs, baseline, split="test", methods=[baseline, method])
    row = comparison.table.loc[method]
    failed = (runs[runs["method"].isin([baseline, method]) & (runs["failed"] != "")].drop_duplicates(["method", "seed"])
              if "failed" in runs else [])  # fmt: skip
    if int(row["seeds"]) < 2 and len(failed):
        return exercise.incorrect(f"{len(failed)} of your runs failed ({failed['failed'].iloc[0]}), and a failed "
                                  "run is flagged, never compared: fewer than two seeds are left. Give the runs "
                                  "enough images and epochs to learn (the lesson's own settings do).")  # fmt: skip
    if int(row["seeds"]) < 2:
        return exercise.incorrect("One seed cannot tell a gain from seed noise: run the jobs over two or more "
                                  "seeds (e.g. SETTINGS.seeds).")  # fmt: skip
    if not str(verdict or "").strip() or not str(explanation or "").strip():
        return exercise.not_done(
            "Now write the verdict your comparison gives (MY_VERDICT) and your explanation."
        )
    words = ("better", "worse", "inconclusive")
    given = str(verdict).strip().lower()
    if given not in words:
        return exercise.incorrect(
            f"MY_VERDICT is {verdict!r}: use one of the three words {', '.join(words)}."
        )
    computed = str(row["verdict"])
    if given != computed:
        return exercise.incorrect("Your verdict does not follow from your comparison: read where its 95 % "
                                  "interval (ci_low, ci_high) lies with respect to zero.")  # fmt: skip
    difference = float(row["difference"])
    numbers = [float(text) for text in re.findall(r"[-+]?\d+(?:\.\d+)?", str(explanation))]
    if not any(abs(abs(number) - abs(difference)) <= 0.051 for number in numbers):
        return exercise.incorrect("Quote your run's own mean paired difference (in points, one decimal) in "
                                  "your explanation, and say whether your prediction held.")  # fmt: skip
    return exercise.correct(
        f"Your verdict and explanation follow from your {int(row['seeds'])} paired seeds."
    )
