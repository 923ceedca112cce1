"""Presets: how big a run is.

Every notebook has a cell tagged ``parameters`` that starts with ``PRESET = get_preset()``; the preset
comes from the ``KDBOOK_PRESET`` environment variable unless the cell names one. Without either, it is
``lab`` on Colab with a GPU (CIFAR-10 is fetched there on first use) and ``quick`` everywhere else, so
offline builds and a laptop never need the data.

=========  =======================================  ==========================================
preset     data                                     what it is for
=========  =======================================  ==========================================
quick      scikit-learn digits (embedded), CPU      a class session: minutes per notebook on a CPU
lab        CIFAR-10 (needs CIFAR on disk)           real images in class: shipped teachers
paper      the papers' data sets and schedules      reproducing the papers: GPU hours
smoke      a few hundred digits, one epoch          tests only: seconds; the numbers mean nothing
=========  =======================================  ==========================================

The measured running time of every notebook under each preset is recorded in
``kdbook_utils/results/timings.csv`` and shown in each notebook's introduction.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from kdbook_utils.errors import check_int, check_keywords, check_number, closest, must_be

PRESET_ENV_VAR = "KDBOOK_PRESET"
DATA_ROOT_ENV_VAR = "KDBOOK_DATA"


#: Device names a preset may ask for (``"cuda:N"`` picks the N-th GPU); ``"auto"`` picks CUDA, MPS or CPU.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class Preset:
    """One size of run. Lessons read these fields rather than hard-coding sizes.

    Every field is checked when a preset is made or changed (:meth:`replace`): a wrong name or value is
    an error that names it and says what would work, never a run that silently does something else.
    """

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
    val_size: int = 0
    """Images held out of the training split for validation (choices are made on them, never on test)."""
    train_teachers: bool = True
    """Whether a lesson trains a teacher that is neither cached nor shipped with the package. ``lab`` says
    no: its teachers ship with the package, and a lesson never spends a class on training one unless the
    learner asks (``PRESET.replace(train_teachers=True)``)."""
    cpu_bf16: bool = False
    """Train in bfloat16 autocast on CPUs that run it natively (the rule of
    :func:`~kdbook_utils.train.preset_precision`); on other CPUs, and on GPUs (which use mixed precision
    anyway), it changes nothing."""

    def __post_init__(self) -> None:
        for field in ("name", "dataset", "description"):
            value = getattr(self, field)
            if not isinstance(value, str) or (field != "description" and not value.strip()):
                raise TypeError(must_be(f"Preset {field}", "a non-empty string", value))
        for field in ("train_subset", "test_subset"):
            value = getattr(self, field)
            if value is not None:
                check_int(
                    f"Preset {field}", value, minimum=1, fix="It is a number of images; None uses them all."
                )
        check_int("Preset batch_size", self.batch_size, minimum=1, fix="Use e.g. 64 or 128.")
        for field in ("teacher_epochs", "student_epochs"):
            check_int(
                f"Preset {field}", getattr(self, field), minimum=1, fix="Use e.g. 8 (quick) or 15 (lab)."
            )
        check_number("Preset lr", self.lr, above=0.0, fix="It is the SGD learning rate, e.g. 0.05.")
        seeds = self.seeds
        if not isinstance(seeds, (tuple, list)) or not seeds:
            error = ValueError if isinstance(seeds, (tuple, list)) else TypeError
            raise error(
                must_be(
                    "Preset seeds", "a non-empty tuple of integers", seeds, "Use e.g. (0, 1, 2), or (0,)."
                )
            )
        checked = tuple(check_int("each of Preset seeds", seed, minimum=0) for seed in seeds)
        object.__setattr__(self, "seeds", checked)  # a list becomes a tuple: presets stay hashable
        _check_device(self.device)
        check_int(
            "Preset val_size", self.val_size, minimum=0, fix="It is how many training images to hold out."
        )
        for flag in ("cpu_bf16", "train_teachers"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(must_be(f"Preset {flag}", "True or False", getattr(self, flag)))

    def replace(self, **changes: object) -> Preset:
        """A copy with some fields changed, e.g. ``PRESET.replace(student_epochs=5)``.

        An unknown field lists the valid ones; a bad value is refused as in the constructor.
        """
        check_keywords("Preset.replace", changes, [field.name for field in dataclasses.fields(self)])
        return dataclasses.replace(self, **changes)


def _check_device(device: object) -> None:
    if not isinstance(device, str):
        raise TypeError(must_be("Preset device", "a string", device, f"Use one of {', '.join(DEVICES)}."))
    kind, _, index = device.strip().lower().partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(
            must_be(
                "Preset device",
                "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
                device,
                "'cuda' is an NVIDIA GPU; 'auto' uses a GPU when there is one, else the CPU.",
            )
        )


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
        val_size=288,
    ),
    "lab": Preset(
        name="lab",
        dataset="cifar10",
        train_subset=None,
        test_subset=None,
        batch_size=128,
        teacher_epochs=15,
        student_epochs=15,
        lr=0.05,
        seeds=(0, 1, 2),
        device="auto",
        description="real CIFAR-10 photos: the teachers ship with the package (trained on the 48,000 training "
        "images left after the validation hold-out); each lesson's students learn from a subset of them",
        val_size=2000,
        train_teachers=False,
        cpu_bf16=True,
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
        val_size=5000,
        cpu_bf16=True,
    ),
    "smoke": Preset(
        name="smoke",
        dataset="digits",
        train_subset=200,
        test_subset=100,
        batch_size=32,
        teacher_epochs=1,
        student_epochs=1,
        lr=0.05,
        seeds=(0, 1),
        device="cpu",
        description="for tests only: every notebook runs in seconds, and its numbers mean nothing",
        val_size=100,
    ),
}


def on_colab() -> bool:
    """Whether this Python runs in a Google Colab kernel (which imports ``google.colab`` at start-up)."""
    return "google.colab" in sys.modules


def default_preset_name() -> str:
    """The preset a notebook runs when nobody names one: ``lab`` on Colab with a GPU (real images in a few
    minutes), ``quick`` everywhere else (no files to fetch, minutes on a CPU)."""
    return "lab" if on_colab() and torch.cuda.is_available() else "quick"


def get_preset(name: str | None = None) -> Preset:
    """Return the preset called ``name``; without a name, the one named by ``$KDBOOK_PRESET``, and without
    that, :func:`default_preset_name`'s. This is the only place the environment is read: a notebook's
    parameters cell calls it once (``PRESET = get_preset()``) and passes the preset down, so
    ``KDBOOK_PRESET=lab`` and ``get_preset("lab")`` run the same."""
    chosen = name if name is not None else os.environ.get(PRESET_ENV_VAR) or default_preset_name()
    if not isinstance(chosen, str):
        raise TypeError(
            must_be("The preset name", "a string", chosen, f"Valid presets: {', '.join(PRESETS)}.")
        )
    key = chosen.strip().lower()
    if key not in PRESETS:
        raise ValueError(
            must_be(
                "The preset",
                f"one of {', '.join(PRESETS)}",
                chosen,
                f"Set it with the environment variable {PRESET_ENV_VAR} or in the notebook's parameters "
                f"cell.{closest(key, PRESETS)}",
            )
        )
    return PRESETS[key]
