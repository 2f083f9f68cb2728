"""Collectives over the ranks of a ``torch.distributed`` process group, each an identity (or no-op) in one process.

The training loop, the evaluator and the loss all average or gather across ranks through these; the process-group setup
itself (torchrun variables, devices, DDP wrapping) lives in :mod:`sdconet.engine.distributed`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is True on every rank (used so all ranks skip a non-finite step together)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar logs across ranks (identity when not distributed)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def average_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean of scalar logs over the ranks that have the key (ranks may log different loss terms, e.g. a
    batch without boxes has no denoising terms), so unlike :func:`reduce_mean` the key sets may differ."""
    if not is_distributed():
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    keys = sorted(set().union(*gathered))
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}


def gather_lists(values: Sequence[list]) -> list[list]:
    """Concatenate each list over the ranks (rank order), on every rank; identity when not distributed.

    ``values``: a tuple of picklable lists of this rank -> the same number of lists holding every rank's items.
    """
    if not is_distributed():
        return [list(v) for v in values]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [list(v) for v in values])
    return [[item for rank_values in gathered for item in rank_values[i]] for i in range(len(values))]


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (identity when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
