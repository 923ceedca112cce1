"""End to end on the real CIFAR-10: the loader, a zoo model and the training loop learn from real images.

Needs the JPEG copy of CIFAR-10 beside the repository (see ``conftest.cifar10_root``); skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdbook_utils.data import TensorLoader, load_dataset
from kdbook_utils.models import create_model
from kdbook_utils.train import evaluate, fit, seed_everything

pytestmark = pytest.mark.cifar


def test_resnet8_learns_real_cifar10_in_two_short_epochs(cifar10_root: Path) -> None:
    train = load_dataset("cifar10", "train", root=cifar10_root, subset=6_000, seed=0)
    test = load_dataset("cifar10", "test", root=cifar10_root, subset=1_000, seed=0)
    assert train.classes[0] == "airplane" and train.classes[-1] == "truck"
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8

    seed_everything(0)
    model = create_model("resnet8", train.num_classes)
    before = evaluate(model, TensorLoader(test, 500, train=False))["accuracy"]
    history = fit(
        model,
        TensorLoader(train, 128, train=True, seed=0),
        TensorLoader(test, 500, train=False),
        epochs=2,
        lr=0.1,
        progress=False,
    )

    # Chance is 10 %; an untrained net sits near it, two short epochs on 6,000 real images get well past it.
    assert before < 20  # percent
    assert history["val_acc"].iloc[-1] > 30
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
