"""What fitting torch's threads to the container saves: one training epoch on 2 CPUs, with and without it.

    python bench/bench_container_threads.py [--cpus 2] [--host-cores 16] [--repeats 3] [--images 512]

A JupyterHub pod limited to 2 CPUs on a 64-core node: torch sizes its thread pool from the node (64
threads) unless ``import kdbook_utils`` fits it to the CPUs the pod may use (2 threads; see
``kdbook_utils.cpus``). This bench trains the same epoch, ResNet-20 (the teacher notebook 00 trains) on
``--images`` of the ``quick`` preset's training digits at its batch size, in fresh processes limited to
``--cpus`` CPUs, runs alternating:

* **fitted**: the threads ``import kdbook_utils`` chose (``kdbook_utils.THREADS``);
* **host-sized**: ``torch.set_num_threads(--host-cores)`` after the import, the pool torch builds on a
  ``--host-cores``-core node when only a CPU quota limits the pod: what students got before the fix.

The limit here is a CPU affinity (the processes are pinned to the first ``--cpus`` CPUs), not a cgroup
quota: writing a quota needs privileges this machine's users do not have, and torch already sizes its
pool from the affinity by itself, so forcing the pool to the host's size is how "without the fix" is
reproduced on a small machine. Under an affinity the surplus threads take turns on the same CPUs; under
a quota they spread over the node's cores and are all throttled when the quota is spent. Both are the
same oversubscription, and OpenMP's threads wait on each other at the end of every parallel region in
both. Each process trains two epochs and reports the second (the first warms the allocator up): its
wall time, and the CPU time the process spent (surplus threads burn CPU time waiting for each other).
The medians of ``--repeats`` runs are compared. Other work on the machine slows every run; the load
average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import kdbook_utils
from kdbook_utils.data import TensorLoader, preset_data
from kdbook_utils.lessons.hinton import SETTINGS
from kdbook_utils.models import create_model
from kdbook_utils.presets import get_preset
from kdbook_utils.train import fit, seed_everything


def one_epoch(threads: int, images: int) -> dict:
    """In a child process: train the epoch with ``threads`` (0: kdbook's choice) and say how long it took."""
    if threads:
        torch.set_num_threads(threads)
    preset = get_preset("quick")
    train = preset_data(preset).train
    train = train.subset(min(images, len(train)))
    seed_everything(0)
    model = create_model(SETTINGS["quick"].teacher, train.num_classes)
    loader = TensorLoader(train, preset.batch_size, train=True, seed=0, device="cpu")
    fit(model, loader, epochs=1, lr=preset.lr, device="cpu", progress=False)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    fit(model, loader, epochs=1, lr=preset.lr, device="cpu", progress=False)
    return {
        "threads": torch.get_num_threads(),
        "usable_cpus": kdbook_utils.THREADS.usable_cpus,
        "images": len(train),
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
    }


def run_child(threads: int, images: int, cpus: set[int]) -> dict:
    """``one_epoch`` in a fresh process pinned to ``cpus`` before Python starts (so kdbook sees the limit)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(threads), "--images", str(images)],
        capture_output=True, text=True, env=environment, check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the processes may use (the pod's limit)")
    parser.add_argument(
        "--host-cores", type=int, default=16, help="the node's cores, torch's pool without the fix"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=512, help="training images in the epoch")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_epoch(args.child, args.images)))
        return
    available = sorted(os.sched_getaffinity(0))
    if len(available) < args.cpus:
        raise SystemExit(
            f"--cpus {args.cpus}: this process may use {len(available)} CPUs; give at most that."
        )
    cpus = set(available[: args.cpus])
    sides = {"fitted (kdbook's choice)": 0, f"host-sized ({args.host_cores} threads)": args.host_cores}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for name, threads in sides.items():
            runs[name].append(run_child(threads, args.images, cpus))
    print(
        f"torch {torch.__version__}; pinned to CPUs {sorted(cpus)} of {os.cpu_count()}; "
        f"load average {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - started:.0f} s in all"
    )
    first = next(iter(runs.values()))[0]
    print(f"one epoch: {first['images']} images, ResNet-20, batch {get_preset('quick').batch_size}, float32")
    medians = {name: statistics.median(run["seconds"] for run in side) for name, side in runs.items()}
    fitted = medians[next(iter(sides))]
    for name, side in runs.items():
        each = ", ".join(f"{run['seconds']:.1f}" for run in side)
        cpu = statistics.median(run["cpu_seconds"] for run in side)
        ratio = medians[name] / fitted
        print(f"{name:28s} threads {side[0]['threads']:3d}: epoch {medians[name]:6.1f} s (x {ratio:.2f}; "
              f"runs {each}), CPU time {cpu:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
