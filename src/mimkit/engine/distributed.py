"""torchrun / DDP setup: gloo on CPU, NCCL on CUDA; a no-op for a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimkit.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (this process's local GPU) when present, else the CPU.

    Raises:
        ConfigError: ``cuda`` or ``cuda:N`` asked for where no such GPU is visible.

    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else local_rank
        if index >= count:
            seen = f"{count} GPU(s) visible" if count else "no CUDA GPU is visible"
            raise ConfigError(f"device {name!r} (index {index}) is not available: {seen}; "
                              "use cpu or auto")
        return torch.device("cuda", index)
    if name != "cpu":
        raise ConfigError(f"device {name!r} is unknown; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        This process's :class:`DistInfo`.

    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``value`` over ranks (returned unchanged for a single process)."""
    if not info.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def broadcast_from_main(values: list[int] | list[float], info: DistInfo) -> list[int] | list[float]:
    """Rank 0's ``values`` on every rank (returned unchanged for a single process).

    Decisions taken from a local clock (time budgets) must be taken once and shared, or the ranks
    would stop at different steps and the collective calls of the next step would hang; work that
    gives every rank the same numbers (dataset statistics) is done once. Integers travel as int64,
    a list with any float as float64, so a Python float arrives bit for bit. Every rank must pass
    as many values as rank 0.
    """
    if not info.distributed:
        return values
    kind = float if any(isinstance(v, float) for v in values) else int
    t = torch.tensor(values, dtype=torch.float64 if kind is float else torch.int64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return [kind(v) for v in t.tolist()]


def cleanup(info: DistInfo) -> None:
    """Leave the process group."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
