"""How many CPUs this process may really use, and torch's thread count fitted to them.

torch sizes its pool of intra-op threads from the machine, not from the container: on a JupyterHub node
with 64 cores and a limit of 2 CPUs per student (a cgroup CPU quota), every student's kernel starts 64
threads that take turns on 2 CPUs' worth of time, and training runs many times slower. Two things bound
the CPUs a process may use:

* the **cgroup CPU quota**: cgroup v2 ``cpu.max`` (``"200000 100000"``: 200 ms of CPU time per 100 ms,
  2 CPUs; ``"max 100000"``: no limit), or cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
  (a quota of ``-1``: no limit). A limit set on a parent cgroup binds too, so every level from the
  process's own cgroup up to the root counts;
* the **CPU affinity**: the CPUs the process may be scheduled on (``taskset``, a cpuset).

:func:`usable_cpu_count` is the smaller of the two; a fractional quota is rounded up (1.5 CPUs: 2
threads share the quota at full speed, 1 thread would leave half a CPU unused). At import,
``kdbook_utils`` calls :func:`fit_torch_threads`, which lowers torch's thread count to it unless the user
chose the threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ThreadChoice",
    "affinity_cpu_count",
    "cfs_quota_limit",
    "cgroup_cpu_limit",
    "cpu_max_limit",
    "fit_torch_threads",
    "usable_cpu_count",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables by which a user sets torch's thread count; when one is set, kdbook leaves it."""

# Where a cgroup v1 hierarchy holding the cpu controller is usually mounted, under the cgroup root.
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def cpu_max_limit(cpu_max: str) -> float | None:
    """CPUs allowed by the contents of a cgroup v2 ``cpu.max`` file: ``"200000 100000"`` -> 2.0;
    ``"max 100000"`` (no limit) or an unreadable line -> None."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return _ratio(parts[0], parts[1])


def cfs_quota_limit(quota_us: str, period_us: str) -> float | None:
    """CPUs allowed by cgroup v1's ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``: ``"150000"`` and
    ``"100000"`` -> 1.5; a quota of ``"-1"`` (no limit) -> None."""
    return _ratio(quota_us.strip(), period_us.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_value, period_value = int(quota), int(period)
    except ValueError:
        return None
    if quota_value <= 0 or period_value <= 0:
        return None
    return quota_value / period_value


def _levels(mount: Path, cgroup_path: str) -> Iterator[Path]:
    """The process's cgroup folder under ``mount`` and every parent up to ``mount`` itself (those that
    exist: inside a container the mount is often the container's own cgroup, and its path is not there)."""
    folder = mount / cgroup_path.strip("/")
    while True:
        if folder.is_dir():
            yield folder
        if folder == mount:
            return
        folder = folder.parent


def _read(path: Path) -> str:
    """The file's text, or "" when it is missing or unreadable (the parsers read "" as "no limit")."""
    try:
        return path.read_text()
    except OSError:
        return ""


def _v2_limits(cgroup_root: Path, cgroup_path: str) -> Iterator[float]:
    """The ``cpu.max`` limits along the process's v2 cgroup (mounted at the root, or at ``unified/``
    beside v1 hierarchies)."""
    for mount in (cgroup_root, cgroup_root / "unified"):
        for level in _levels(mount, cgroup_path):
            limit = cpu_max_limit(_read(level / "cpu.max"))
            if limit is not None:
                yield limit


def _v1_limits(cgroup_root: Path, cgroup_path: str) -> Iterator[float]:
    """The CFS quota limits along the process's v1 cgroup of the ``cpu`` controller."""
    for mount in sorted({cgroup_root / name for name in V1_CPU_MOUNTS}):
        for level in _levels(mount, cgroup_path):
            limit = cfs_quota_limit(_read(level / "cpu.cfs_quota_us"), _read(level / "cpu.cfs_period_us"))
            if limit is not None:
                yield limit


def cgroup_cpu_limit(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The CPUs this process's cgroups allow (the smallest limit of any level, v2 and v1), or None when
    none is set or there are no cgroups (macOS, Windows).

    ``proc_self_cgroup`` lists the process's cgroup per hierarchy (``0::/path`` for v2,
    ``4:cpu,cpuacct:/path`` for v1); the limits are read from the files under ``cgroup_root``.
    """
    limits: list[float] = []
    for line in _read(proc_self_cgroup).splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, cgroup_path = fields
        if controllers == "":
            limits += _v2_limits(cgroup_root, cgroup_path)
        elif "cpu" in controllers.split(","):
            limits += _v1_limits(cgroup_root, cgroup_path)
    return min(limits) if limits else None


def affinity_cpu_count() -> int:
    """The CPUs this process may be scheduled on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_cpu_count(
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> int:
    """The CPUs this process may really use: its cgroup quota, rounded up, or its CPU affinity
    (``affinity``, default: this process's), whichever is smaller; at least 1."""
    cpus = affinity_cpu_count() if affinity is None else affinity
    quota = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


@dataclass(frozen=True)
class ThreadChoice:
    """What :func:`fit_torch_threads` found and did: torch's threads before and after, and why."""

    usable_cpus: int
    threads_before: int
    threads_after: int
    reason: str


def fit_torch_threads(
    environ: Mapping[str, str] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
) -> ThreadChoice:
    """Lower torch's intra-op thread count to :func:`usable_cpu_count`, unless the user chose the threads.

    The user's choice is respected when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set. An earlier
    ``torch.set_num_threads(n)`` cannot be told apart from torch's own default (torch keeps no record of
    the call), so the count is only ever lowered, never raised: a user who set fewer threads than the
    usable CPUs keeps them. Someone who wants more threads than the quota allows calls
    ``torch.set_num_threads`` after importing ``kdbook_utils``, or sets ``OMP_NUM_THREADS``.
    """
    environ = os.environ if environ is None else environ
    before = torch.get_num_threads()
    usable = usable_cpu_count(cgroup_root, proc_self_cgroup)
    chosen = [name for name in THREAD_VARIABLES if environ.get(name, "").strip()]
    if chosen:
        return ThreadChoice(usable, before, before, f"{chosen[0]} is set: the user's choice is kept")
    if before <= usable:
        return ThreadChoice(usable, before, before, "torch's threads already fit the usable CPUs")
    torch.set_num_threads(usable)
    return ThreadChoice(usable, before, torch.get_num_threads(), "lowered to the usable CPUs")
