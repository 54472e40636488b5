"""The tensor-parallel group of this process — its rank and size — and the collectives the parallel layers use.

One process per rank: rank 0 drives the engine, the others follow (``flashserve.distributed.launch``). With a
group of size 1 (the default, no ``torch.distributed`` at all) every collective is the identity, so the parallel
layers are the plain ones. The group is ``torch.distributed``'s default group: NCCL on CUDA, gloo on the CPU.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(slots=True)
class _GroupState:
    rank: int = 0
    size: int = 1


_state = _GroupState()
# torch 2.13 renamed all_gather_into_tensor (still there, deprecated); torch 2.11 has only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tp_rank() -> int:
    """This process's rank in the tensor-parallel group (0 without one)."""
    return _state.rank


def tp_size() -> int:
    """The number of ranks of the tensor-parallel group (1 without one)."""
    return _state.size


def set_tp_group(rank: int, size: int) -> None:
    """Record the group the model about to be built is split over (``torch.distributed`` is initialised)."""
    _state.rank, _state.size = rank, size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place; returns it."""
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_columns(x: torch.Tensor) -> torch.Tensor:
    """(N, C) on every rank -> (N, size * C): rank r's columns at ``r * C``, on every rank.

    One all-gather (a collective that CUDA graphs capture, unlike a gather made of point-to-point sends)."""
    if _state.size == 1:
        return x
    gathered = torch.empty((_state.size * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    _all_gather_single(gathered, x.contiguous())
    return gathered.view(_state.size, x.shape[0], x.shape[1]).permute(1, 0, 2).reshape(x.shape[0], -1)


def broadcast_from_driver(x: torch.Tensor) -> None:
    """Overwrite ``x`` on every rank with rank 0's ``x``."""
    if _state.size > 1:
        dist.broadcast(x, src=0)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` of all ranks (e.g. the KV blocks that fit on every GPU)."""
    if _state.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
