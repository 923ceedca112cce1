"""A tiny training job that tests/test_distributed.py runs with torchrun (2 CPU processes) and alone.

    python tests/distributed_job.py OUT [--fail-on-rank R]
    torchrun --standalone --nproc_per_node=2 tests/distributed_job.py OUT

It trains a small convolutional network without batch norm (so one process and two processes take the
same steps, up to the order of floating-point sums) on 96 random 8x8 images through
``experiments.cached_model`` (the cache is ``$KDBOOK_CACHE``), with a global batch of 16, augmentation,
validation after every epoch, then predicts the validation images. Each process writes
``OUT/rank<r>.pt``: its history, weights, predictions and the cache files it found. With
``--fail-on-rank R``, process ``R`` raises an error in the second epoch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from kdbook_utils import distributed
from kdbook_utils.data import ImageDataset, TensorLoader
from kdbook_utils.experiments import cached_model
from kdbook_utils.train import CrossEntropy, fit, predict, seed_everything

IMAGES, VAL_IMAGES, CLASSES, SIDE = 96, 40, 4, 8
GLOBAL_BATCH, EPOCHS, LR = 16, 3, 0.05


def random_images(count: int, seed: int, split: str) -> ImageDataset:
    """Images whose class shows in their mean brightness, so the network learns something."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    noise = torch.randint(0, 120, (count, 3, SIDE, SIDE), generator=generator)
    images = (noise + 40 * labels.view(-1, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
    return ImageDataset("random", split, images, labels, [str(k) for k in range(CLASSES)],
                        mean=(0.5,) * 3, std=(0.25,) * 3)  # fmt: skip


def small_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )


class FailsOnRank(CrossEntropy):
    """Cross-entropy training that raises in epoch 2 on one process (a crashing worker)."""

    def __init__(self, student: nn.Module, failing_rank: int) -> None:
        super().__init__(student)
        self.failing_rank = failing_rank

    def on_batch_start(self, epoch: int, batch: int) -> None:
        super().on_batch_start(epoch, batch)
        if epoch == 1 and distributed.rank() == self.failing_rank:
            raise RuntimeError(f"process {self.failing_rank} failed on purpose in epoch 2, batch {batch + 1}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fail-on-rank", type=int, default=None)
    args = parser.parse_args()
    distributed.init("cpu")
    torch.set_num_threads(1)
    train = TensorLoader(random_images(IMAGES, 0, "train"), GLOBAL_BATCH, train=True, seed=3, device="cpu",
                         padding=1)  # fmt: skip
    val = TensorLoader(random_images(VAL_IMAGES, 1, "val"), 7, train=False, device="cpu")

    def build(will_train: bool) -> nn.Module:
        seed_everything(0)
        return small_network()

    def train_it(model: nn.Module):
        method = model if args.fail_on_rank is None else FailsOnRank(model, args.fail_on_rank)
        return fit(method, train, val, epochs=EPOCHS, lr=LR, device="cpu", progress=False)

    trained = cached_model("tiny", {"job": "distributed test"}, build,
                           train_it, device="cpu", quiet=True)  # fmt: skip
    logits, labels = predict(trained.model, val, device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "history": trained.history.to_dict("list"),
            "state": trained.model.state_dict(),
            "logits": logits,
            "labels": labels,
            "batches": len(train),
            "cache_files": sorted(os.listdir(trained.path.parent)),
        },
        args.out / f"rank{distributed.rank()}.pt",
    )
    distributed.shutdown()


if __name__ == "__main__":
    main()
