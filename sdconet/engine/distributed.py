"""DDP process setup: process-group init from ``torchrun`` variables, devices, model unwrapping, the shard sampler.

``torchrun --nproc_per_node=N train/run.py ...`` sets RANK / LOCAL_RANK / WORLD_SIZE; without them everything runs in
one process and every helper here degrades to a no-op. Backend: nccl on CUDA, gloo on CPU.
The rank collectives live in :mod:`sdconet.utils.distributed` (the loss uses them too) and are re-exported here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from sdconet.utils.cpu import has_amx_bf16
from sdconet.utils.distributed import (all_ranks_true, average_over_ranks, barrier, broadcast_from_main,  # noqa: F401
                                       gather_lists, is_distributed, reduce_mean)
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when available, else CPU; anything else is passed to torch.device."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device='{preference}' but CUDA is not available on this machine; "
                               f"use --device cpu or auto")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def resolve_amp(amp: str | None, device: torch.device, cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """``train.amp`` for ``device``: ``"auto"`` -> ``"bf16"`` on a CPU with AMX-BF16 (its bf16 matmuls are several
    times its fp32 ones; without AMX, bf16 autocast is emulated and slower, so None), on CUDA ``"bf16"`` where the
    GPU supports it else ``"fp16"``; any other value is returned unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and has_amx_bf16(cpuinfo):
        return "bf16"
    return None


def init_distributed(device_preference: str = "auto") -> tuple[DistributedInfo, torch.device]:
    """Join the process group when launched by torchrun; return (info, device for this process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedInfo(), resolve_device(device_preference)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("distributed: rank %d/%d (local %d), backend %s, device %s", rank, world_size, local_rank, backend,
                device)
    return DistributedInfo(rank=rank, local_rank=local_rank, world_size=world_size), device


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a (Distributed)DataParallel wrapper (``model`` itself when it is not wrapped)."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


class ShardSampler(torch.utils.data.Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of a dataset of ``length`` items: every item on exactly one rank,
    no padding (``DistributedSampler`` repeats items to even out the shards, which would count them twice in AP)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: rank {rank} outside 0..{world_size - 1}")
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def needs_unused_parameter_search(model: torch.nn.Module, run_sr: bool) -> bool:
    """Whether DDP needs ``find_unused_parameters=True``: some trainable parameter may get no gradient in a step.

    A model that declares ``uses_all_parameters = True`` (SDCoNet: every trainable parameter is in each training
    step's graph) needs the search only when its SR decoder is trainable but not executed (``run_sr`` False); any
    other model is searched, as DDP cannot know.
    """
    module = unwrap_model(model)
    if not getattr(module, "uses_all_parameters", False):
        return True
    sr_decoder = getattr(module, "sr_decoder", None)
    return bool(sr_decoder is not None and not run_sr and any(p.requires_grad for p in sr_decoder.parameters()))


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
