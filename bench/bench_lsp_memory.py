"""Does LSP's memory stay flat as the number of images grows? Peak memory and time of ``lsp_scores``.

    python bench/bench_lsp_memory.py [--images 1000 10000] [--one-shot-images 1000] [--arch NAME]

``kdbook_utils.methods.lsl.lsp_scores`` streams over the data and keeps only running sums (per-image
Gram sums, per-class feature sums), so its extra memory should not depend on the number of images, and
its time should grow linearly. For contrast, the script also runs the *one-shot* computation (collect
every layer's features for all images, then compute the Gram matrices), whose memory grows with the
number of images.

How memory is measured, and why: CPU tensors are allocated by PyTorch's C++ allocator, which Python's
``tracemalloc`` does not see, and PyTorch keeps no allocator statistics for the CPU. So each measurement
runs in a fresh subprocess that loads the images and builds the model, records its resident set size
(RSS, from ``/proc/self/statm``), runs the computation, and reads the process's peak RSS
(``resource.getrusage(...).ru_maxrss``). The difference, ``extra MiB``, is the memory the computation
itself needed at its peak (activations of one batch, hooks, running sums). It is an upper bound on live
tensors (the allocator may keep freed blocks), and honest for the comparison because both modes and both
sizes are measured the same way. Linux only (ru_maxrss is in KiB there).

Data: real CIFAR-10 training images when the project's JPEG zips are found (``$KDBOOK_CIFAR10_JPEG``,
else ``<repo>/../shared/data/cifar10-jpeg``), otherwise random uint8 images (memory and time do not
depend on pixel values). Model: the lesson's quarter-width LSL AlexNet teacher, untrained (the cost does
not depend on the weights), scored on all six layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar10_zip() -> Path:
    configured = os.environ.get("KDBOOK_CIFAR10_JPEG")
    return (
        Path(configured) if configured else REPO.parent / "shared" / "data" / "cifar10-jpeg"
    ) / "train.zip"


def load_images(count: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``count`` uint8 images (N, 3, 32, 32) with labels: CIFAR-10 from the zip, else random."""
    archive_path = cifar10_zip()
    if archive_path.is_file():
        from torchvision.io import decode_jpeg

        with zipfile.ZipFile(archive_path) as archive:
            members = sorted(name for name in archive.namelist() if name.lower().endswith(".jpg"))
            step = max(1, len(members) // count)  # every k-th file: all classes, deterministic
            members = members[::step][:count]
            images = [
                decode_jpeg(torch.frombuffer(bytearray(archive.read(name)), dtype=torch.uint8))
                for name in members
            ]
            labels = [CIFAR10_CLASSES.index(name.split("/")[-2]) for name in members]
        if len(images) < count:
            raise SystemExit(f"The CIFAR-10 zip holds only {len(images)} images; asked for {count}.")
        order = torch.randperm(
            count, generator=torch.Generator().manual_seed(0)
        )  # every prefix has all classes
        return (
            torch.stack(images)[order],
            torch.tensor(labels)[order],
            f"real CIFAR-10 training images from {archive_path}",
        )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % 10
    return images, labels, f"random uint8 images (no CIFAR-10 zip at {archive_path})"


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(data_file: str, count: int, mode: str, arch: str, batch_size: int) -> dict:
    """Runs in the child process: one computation, its time and its peak extra memory."""
    from kdbook_utils.data import ImageDataset, TensorLoader
    from kdbook_utils.features import FeatureExtractor
    from kdbook_utils.methods import lsl
    from kdbook_utils.models import create_model

    images, labels = torch.load(data_file, weights_only=True)
    images, labels = images[:count].clone(), labels[:count].clone()
    dataset = ImageDataset("cifar10", "train", images, labels, list(CIFAR10_CLASSES), (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = create_model(arch, 10).eval()
    loader = TensorLoader(dataset, batch_size, train=False)
    with torch.no_grad():
        model(next(iter(loader))[0])  # warm-up: one-off allocations are not the computation's
    before = current_rss_mib()
    started = time.perf_counter()
    if mode == "streaming":
        table = lsl.lsp_scores(model, loader)
    else:  # one-shot: every feature of every image in memory, then the same formulas
        layers = lsl.candidate_layers(model)
        collected: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        with torch.no_grad(), FeatureExtractor(model, layers, detach=True) as extractor:
            for batch, _ in loader:
                for layer, value in extractor(batch).items():
                    collected[layer].append(value)
        features = {layer: torch.cat(values) for layer, values in collected.items()}
        grams = {
            layer: lsl.LayerGrams(
                layer, previous, tuple(features[layer].shape[1:]),
                lsl.inter_layer_gram(features[previous], features[layer], group_size=lsl.DEFAULT_GROUP_SIZE),
                lsl.inter_class_gram(features[layer], labels, 10),
            )
            for previous, layer in zip(layers, layers[1:])
        }  # fmt: skip
        table = lsl.lsp_table(grams)
    seconds = time.perf_counter() - started
    return {
        "images": count,
        "mode": mode,
        "seconds": seconds,
        "baseline MiB": before,
        "peak MiB": peak_rss_mib(),
        "extra MiB": peak_rss_mib() - before,
        "LSP": table["LSP"].round(6).tolist(),
    }


def run_child(data_file: str, count: int, mode: str, arch: str, batch_size: int) -> dict:
    command = [sys.executable, __file__, "--child", data_file, str(count), mode, arch, str(batch_size)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"The measurement of {mode} at {count} images failed:\n{finished.stderr}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        data_file, count, mode, arch, batch_size = sys.argv[2:7]
        print(json.dumps(measure(data_file, int(count), mode, arch, int(batch_size))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--one-shot-images",
        type=int,
        nargs="*",
        default=[1000],
        help="sizes for the one-shot contrast (its memory grows: ~0.24 MB per image)",
    )
    parser.add_argument("--arch", default="alexnet_lsl_teacher_quarter")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    largest = max(args.images + args.one_shot_images)
    images, labels, source = load_images(largest)
    print(
        f"data: {source}; model: {args.arch} (untrained), batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    import pandas as pd

    with tempfile.TemporaryDirectory() as folder:
        data_file = str(Path(folder) / "images.pt")
        torch.save((images, labels), data_file)
        runs = [("streaming", count) for count in args.images] + [
            ("one-shot", c) for c in args.one_shot_images
        ]
        results = [run_child(data_file, count, mode, args.arch, args.batch_size) for mode, count in runs]
    table = pd.DataFrame(results)
    print(table.drop(columns=["LSP"]).round(2).to_string(index=False))

    streaming = table[table["mode"] == "streaming"].set_index("images")
    small, large = min(args.images), max(args.images)
    if small != large:
        print(
            f"\nstreaming, {large:,} vs {small:,} images ({large / small:.0f}x the data): "
            f"time x{streaming.loc[large, 'seconds'] / streaming.loc[small, 'seconds']:.2f}, "
            f"extra memory x{streaming.loc[large, 'extra MiB'] / max(streaming.loc[small, 'extra MiB'], 1e-9):.2f} "
            f"({streaming.loc[small, 'extra MiB']:.0f} -> {streaming.loc[large, 'extra MiB']:.0f} MiB)"
        )
    one_shot = table[table["mode"] == "one-shot"].set_index("images")
    for count in one_shot.index:
        if count in streaming.index:
            same = torch.allclose(
                torch.tensor(one_shot.loc[count, "LSP"]), torch.tensor(streaming.loc[count, "LSP"]), atol=1e-4
            )
            print(
                f"one-shot at {count:,} images: extra memory {one_shot.loc[count, 'extra MiB']:.0f} MiB vs "
                f"streaming {streaming.loc[count, 'extra MiB']:.0f} MiB; same LSP scores: {same}"
            )


if __name__ == "__main__":
    main()
