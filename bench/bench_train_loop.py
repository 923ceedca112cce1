"""How much does ``kdbook_utils.train.fit`` cost over a bare, hand-written PyTorch loop?

    python bench/bench_train_loop.py [--device cpu|cuda] [--steps N] [--repeats R] [--threads T]

Trains ResNet-8 on batches of 128 random 32x32 images (generated once, on the device) and prints the
images/s of (a) a bare loop (zero_grad, forward, cross-entropy, backward, step) and (b) ``fit`` with the
same model, data, optimiser settings, memory format and precision. The two run alternately, ``R`` times
each, and the medians are compared: the target is an overhead under 5 %.

On the CPU it also measures the bare loop with glibc's default allocator against the tuned one
(:func:`kdbook_utils.train.configure_cpu_performance`), each with channels-first and channels-last
tensors. ``mallopt`` cannot be undone, so each of those four runs is its own subprocess, with
``KDBOOK_CPU_TUNING=0`` or ``1``.

Every rate is given per wall-clock second and per CPU second of the process. On a shared machine both
are noisy (compare ratios measured in the same run, not across runs); the CPU-second rate is the
steadier there, best with ``--threads 1`` (idle OpenMP threads spin, and spinning counts as CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.models import create_model
from kdbook_utils.train import choose_device, configure_cpu_performance, fit, seed_everything

BATCH_SIZE = 128
DISTINCT_BATCHES = 8  # random batches generated once and cycled through
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def make_batches(steps: int, device: torch.device, channels_last: bool) -> list[tuple[Tensor, Tensor]]:
    """``steps`` batches of random images and labels, already on ``device`` in the chosen memory format."""
    generator = torch.Generator().manual_seed(0)
    distinct = []
    for _ in range(DISTINCT_BATCHES):
        images = torch.randn(BATCH_SIZE, 3, 32, 32, generator=generator).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (BATCH_SIZE,), generator=generator).to(device)
        distinct.append((images, labels))
    return [distinct[step % DISTINCT_BATCHES] for step in range(steps)]


def make_model(device: torch.device, channels_last: bool) -> nn.Module:
    seed_everything(0)
    model = create_model("resnet8", 10).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    """Wall-clock seconds, and CPU seconds of this process (user + system, all its threads).

    On a busy shared machine the CPU seconds are the steadier measure of work done: time spent waiting
    for a core does not count. (Spinning OpenMP threads do count, so compare them at equal thread counts.)
    """

    wall: float
    cpu: float


@contextlib.contextmanager
def stopwatch(device: torch.device, result: list[Timing]) -> Iterator[None]:
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    synchronize(device)
    result.append(Timing(time.perf_counter() - wall, time.process_time() - cpu))


def bare_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> None:
    """The hand-written reference loop."""
    model.train()
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None  # as fit does
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def fit_loop(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device, channels_last: bool
) -> None:
    """One epoch of ``fit`` over the same batches, progress bars on (their output discarded)."""
    with contextlib.redirect_stderr(io.StringIO()):
        fit(
            model,
            batches,
            epochs=1,
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            schedule="constant",
            device=device,
            channels_last=channels_last,
            progress=True,
        )


def rates(images: int, timings: list[Timing]) -> tuple[float, float]:
    """Median images per wall-clock second and per CPU second."""
    return (
        images / statistics.median(t.wall for t in timings),
        images / statistics.median(t.cpu for t in timings),
    )


def compare_with_fit(device: torch.device, steps: int, repeats: int) -> None:
    channels_last = device.type in ("cpu", "cuda")  # fit's default
    amp_dtype = None  # fit's default: float32 unless the caller passes a precision
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit sets it
    batches = make_batches(steps, device, channels_last)
    bare_model, fit_model = make_model(device, channels_last), make_model(device, channels_last)
    optimizer = torch.optim.SGD(
        bare_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True
    )
    warm_up = batches[: max(3, steps // 10)]
    bare_loop(bare_model, optimizer, warm_up, device, amp_dtype)
    fit_loop(fit_model, warm_up, device, channels_last)

    bare_timings: list[Timing] = []
    fit_timings: list[Timing] = []
    for _ in range(repeats):  # alternate, so that a burst of load hits both
        with stopwatch(device, bare_timings):
            bare_loop(bare_model, optimizer, batches, device, amp_dtype)
        with stopwatch(device, fit_timings):
            fit_loop(fit_model, batches, device, channels_last)
    images = steps * BATCH_SIZE
    (bare_wall, bare_cpu), (fit_wall, fit_cpu) = rates(images, bare_timings), rates(images, fit_timings)
    print(
        f"device {device}, {torch.get_num_threads()} CPU threads, channels_last={channels_last}, "
        f"amp={amp_dtype}, {steps} steps x {repeats} repeats, batch {BATCH_SIZE}"
    )
    print("               images/s   images/CPU-s   (per-run images/s)")
    print(f"  bare loop : {bare_wall:10.0f} {bare_cpu:14.0f}   ({_runs(images, bare_timings)})")
    print(f"  fit       : {fit_wall:10.0f} {fit_cpu:14.0f}   ({_runs(images, fit_timings)})")
    print(
        f"  fit overhead per step: {100 * (bare_wall / fit_wall - 1):+.1f} % wall, "
        f"{100 * (bare_cpu / fit_cpu - 1):+.1f} % CPU (target < 5 %)"
    )


def _runs(images: int, timings: list[Timing]) -> str:
    return ", ".join(f"{images / t.wall:.0f}" for t in timings)


def bare_rates_in_this_process(steps: int, repeats: int, channels_last: bool) -> tuple[float, float]:
    """Images per second and per CPU second of the bare loop on the CPU (for the subprocesses)."""
    device = torch.device("cpu")
    configure_cpu_performance()  # obeys KDBOOK_CPU_TUNING
    batches = make_batches(steps, device, channels_last)
    model = make_model(device, channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True
    )
    bare_loop(model, optimizer, batches[:3], device, None)
    timings: list[Timing] = []
    for _ in range(repeats):
        with stopwatch(device, timings):
            bare_loop(model, optimizer, batches, device, None)
    return rates(steps * BATCH_SIZE, timings)


def compare_cpu_settings(steps: int, repeats: int) -> None:
    print("bare loop on the CPU, each setting in its own process:")
    print("                                         images/s   images/CPU-s")
    results = {}
    for tuning in ("0", "1"):
        for channels_last in (False, True):
            command = [
                sys.executable, __file__, "--bare-only", "--steps", str(steps), "--repeats", str(repeats),
                "--threads", str(torch.get_num_threads()),
            ] + (["--channels-last"] if channels_last else [])  # fmt: skip
            environment = {**os.environ, "KDBOOK_CPU_TUNING": tuning}
            output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
            measured = json.loads(output.stdout.strip().splitlines()[-1])
            results[(tuning, channels_last)] = (
                measured["images_per_second"],
                measured["images_per_cpu_second"],
            )
            print(f"  {_setting(tuning, channels_last):38s} {results[(tuning, channels_last)][0]:8.0f} "
                  f"{results[(tuning, channels_last)][1]:14.0f}")  # fmt: skip
    base_wall, base_cpu = results[("0", False)]
    print("  speed-up over default allocator + channels-first (wall, CPU):")
    for (tuning, channels_last), (wall, cpu) in results.items():
        if (tuning, channels_last) != ("0", False):
            print(f"    {_setting(tuning, channels_last):38s} x{wall / base_wall:.2f}  x{cpu / base_cpu:.2f}")


def _setting(tuning: str, channels_last: bool) -> str:
    allocator = "tuned allocator" if tuning == "1" else "default allocator"
    return f"{allocator} + {'channels-last' if channels_last else 'channels-first'}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per timed run (default 30 CPU, 300 GPU)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    if arguments.bare_only:  # a subprocess of compare_cpu_settings
        wall, cpu = bare_rates_in_this_process(arguments.steps, arguments.repeats, arguments.channels_last)
        print(json.dumps({"images_per_second": wall, "images_per_cpu_second": cpu}))
        return
    device = choose_device(arguments.device)
    steps = arguments.steps or (30 if device.type == "cpu" else 300)
    if device.type == "cpu":
        print(configure_cpu_performance())
    compare_with_fit(device, steps, arguments.repeats)
    if device.type == "cpu":
        compare_cpu_settings(steps, arguments.repeats)


if __name__ == "__main__":
    main()
