"""How fast is TensorLoader next to torchvision's DataLoader with the same augmentation?

    python bench/bench_loader.py [--images 50000] [--device cpu|cuda] [--workers 2] [--batch-size 128]

Both loaders run one full training epoch (shuffle, RandomCrop(32, padding=4), RandomHorizontalFlip,
normalise) after a warm-up, and the script prints their images per second and the ratio side by side.
The DataLoader reads from a Dataset that, like torchvision's CIFAR10, turns each uint8 image into a PIL
image and applies ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize`` in
``num_workers`` worker processes. With ``--device cuda`` (and a GPU) it also times one epoch of ResNet-8
training fed by each loader.

Data: the real CIFAR-10 training images when the project's JPEG zips are found
(``$KDBOOK_CIFAR10_JPEG``, else ``<repo>/../shared/data/cifar10-jpeg``), otherwise random uint8 images.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdbook_utils.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, ImageDataset, TensorLoader

REPO = Path(__file__).resolve().parents[1]


def cifar10_zip_folder() -> Path:
    configured = os.environ.get("KDBOOK_CIFAR10_JPEG")
    return Path(configured) if configured else REPO.parent / "shared" / "data" / "cifar10-jpeg"


def load_benchmark_data(count: int) -> tuple[ImageDataset, str]:
    """``count`` CIFAR-10 training images decoded from the zip (no extraction), or random images."""
    archive_path = cifar10_zip_folder() / "train.zip"
    if archive_path.is_file():
        from torchvision.io import decode_jpeg

        images, labels = [], []
        with zipfile.ZipFile(archive_path) as archive:
            members = sorted(name for name in archive.namelist() if name.lower().endswith(".jpg"))
            chosen = (
                np.random.default_rng(0).permutation(len(members))[:count] if count < len(members) else None
            )
            members = members if chosen is None else [members[k] for k in sorted(chosen)]
            for name in members:
                data = torch.frombuffer(bytearray(archive.read(name)), dtype=torch.uint8)
                images.append(decode_jpeg(data))
                labels.append(CIFAR10_CLASSES.index(name.split("/")[-2]))
        if count > len(images):
            raise SystemExit(f"--images {count}: the CIFAR-10 zip holds only {len(images)} training images.")
        source = f"real CIFAR-10 training images ({len(images):,} JPEGs decoded from {archive_path})"
        image_tensor, label_tensor = torch.stack(images), torch.tensor(labels)
    else:
        generator = torch.Generator().manual_seed(0)
        image_tensor = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        label_tensor = torch.randint(0, 10, (count,), generator=generator)
        source = f"{count:,} random uint8 images 3x32x32 (no CIFAR-10 zip at {archive_path})"
    dataset = ImageDataset(
        "cifar10", "train", image_tensor, label_tensor, list(CIFAR10_CLASSES), CIFAR10_MEAN, CIFAR10_STD
    )
    return dataset, source


class PILImageDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: uint8 HWC array -> PIL image -> transforms."""

    def __init__(self, dataset: ImageDataset) -> None:
        from torchvision import transforms

        self.images = dataset.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = dataset.labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(dataset.mean, dataset.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def consume(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, limit: int | None = None) -> int:
    """Pull batches (moved to ``device``) and return how many images went by."""
    seen = 0
    for index, (images, labels) in enumerate(batches):
        if limit is not None and index >= limit:
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        seen += len(labels)
    synchronize(device)
    return seen


def time_epoch(make_batches, device: torch.device, warmup_batches: int) -> tuple[float, int]:
    consume(make_batches(), device, limit=warmup_batches)
    start = time.perf_counter()
    seen = consume(make_batches(), device)
    return time.perf_counter() - start, seen


def time_training_epoch(make_batches, device: torch.device, num_classes: int) -> float:
    from kdbook_utils.models import create_model

    torch.backends.cudnn.benchmark = True
    model = create_model("resnet8", num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_function = nn.CrossEntropyLoss()

    def run(limit: int | None) -> None:
        for index, (images, labels) in enumerate(make_batches()):
            if limit is not None and index >= limit:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss = loss_function(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)

    run(limit=20)  # warm-up: cuDNN autotuning, worker start-up
    start = time.perf_counter()
    run(limit=None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--warmup-batches", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the main process (default: torch's choice)",
    )
    arguments = parser.parse_args()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)

    if arguments.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here.")
    device = torch.device(arguments.device)
    dataset, source = load_benchmark_data(arguments.images)
    print(f"data:    {source}")
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    print(
        f"epoch:   {len(dataset):,} images, batch {arguments.batch_size}, shuffle + RandomCrop(32, padding=4) "
        f"+ RandomHorizontalFlip + Normalize, device {device}\n"
    )

    tensor_loader = TensorLoader(dataset, arguments.batch_size, train=True, device=device, flip=True)
    data_loader = torch.utils.data.DataLoader(
        PILImageDataset(dataset),
        batch_size=arguments.batch_size,
        shuffle=True,
        num_workers=arguments.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=arguments.workers > 0,
    )
    loaders = {
        f"TensorLoader (device={device.type})": lambda: iter(tensor_loader),
        f"torchvision DataLoader ({arguments.workers} workers)": lambda: iter(data_loader),
    }

    rows = []
    for name, make_batches in loaders.items():
        seconds, seen = time_epoch(make_batches, device, arguments.warmup_batches)
        rows.append((name, seen / seconds, seconds))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'loader':<{width}}  {'images/s':>12}  {'epoch (s)':>9}")
    for name, rate, seconds in rows:
        print(f"{name:<{width}}  {rate:>12,.0f}  {seconds:>9.2f}")
    print(f"\nratio TensorLoader / DataLoader: {rows[0][1] / rows[1][1]:.1f}x images/s")
    if os.getloadavg()[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(
            "note: the machine is busier than it has cores; with several torch threads per process the CPU "
            "timings suffer from oversubscription (threads wait for each other). Compare with --threads 1."
        )

    if device.type == "cuda":
        print("\nResNet-8, one training epoch (SGD, float32):")
        for name, make_batches in loaders.items():
            seconds = time_training_epoch(make_batches, device, dataset.num_classes)
            print(f"  {name:<{width}}  {seconds:6.2f} s  ({len(dataset) / seconds:,.0f} images/s)")


if __name__ == "__main__":
    main()
