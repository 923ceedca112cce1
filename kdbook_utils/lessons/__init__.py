"""Lesson support: each lesson's settings per preset, its figures and tables, and the paper's reported
numbers (labelled as the paper's). The notebooks call these for pictures; the mathematics is in
:mod:`kdbook_utils.methods` and the runs in :mod:`kdbook_utils.experiments`."""

from __future__ import annotations

import dataclasses
from typing import Any

from kdbook_utils.experiments import recipe_hash


def settings_hash(settings: Any) -> str:
    """A short hash of a lesson's settings (a dataclass): recorded results carry it, so results made with
    other settings than the lesson would run now are recognised."""
    return recipe_hash(dataclasses.asdict(settings))
