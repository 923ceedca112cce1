"""The CPUs a process may use (cgroup quotas, CPU affinity) and torch's thread count fitted to them, with
fake cgroup trees under tmp_path and real processes pinned with ``taskset``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kdbook_utils.cpus import (
    cfs_quota_limit,
    cgroup_cpu_limit,
    cpu_max_limit,
    fit_torch_threads,
    usable_cpu_count,
)

REPO = Path(__file__).resolve().parents[1]


def fake_cgroups(root: Path, listing: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount under ``root/sys`` holding ``files`` (path -> contents) and a ``/proc/self/cgroup``
    with ``listing``; returns (cgroup root, proc file)."""
    mount = root / "sys"
    mount.mkdir()
    for name, text in files.items():
        (mount / name).parent.mkdir(parents=True, exist_ok=True)
        (mount / name).write_text(text)
    proc = root / "cgroup"
    proc.write_text(listing)
    return mount, proc


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Put torch's thread count back after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quota_files_are_read_as_cpus() -> None:
    assert cpu_max_limit("200000 100000\n") == 2.0
    assert cpu_max_limit("50000 100000") == 0.5
    assert cpu_max_limit("max 100000\n") is None
    assert cpu_max_limit("") is None
    assert cfs_quota_limit("150000\n", "100000\n") == 1.5
    assert cfs_quota_limit("-1", "100000") is None


@pytest.mark.parametrize(
    ("listing", "files", "cpus"),
    [
        # cgroup v2 inside a container with its own cgroup namespace: the limit sits at the mount's root.
        ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),
        # cgroup v2 seen from the host: the student's pod under kubepods; a parent's lower limit binds.
        (
            "0::/kubepods/pod1/kernel\n",
            {"kubepods/pod1/cpu.max": "150000 100000", "kubepods/pod1/kernel/cpu.max": "max 100000"},
            1.5,
        ),
        ("0::/a/b\n", {"a/cpu.max": "400000 100000", "a/b/cpu.max": "800000 100000"}, 4.0),
        # cgroup v1 (cpu and cpuacct mounted together); the container's mount is its own cgroup, so its
        # path from /proc/self/cgroup does not exist under it.
        (
            "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            3.0,
        ),
        # hybrid: v1 cpu controller beside a v2 tree without cpu.max
        (
            "1:cpu:/\n0::/\n",
            {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "50000", "unified/cgroup.procs": ""},
            2.0,
        ),
        # no limits: v1 quota -1, v2 "max"
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ("0::/\n", {"cpu.max": "max 100000"}, None),
        ("0::/\n", {}, None),
    ],
)
def test_the_cgroup_limit_is_the_smallest_quota_of_any_level(
    tmp_path: Path, listing: str, files: dict[str, str], cpus: float | None
) -> None:
    root, proc = fake_cgroups(tmp_path, listing, files)
    assert cgroup_cpu_limit(root, proc) == cpus


def test_without_cgroups_there_is_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no-proc-file") is None


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "usable"),
    [
        ("200000 100000", 64, 2),  # a 2-CPU quota on a 64-core node: 2, not 64
        ("150000 100000", 64, 2),  # 1.5 CPUs: rounded up
        ("50000 100000", 64, 1),  # half a CPU: at least one thread
        ("800000 100000", 4, 4),  # pinned to 4 CPUs under an 8-CPU quota: the affinity binds
        ("max 100000", 6, 6),  # no quota: the affinity
    ],
)
def test_usable_cpus_are_the_quota_or_the_affinity_whichever_is_smaller(
    tmp_path: Path, cpu_max: str, affinity: int, usable: int
) -> None:
    root, proc = fake_cgroups(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert usable_cpu_count(root, proc, affinity=affinity) == usable


def test_threads_are_lowered_to_the_quota_unless_the_user_chose_them(
    tmp_path: Path, torch_threads: None
) -> None:
    root, proc = fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    torch.set_num_threads(2)  # as if torch had sized its pool from a larger host
    kept = fit_torch_threads({"OMP_NUM_THREADS": "2"}, root, proc)
    assert (kept.usable_cpus, kept.threads_after, torch.get_num_threads()) == (1, 2, 2)
    assert "OMP_NUM_THREADS" in kept.reason
    assert fit_torch_threads({"MKL_NUM_THREADS": "2"}, root, proc).threads_after == 2
    lowered = fit_torch_threads({}, root, proc)
    assert (lowered.threads_before, lowered.threads_after, torch.get_num_threads()) == (2, 1, 1)


def test_threads_are_never_raised(tmp_path: Path, torch_threads: None) -> None:
    root, proc = fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "400000 100000"})
    torch.set_num_threads(1)  # e.g. the user's own set_num_threads(1) before importing kdbook_utils
    choice = fit_torch_threads({}, root, proc)
    assert choice.usable_cpus == min(
        4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4
    )
    assert choice.threads_after == 1 and torch.get_num_threads() == 1


THREADS_AFTER_IMPORT = (
    "import kdbook_utils, torch; print(torch.get_num_threads(), kdbook_utils.THREADS.usable_cpus)"
)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
@pytest.mark.parametrize(("omp", "expected"), [(None, "1 1"), ("2", "2 1")])
def test_a_process_pinned_to_one_cpu_trains_with_one_thread(omp: str | None, expected: str) -> None:
    environment = {
        key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    if omp is not None:
        environment["OMP_NUM_THREADS"] = omp
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", THREADS_AFTER_IMPORT],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == expected
