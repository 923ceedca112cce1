"""Checks for the notebooks' exercises, one module per lesson (``hinton``, ``lsl``, ``crosslayer``, ``mskd``).

Every ``check_...`` function runs the learner's answer on test cases and returns a :class:`CheckResult`:
"Correct.", "Not yet." with what is wrong and a hint (the mistakes a checker knows are named), or
"Not done yet." for an answer that is still the starting stub. A check never raises, whatever the answer
does, so a notebook runs top to bottom before its exercises are done. The result shows its feedback as the
last line of a cell; the autograder's hidden tests call ``result.assert_passed()``, which raises an
``AssertionError`` with the feedback when the answer did not pass.
"""

from kdbook_utils.exercises.result import CheckResult, Exercise

__all__ = ["CheckResult", "Exercise"]
