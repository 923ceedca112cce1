"""Presets: how big a run is.

Every notebook has a cell tagged ``parameters`` that starts with ``PRESET = get_preset()``; the preset
comes from the ``KDBOOK_PRESET`` environment variable (default ``quick``) unless the cell names one.

=========  =======================================  ==========================================
preset     data                                     cost
=========  =======================================  ==========================================
quick      scikit-learn digits (embedded), CPU      each lesson notebook in <= 2-3 min, 2 cores
lab        a CIFAR-10 subset (needs CIFAR on disk)  about 15 min on a laptop CPU, minutes on a GPU
paper      the papers' data sets and schedules      GPU hours
=========  =======================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

PRESET_ENV_VAR = "KDBOOK_PRESET"
DATA_ROOT_ENV_VAR = "KDBOOK_DATA"


@dataclass(frozen=True)
class Preset:
    """One size of run. Lessons read these fields rather than hard-coding sizes."""

    name: str
    dataset: str
    train_subset: int | None
    test_subset: int | None
    batch_size: int
    teacher_epochs: int
    student_epochs: int
    lr: float
    seeds: tuple[int, ...]
    device: str
    description: str

    def replace(self, **changes: object) -> Preset:
        """A copy with some fields changed, e.g. ``PRESET.replace(student_epochs=5)``."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        dataset="digits",
        train_subset=None,
        test_subset=None,
        batch_size=64,
        teacher_epochs=8,
        student_epochs=8,
        lr=0.05,
        seeds=(0, 1, 2),
        device="cpu",
        description="embedded scikit-learn digits on the CPU: every notebook in a couple of minutes",
    ),
    "lab": Preset(
        name="lab",
        dataset="cifar10",
        train_subset=10_000,
        test_subset=2_000,
        batch_size=128,
        teacher_epochs=15,
        student_epochs=15,
        lr=0.05,
        seeds=(0, 1, 2),
        device="auto",
        description="a 10,000-image CIFAR-10 subset: about 15 minutes on a laptop CPU, minutes on a GPU",
    ),
    "paper": Preset(
        name="paper",
        dataset="cifar100",
        train_subset=None,
        test_subset=None,
        batch_size=64,
        teacher_epochs=240,
        student_epochs=240,
        lr=0.05,
        seeds=(0, 1, 2),
        device="auto",
        description="the papers' schedules on full CIFAR-100 / ImageNet 64x64: hours on a GPU",
    ),
}


def get_preset(name: str | None = None) -> Preset:
    """Return the preset called ``name``, or the one named by ``$KDBOOK_PRESET`` (default ``quick``)."""
    chosen = name if name is not None else os.environ.get(PRESET_ENV_VAR, "quick")
    key = chosen.strip().lower()
    if key not in PRESETS:
        raise ValueError(
            f"Unknown preset {chosen!r}. Valid presets: {', '.join(PRESETS)}. "
            f"Set it with the environment variable {PRESET_ENV_VAR} or in the notebook's parameters cell."
        )
    return PRESETS[key]
