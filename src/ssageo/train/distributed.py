"""torchrun / DistributedDataParallel setup: one process per device, gloo on CPU, NCCL on GPU.

``torchrun --nproc_per_node N -m ssageo train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in each process's environment; without them training runs in one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from ssageo.config import ConfigError
from ssageo.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its ``rank`` among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun, and pick this process's device.

    ``device`` is ``train.device`` (see ``ssageo.device.resolve_device``); with ``cuda`` each
    process takes the GPU of its ``LOCAL_RANK``, ``cuda:N`` pins one process to GPU N.
    Returns a DistInfo.
    """
    name = resolve_device(device, "train.device")
    use_cuda = name.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={device}: with several processes use cuda (each takes "
                          "the GPU of its LOCAL_RANK) or cpu")
    if use_cuda:
        index = int(name.split(":")[1]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={device}: process {local_rank} has no GPU of its "
                              f"own ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device(name)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def cpu_threads(setting: int | str, workers: int, world_size: int = 1) -> int:
    """Torch intra-op threads for a CPU process: ``setting`` when it is a number, else ("auto")
    ``OMP_NUM_THREADS`` when set, else this process's share of the cores minus its data-loader
    workers, at least 1.

    More runnable threads than cores is very costly here: on 2 cores, 2 torch threads plus one
    busy loader worker and one other process made training steps ~16x slower than 1 thread
    (OpenMP threads wait on each other whenever one of them is descheduled).
    """
    if setting != "auto":
        try:
            threads = int(setting)
        except (TypeError, ValueError):
            threads = 0
        if threads < 1:
            raise ConfigError(f"train.threads must be 'auto' or a positive number, got {setting!r}")
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, world_size) - workers)


def cleanup_distributed() -> None:
    """Tear the process group down (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every process, so all ranks take the same branch."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), readable before setup."""
    return int(os.environ.get("RANK", "0"))


def fail_once(error: Exception) -> NoReturn:
    """Stop every process on an error all of them found, with one message: the main process
    raises ``error`` (the CLI prints it), the others exit with the same status 2, silently."""
    if env_rank() == 0:
        raise error
    raise SystemExit(2)


def on_main(work: Callable[[], T], info: DistInfo) -> T | None:
    """Run ``work`` on the main process only, and let every process know how it went.

    Returns its result on the main process (None on the others). When it raises, the main
    process re-raises and the others exit with status 2 without a message, instead of waiting
    forever at the next collective call for a process that has stopped.
    """
    result, error = None, None
    if info.is_main:
        try:
            result = work()
        except Exception as exc:  # re-raised below, once every rank knows
            error = exc
    if not all_true(error is None, info.device):
        if error is not None:
            raise error
        raise SystemExit(2)
    return result
