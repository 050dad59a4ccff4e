"""Data-parallel training across processes (``torchrun``) and device selection.

``torchrun --nproc-per-node N -m mmdm.engine.cli train ...`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; :func:`init_distributed` reads them, starts the
process group (``nccl`` on CUDA, ``gloo`` on CPU) and pins each process to
``cuda:LOCAL_RANK``. Without these variables everything runs in one process.

Conventions used by the trainer:

* ``batch_size`` is per process; one optimiser step consumes
  ``batch_size * world_size`` windows (the *global batch*), and
  DistributedDataParallel averages the gradients, so N processes with batch B
  take the same step as one process with batch N x B.
* Only rank 0 writes files (config, checkpoints, TensorBoard, records).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmdm.config import ConfigError
from mmdm.engine.rundir import device_name  # noqa: F401  (re-exported: it names the device)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly one-process) data-parallel job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed started the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment (0, 0, 1 if unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({e}); launch with torchrun") from e
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, local, world


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` if CUDA is available else CPU; ``"cuda"`` -> ``cuda:LOCAL_RANK``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{spec}' requested but CUDA is not available in this torch build/machine "
                              f"(torch {torch.__version__}); use --device cpu or auto.")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        idx = int(spec.split(":", 1)[1])
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device '{spec}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", idx)
    raise ConfigError(f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N")


def init_distributed(device: str = "auto") -> DistInfo:
    """Read the torchrun environment, pick the device and start the process group if needed."""
    rank, local, world = env_ranks()
    dev = resolve_device(device, local)
    if world == 1:
        return DistInfo(0, 0, 1, None, dev, False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world}
        if dev.type == "cuda":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
        owns = True
    return DistInfo(rank, local, world, backend, dev, owns)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


