"""Which of fit's speed switches pay on this machine, and what do they do to accuracy?

    python bench/bench_speed_switches.py [--cifar FOLDER] [--seeds 3] [--epochs 4] [--threads T]

Part 1, speed (side by side in one run): ResNet-20 and the small CNN of lesson 1 trained by
``kdbook_utils.train.fit`` on batches of random 32x32 images, with each switch against today's default
(float32, batch 128, no compilation), runs alternating, medians of the repeats:

* ``amp="bf16"``: bfloat16 autocast (fast on CPUs with native bfloat16, such as Intel AMX);
* ``compile=True``: ``torch.compile`` of the student (its compilation time is reported separately);
* batch 256 instead of 128 (the same number of images per epoch).

Part 2, accuracy (paired by seed): ResNet-8 trained on a real CIFAR-10 subset (``--cifar``: a folder
with ``train/`` and ``test/`` image trees, e.g. the extracted test copy) for a few epochs with the default
and with each switch that paid in part 1; the comparison is ``kdbook_utils.experiments.compare``'s paired
mean difference with its 95 % interval. A switch should become a preset's default only where it wins on
both: faster, and no accuracy lost that the interval can tell apart from seed noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from kdbook_utils.data import DataSplits, TensorLoader, load_dataset
from kdbook_utils.experiments import compare, train_student
from kdbook_utils.models import create_model
from kdbook_utils.models.small_cnn import SMALL_CNN_FAMILY
from kdbook_utils.train import fit, seed_everything

SWITCHES = {
    "default": {},
    "bf16 autocast": {"amp": "bf16"},
    "torch.compile": {"compile": True},
    "batch 256": {"batch_size": 256},
}


def random_data(count: int) -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (count,), generator=generator)
    from kdbook_utils.data import ImageDataset

    data = ImageDataset(
        "random", "train", images, labels, [str(k) for k in range(10)], (0.5,) * 3, (0.25,) * 3
    )
    return DataSplits(data, data, data)


def speed(model_name: str, options: dict, switch: dict, data: DataSplits, epochs: int) -> tuple[float, float]:
    """(images per second of the timed epochs, seconds of the first epoch) for one switch."""
    seed_everything(0)
    model = create_model(model_name, 10, **options)
    batch = switch.get("batch_size", 128)
    loader = TensorLoader(data.train, batch, train=True, seed=0, device="cpu")
    settings = {k: v for k, v in switch.items() if k != "batch_size"}
    history = fit(model, loader, epochs=epochs, device="cpu", progress=False, **settings)
    timed = history["seconds"].iloc[1:]
    return len(data.train) * len(timed) / timed.sum(), float(history["seconds"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cifar", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--accuracy-only",
        nargs="+",
        default=None,
        metavar="SWITCH",
        help="skip the speed part; compare these switches with the default on accuracy",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    if args.accuracy_only:
        accuracy(args, args.accuracy_only)
        return
    data = random_data(2048)
    rows = []
    for model_name, options in (("resnet20", {}), ("small_cnn", SMALL_CNN_FAMILY["cnn-3x16"])):
        rates: dict[str, list[float]] = {name: [] for name in SWITCHES}
        first: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, switch in SWITCHES.items():
                rate, warmup = speed(model_name, options, switch, data, epochs=3)
                rates[name].append(rate)
                first[name] = warmup
        base = statistics.median(rates["default"])
        for name in SWITCHES:
            median = statistics.median(rates[name])
            rows.append(
                {
                    "model": model_name,
                    "switch": name,
                    "images/s": round(median),
                    "speed-up": round(median / base, 2),
                    "first epoch (s)": round(first[name], 1),
                }
            )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))

    if args.cifar is None:
        print("\n(no --cifar folder: the accuracy part is skipped)")
        return
    accuracy(
        args,
        [
            name
            for name in SWITCHES
            if name != "default"
            and table[(table["switch"] == name) & (table["model"] == "resnet20")]["speed-up"].iloc[0] > 1.05
        ],
    )


def accuracy(args: argparse.Namespace, paying: list[str]) -> None:
    """Part 2: ResNet-8 on real CIFAR-10 with the default and each switch in ``paying``, paired by seed."""
    train = load_dataset("cifar10", "train", root=args.cifar, subset=5000, seed=0)
    test = load_dataset("cifar10", "test", root=args.cifar, subset=2000, seed=0)
    splits = DataSplits(train, test, test)
    runs = []
    for seed in range(args.seeds):
        for name in ["default", *paying]:
            switch = SWITCHES[name]
            started = time.perf_counter()
            run = train_student(
                lambda: create_model("resnet8", 10),
                None,
                splits,
                seed=seed,
                epochs=args.epochs,
                batch_size=switch.get("batch_size", 128),
                device="cpu",
                **{k: v for k, v in switch.items() if k != "batch_size"},
            )
            runs += run.rows(method=name, seed=seed)
            print(
                f"seed {seed} {name}: {run.accuracy['test']['final']:.1f} % in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    comparison = compare(pd.DataFrame(runs), "default", split="test")
    print(
        comparison.table[["mean", "std", "difference", "ci_low", "ci_high", "verdict"]].round(2).to_string()
    )


if __name__ == "__main__":
    main()
