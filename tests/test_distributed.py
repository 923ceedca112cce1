"""Training across processes with torchrun: two CPU processes (gloo) against one, on a tiny job.

tests/distributed_job.py trains a small network without batch norm on random images; here it runs
alone and under ``torchrun --nproc_per_node=2``, each time in a subprocess with a time limit.

* Both processes end with identical weights, and the same history (but for each one's wall time).
* The two-process history equals the one-process history with the same global batch and learning rate
  (the rule :func:`kdbook_utils.train.fit` states) within a stated tolerance: the per-process gradients
  of half batches, averaged, are the gradient of the whole batch, so only the order of floating-point
  sums differs. Tolerance: losses and weights to 1e-4 (relative) after 3 epochs; accuracies to one image.
* Only process 0 writes the checkpoint; the other loads it.
* A process that fails stops the whole job: torchrun exits non-zero, the error text reaches stderr, and
  nothing hangs.

And a lesson's stage run through the command line under torchrun. Plus the sharding itself, in one process: the slices of every process together cover each global
batch exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbook_utils import distributed
from kdbook_utils.data import ImageDataset, TensorLoader
from kdbook_utils.experiments import read_results

JOB = Path(__file__).with_name("distributed_job.py")
ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = 300  # seconds for one job, torch imports of both processes included, on a busy 2-core machine
TOLERANCE = 1e-4


def run_job(
    out: Path, cache: Path, *, processes: int, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDBOOK_CACHE": str(cache), "OMP_NUM_THREADS": "1", "KDBOOK_DIST_TIMEOUT_MINUTES": "2",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([*launcher, str(JOB), str(out), *extra], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=TIME_LIMIT, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The job alone and with two processes: {"one": [rank 0], "two": [rank 0, rank 1]}."""
    results = {}
    for name, processes in (("one", 1), ("two", 2)):
        folder = tmp_path_factory.mktemp(name)
        done = run_job(folder / "out", folder / "cache", processes=processes)
        assert done.returncode == 0, (
            f"{name} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
        results[name] = [
            torch.load(folder / "out" / f"rank{r}.pt", weights_only=False) for r in range(processes)
        ]
    return results


def test_both_processes_end_with_identical_weights_and_history(runs: dict) -> None:
    first, second = runs["two"]
    assert first["state"].keys() == second["state"].keys()
    for name, tensor in first["state"].items():
        assert torch.equal(tensor, second["state"][name]), name
    wall_time = "seconds"  # each process's own clock
    assert {k: v for k, v in first["history"].items() if k != wall_time} == {
        k: v for k, v in second["history"].items() if k != wall_time
    }
    assert torch.equal(first["logits"], second["logits"])


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(runs: dict) -> None:
    (alone,), (together, _) = runs["one"], runs["two"]
    assert alone["batches"] == together["batches"] == 6  # 96 images, global batch 16: each process 8 per step
    one, two = alone["history"], together["history"]
    assert one["epoch"] == two["epoch"] == [1, 2, 3]
    for column in ("train_loss", "val_loss"):
        assert two[column] == pytest.approx(one[column], rel=TOLERANCE), column
    one_image = 100 / 96
    for column, step in (("train_acc", one_image), ("val_acc", 100 / 40)):
        assert all(abs(a - b) <= step + 1e-9 for a, b in zip(one[column], two[column])), column
    assert one["train_loss"][-1] < one["train_loss"][0]  # it learned something
    for name, tensor in alone["state"].items():
        assert torch.allclose(together["state"][name], tensor, rtol=TOLERANCE, atol=TOLERANCE), name
    # predict puts the processes' blocks of the validation set back in order
    assert torch.equal(together["labels"], alone["labels"])
    assert torch.allclose(together["logits"], alone["logits"], rtol=TOLERANCE, atol=TOLERANCE)


def test_only_process_zero_writes_the_checkpoint(runs: dict) -> None:
    first, second = runs["two"]
    assert len(first["cache_files"]) == 1 and first["cache_files"] == second["cache_files"]
    assert first["cache_files"][0].startswith("tiny_") and first["cache_files"][0].endswith(".pt")


def test_a_failing_process_stops_the_job_with_its_error(tmp_path: Path) -> None:
    done = run_job(tmp_path / "out", tmp_path / "cache", processes=2, extra=("--fail-on-rank", "1"))
    assert done.returncode != 0
    assert "process 1 failed on purpose in epoch 2" in done.stderr
    assert not (tmp_path / "cache" / "models").exists() or not list((tmp_path / "cache" / "models").iterdir())
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the shards


def tiny_data(count: int) -> ImageDataset:
    images = (
        torch.arange(count * 3 * 4 * 4, dtype=torch.int64).remainder(251).to(torch.uint8).view(count, 3, 4, 4)
    )
    return ImageDataset(
        "tiny", "train", images, torch.arange(count) % 3, ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3
    )


def shard(loader: TensorLoader, rank: int, world: int) -> TensorLoader:
    """The loader as process ``rank`` of ``world`` sees it (set as TensorLoader sets it under torchrun)."""
    loader.shards, loader.rank = world, rank
    loader.local_batch_size = loader.batch_size // world if loader.train else loader.batch_size
    return loader


@pytest.mark.parametrize("count", [24, 23, 21])
def test_training_shards_cover_each_global_batch_once(count: int) -> None:
    world, batch = 3, 6
    whole = TensorLoader(tiny_data(count), batch, train=True, seed=5, device="cpu", padding=1)
    slices = [shard(TensorLoader(tiny_data(count), batch, train=True, seed=5, device="cpu", padding=1), r, world)
              for r in range(world)]  # fmt: skip
    full_order = whole.epoch_plan(2).order
    used = count - count % world  # the last count mod world positions of the epoch sit this epoch out
    orders = [s.epoch_plan(2).order for s in slices]
    assert sorted(torch.cat(orders).tolist()) == sorted(full_order[:used].tolist())
    assert len({len(s) for s in slices}) == 1  # every process takes the same number of steps
    for step in range(len(slices[0])):
        together = torch.cat([o[step * 2 : step * 2 + 2] for o in orders])
        assert sorted(together.tolist()) == sorted(
            full_order[step * batch : min((step + 1) * batch, used)].tolist()
        )
    # process r's batch k is global batch k's images r, r + world, ..., cropped and flipped the same way
    global_batches = list(whole.epoch_batches(2))
    for rank, loader in enumerate(slices):
        for step, (images, labels) in enumerate(loader.epoch_batches(2)):
            reference_images, reference_labels = global_batches[step]
            assert torch.equal(images, reference_images[rank::world][: len(images)])
            assert torch.equal(labels, reference_labels[rank::world][: len(labels)])


def test_evaluation_shards_are_contiguous_blocks_covering_everything() -> None:
    data = tiny_data(10)
    blocks = [list(shard(TensorLoader(data, 2, train=False, device="cpu"), r, 3).epoch_plan(0).order)
              for r in range(3)]  # fmt: skip
    assert [len(b) for b in blocks] == [4, 3, 3]
    assert [int(i) for b in blocks for i in b] == list(range(10))


def test_a_global_batch_that_does_not_split_evenly_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with pytest.raises(ValueError, match=r"batch_size=10 is the global batch of 4 processes.*e\.g\. 8 or 12"):
        TensorLoader(tiny_data(20), 10, train=True, device="cpu")
    assert TensorLoader(tiny_data(20), 8, train=True, device="cpu").local_batch_size == 2
    assert TensorLoader(tiny_data(20), 8, train=True, device="cpu", shard=False).local_batch_size == 8


def test_one_process_does_not_shard() -> None:
    loader = TensorLoader(tiny_data(10), 4, train=True, device="cpu")
    assert (loader.shards, loader.rank, loader.local_batch_size) == (1, 0, 4)
    assert [len(labels) for _, labels in loader] == [4, 4, 2]


def test_a_lesson_runs_under_torchrun_through_the_command_line(tmp_path: Path) -> None:
    """Lesson 3's final stage on two processes: a method with two phases (a Gram phase that leaves the
    classifier out), cached teacher outputs per process, one results file written by process 0."""
    env = {**os.environ, "KDBOOK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "KDBOOK_DIST_TIMEOUT_MINUTES": "2", "PYTHONPATH": str(ROOT)}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "kdbook_utils", "run", "crosslayer", "--preset", "quick", "--stage", "final", "--seeds", "0", "1",
               "--set", "teachers=1", "--set", "teacher_epochs=1", "--set", "gram_epochs=1", "--set", "task_epochs=2",
               "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMIT, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("Wrote ") == 1  # process 0 alone writes and reports
    runs, provenance = read_results(tmp_path / "out" / "quick" / "crosslayer")
    assert provenance["executor"] == "torchrun, 2 processes"
    assert sorted(runs["seed"].unique()) == [0, 1] and set(runs["split"]) == {"val", "test"}
    assert runs["accuracy"].between(0, 100).all()
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1  # the teacher, saved once
