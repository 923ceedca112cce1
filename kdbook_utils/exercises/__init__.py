"""Checks for the notebooks' exercises, one module per lesson: each ``check_...`` function tests a
student's answer and says what is wrong, with a hint (see each module for how it reports)."""
