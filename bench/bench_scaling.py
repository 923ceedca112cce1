"""Scaling out on one machine: one process against two torchrun processes, and a grid on Ray.

    python bench/bench_scaling.py [--epochs 3] [--images 4096] [--grid-epochs 15] [--skip-ray]

Measured side by side in one run (a shared machine's load changes over minutes: the load average is
printed before and after each measurement):

1. **torchrun.** ResNet-8 trained with ``fit`` on ``--images`` random 32x32 images, global batch 128, for
   ``--epochs`` epochs: one process using every core, against ``torchrun --nproc_per_node=2`` with
   ``cores / 2`` threads each (the same optimisation steps; see ``fit``'s learning-rate rule). The
   training time is ``fit``'s (process 0's clock); the total adds starting the processes.
2. **Ray.** ``python -m kdbook_utils run hinton --preset quick --stage sweep`` with a grid of 8 student
   runs (temperatures 1, 4, 16 and the student alone, seeds 0 and 1, ``--grid-epochs`` epochs on all
   1,150 training digits), first one run after the other in one process using every core, then
   ``--ray`` with one CPU per run. The teacher is trained (and cached) before either.

Prints one line per measurement and the speed-ups. Without Ray installed (the ``scale`` extra) part 2 is
skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdbook_utils import distributed
from kdbook_utils.data import ImageDataset, TensorLoader
from kdbook_utils.models import create_model
from kdbook_utils.train import fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--set", "teacher=resnet8", "--set", "teacher_epochs=5", "--set", "temperatures=(1, 4, 16)",
        "--set", "alphas=(0.5,)", "--set", "sweep_seeds=(0, 1)", "--set", "student_images=None"]  # fmt: skip


def train_job(images: int, epochs: int, report: Path) -> None:
    """The training measured in part 1 (run alone or by every torchrun process)."""
    distributed.init("cpu")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (images,), generator=generator)
    data = ImageDataset(
        "random", "train", pixels, labels, [str(k) for k in range(10)], (0.5,) * 3, (0.25,) * 3
    )
    loader = TensorLoader(data, 128, train=True, device="cpu")
    seed_everything(0)
    model = create_model("resnet8", 10)
    started = time.perf_counter()
    history = fit(model, loader, epochs=epochs, lr=0.05, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    if distributed.is_main_process():
        report.write_text(json.dumps({"seconds": seconds, "train_loss": history["train_loss"].tolist(),
                                      "threads": torch.get_num_threads(), "processes": distributed.world_size()}))  # fmt: skip
    distributed.shutdown()


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def load() -> str:
    return "load average " + ", ".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--grid-epochs", type=int, default=15)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--train-job", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_job is not None:
        train_job(args.images, args.epochs, args.train_job)
        return

    cores = os.cpu_count() or 1
    print(f"{cores} cores, torch {torch.__version__}; {load()}")
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KDBOOK_CACHE": str(work / "cache"),
        "RAY_AUTH_MODE": "disabled",
    }
    job = [
        str(Path(__file__).resolve()),
        "--epochs",
        str(args.epochs),
        "--images",
        str(args.images),
        "--train-job",
    ]

    one_total = timed([sys.executable, *job, str(work / "one.json")], {**env, "OMP_NUM_THREADS": str(cores)})
    one = json.loads((work / "one.json").read_text())
    print(
        f"one process, {one['threads']} threads: fit {one['seconds']:.1f} s, total {one_total:.1f} s; {load()}"
    )
    two_total = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *job,
                       str(work / "two.json")], {**env, "OMP_NUM_THREADS": str(max(1, cores // 2))})  # fmt: skip
    two = json.loads((work / "two.json").read_text())
    print(f"torchrun, 2 processes x {two['threads']} threads: fit {two['seconds']:.1f} s, total {two_total:.1f} s; "
          f"{load()}")  # fmt: skip
    print(f"  speed-up of 2 processes: fit x{one['seconds'] / two['seconds']:.2f}, total x{one_total / two_total:.2f};"
          f" final training loss {one['train_loss'][-1]:.4f} (one) vs {two['train_loss'][-1]:.4f} (two)")  # fmt: skip

    if args.skip_ray or not ray_available():
        print("Ray part skipped" + ("" if ray_available() else ': Ray is not installed (the "scale" extra)'))
        return
    cli = [
        sys.executable,
        "-m",
        "kdbook_utils",
        "run",
        "hinton",
        "--preset",
        "quick",
        "--stage",
        "sweep",
        *GRID,
    ]
    timed(
        [*cli, "--set", "epochs=1", "--set", "sweep_seeds=(0,)", "--out", str(work / "warm")], env
    )  # the teacher
    cli += ["--set", f"epochs={args.grid_epochs}"]
    sequential = timed([*cli, "--out", str(work / "sequential")], env)
    print(f"8 runs one after the other, one process: {sequential:.1f} s; {load()}")
    on_ray = timed(
        [*cli, "--out", str(work / "ray"), "--ray", "--ray-cpus", str(cores), "--cpus-per-run", "1"], env
    )
    print(f"8 runs on Ray, {cores} CPUs, 1 per run: {on_ray:.1f} s (Ray's start included); {load()}")
    print(f"  speed-up of the Ray sweep: x{sequential / on_ray:.2f}")


if __name__ == "__main__":
    main()
