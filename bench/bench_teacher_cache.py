"""What does a KD run cost over plain cross-entropy training, with and without the teacher-output cache?

    python bench/bench_teacher_cache.py [--teacher resnet20] [--student cnn-3x16] [--dataset digits]
                                        [--epochs 3] [--repeats 3] [--device cpu]

Trains the same student on the same data (the same shuffling and augmentation seed) four ways:

* ``CE only``: cross-entropy, no teacher (the baseline);
* ``KD, no cache``: Hinton KD running the teacher on every batch;
* ``KD, cold cache``: the first run of a sweep, which runs the teacher and stores its logits;
* ``KD, warm cache``: a later run of the sweep, which reads every batch's logits from the cache.

Each repeat runs the four in that order (the warm run reuses that repeat's cold cache); the medians over
repeats are compared. The target (lesson 1's issue): a warm-cache KD run costs at most 1.15x the
cross-entropy run. The teacher is randomly initialised: its weights do not change its cost. Times include
building the method (the warm run hashes the teacher's weights once) and ``fit``; no validation.
On a shared machine the numbers are noisy: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch
from torch import nn

from kdbook_utils.data import TensorLoader, load_dataset
from kdbook_utils.methods.hinton import HintonKD, TeacherCache
from kdbook_utils.models import create_model
from kdbook_utils.models.small_cnn import SMALL_CNN_FAMILY
from kdbook_utils.train import CrossEntropy, choose_device, fit, seed_everything

TARGET_WARM_RATIO = 1.15


def build(name: str, num_classes: int, in_channels: int, seed: int) -> nn.Module:
    """A zoo model, or a named member of the small-CNN family (e.g. ``cnn-3x16``)."""
    seed_everything(seed)
    if name in SMALL_CNN_FAMILY:
        return create_model("small_cnn", num_classes, in_channels=in_channels, **SMALL_CNN_FAMILY[name])
    return create_model(name, num_classes, in_channels=in_channels)


def timed_run(
    kind: str, args: argparse.Namespace, data: object, teacher: nn.Module, cache: TeacherCache | None
) -> float:
    """Seconds to build the method and train it for ``args.epochs`` epochs from a fresh loader."""
    device = choose_device(args.device)
    loader = TensorLoader(data, args.batch_size, train=True, device=device, seed=0)
    student = build(args.student, data.num_classes, int(data.images.shape[1]), seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    if kind == "ce":
        method: nn.Module = CrossEntropy(student)
    else:
        method = HintonKD(student, teacher, temperature=4.0, alpha=0.1, cache=cache,
                          data_fingerprint=loader.fingerprint if cache is not None else None)  # fmt: skip
    fit(method, loader, epochs=args.epochs, lr=0.05, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument(
        "--student", default="cnn-3x16", help=f"a zoo model or one of {list(SMALL_CNN_FAMILY)}"
    )
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--subset", type=int, default=None, help="training images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = load_dataset(args.dataset, "train", subset=args.subset)
    device = choose_device(args.device)
    teacher = build(args.teacher, data.num_classes, int(data.images.shape[1]), seed=0).to(device).eval()
    print(f"{args.student} student, {args.teacher} teacher, {len(data)} {args.dataset} images, batch "
          f"{args.batch_size}, {args.epochs} epochs, {args.repeats} repeats, device {device}")  # fmt: skip

    timed_run("ce", args, data, teacher, None)  # warm-up: first-call costs (kernels, allocator) paid here
    runs = ("CE only", "KD, no cache", "KD, cold cache", "KD, warm cache")
    wall: dict[str, list[float]] = {run: [] for run in runs}
    cpu: dict[str, list[float]] = {run: [] for run in runs}

    def record(run: str, seconds: tuple[float, float]) -> None:
        wall[run].append(seconds[0])
        cpu[run].append(seconds[1])

    for _ in range(args.repeats):
        record("CE only", timed_run("ce", args, data, teacher, None))
        record("KD, no cache", timed_run("kd", args, data, teacher, None))
        cache = TeacherCache()
        record("KD, cold cache", timed_run("kd", args, data, teacher, cache))
        passes = cache.teacher_passes
        record("KD, warm cache", timed_run("kd", args, data, teacher, cache))
        if cache.teacher_passes != passes:
            raise RuntimeError("The warm run ran the teacher: the cache missed.")

    wall_median = {run: statistics.median(values) for run, values in wall.items()}
    cpu_median = {run: statistics.median(values) for run, values in cpu.items()}
    table = pd.DataFrame(
        {
            "run": list(runs),
            "epochs": args.epochs,
            "wall s": [wall_median[run] for run in runs],
            "wall s / epoch": [wall_median[run] / args.epochs for run in runs],
            "x CE (wall)": [wall_median[run] / wall_median["CE only"] for run in runs],
            "CPU s": [cpu_median[run] for run in runs],
            "x CE (CPU)": [cpu_median[run] / cpu_median["CE only"] for run in runs],
        }
    )
    print(table.to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    for clock, medians in (("wall", wall_median), ("CPU", cpu_median)):
        cold = medians["KD, cold cache"] / medians["CE only"]
        warm = medians["KD, warm cache"] / medians["CE only"]
        verdict = "meets" if warm <= TARGET_WARM_RATIO else "misses"
        print(f"{clock:>4} time: cold cache {cold:.2f}x, warm cache {warm:.2f}x a CE-only run "
              f"({verdict} the <= {TARGET_WARM_RATIO}x target)")  # fmt: skip


if __name__ == "__main__":
    main()
