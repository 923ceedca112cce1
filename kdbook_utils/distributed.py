"""Several processes training one model: the process-group helpers behind ``torchrun``.

PyTorch's launcher starts one process per GPU (or several on a CPU) and tells each who it is through
environment variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc_per_node=4 -m kdbook_utils run hinton --preset paper --out results/

Each process calls :func:`init` once; from then on the rest of the package notices the process group
and splits the work, with no change to the calling code:

* :class:`~kdbook_utils.data.TensorLoader` gives each process its own slice of every epoch;
* :func:`~kdbook_utils.train.fit` wraps the method in ``DistributedDataParallel`` (the gradients are
  averaged over the processes at every step), and adds up the loss sums, correct counts and validation
  scores of all processes, so every process's history is the history of the whole run;
* only the main process (rank 0) writes checkpoints and results files; the others wait for it.

Without a process group (a notebook, a plain ``python`` command) every helper here answers as for a
single process (rank 0 of 1) and costs nothing.

The backend is NCCL between GPUs and gloo between CPU processes.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_MINUTES",
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "init",
    "is_active",
    "is_main_process",
    "launched_by_torchrun",
    "local_device",
    "min_across_processes",
    "rank",
    "shutdown",
    "sum_across_processes",
    "world_size",
]

DEFAULT_TIMEOUT_MINUTES = 30.0
"""How long a process waits at a collective for the others before it gives up with an error."""

TIMEOUT_ENV_VAR = "KDBOOK_DIST_TIMEOUT_MINUTES"


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_active() -> bool:
    """Whether a process group of more than one process is running (then the work is split)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's number in the group, 0 (the main process) to ``world_size() - 1``; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many processes train together; 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The GPU of this process for a bare ``cuda`` device: ``cuda:LOCAL_RANK`` under ``torchrun``.

    Every other device (the CPU, an explicit ``cuda:N``) is returned as it is.
    """
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init(device: torch.device | str | None = None, *, timeout_minutes: float | None = None) -> bool:
    """Join the process group ``torchrun`` set up: NCCL for a CUDA ``device``, gloo otherwise.

    ``device`` is the device the processes train on (None: CUDA when this machine has a GPU, else the
    CPU; pass the one you give ``fit`` when it is another).

    Call it once per process before training. Returns True when a group of more than one process is
    running, False when this process runs alone (not started by ``torchrun``, or with one process), in
    which case nothing is set up. Calling it again does nothing more. On CUDA it also makes
    ``cuda:LOCAL_RANK`` this process's current GPU.

    ``timeout_minutes`` (default ``$KDBOOK_DIST_TIMEOUT_MINUTES``, else 30) bounds how long a process
    waits for the others at a collective operation: a process whose partner died raises instead of
    waiting forever. (``torchrun`` itself stops every process as soon as one of them fails.)
    """
    if dist.is_available() and dist.is_initialized():
        return is_active()
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError(
            "This PyTorch build has no torch.distributed, so it cannot train across processes; "
            "run without torchrun, or install a PyTorch build with distributed support."
        )
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    minutes = timeout_minutes if timeout_minutes is not None else float(
        os.environ.get(TIMEOUT_ENV_VAR, DEFAULT_TIMEOUT_MINUTES)
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    return is_active()


def shutdown() -> None:
    """Leave the process group (at the end of a run); nothing happens without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process got here (nothing happens in a single process)."""
    if is_active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Add ``tensor`` up over all processes, in place, and return it (unchanged in a single process).

    Every process ends with the same sum. Integer and float64 tensors are summed exactly as they are.
    """
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def min_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum of ``tensor`` over all processes, in place (unchanged in one process)."""
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_object(value: Any, source: int = 0) -> Any:
    """``value`` as process ``source`` has it, on every process (a picklable object)."""
    if not is_active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source, device=_collective_device())
    return holder[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order, on every process (``[value]`` in a single process)."""
    if not is_active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_tensors(tensors: list[torch.Tensor], source: int = 0) -> None:
    """Overwrite ``tensors`` in place with process ``source``'s values (nothing in a single process)."""
    if is_active():
        for tensor in tensors:
            dist.broadcast(tensor, src=source)


def _collective_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
