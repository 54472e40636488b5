"""When a decode step runs cascade attention, and its metadata (``flashserve.context.SharedPrefix``).

With prefix caching, requests whose prompts start alike hold the very same cache blocks at the start of their
block lists. A decode step whose requests all share at least ``MIN_PREFIX_TOKENS`` tokens of such blocks, with at
least ``MIN_REQUESTS`` requests, attends in two parts (``flashserve.kernels.cascade``): the prefix once for the
whole batch, then each request's own suffix, merged by LSE. Below those sizes the plain decode is as fast (the
prefix is short, or read by few requests) and saves two launches per layer.

The prefix is the longest run of leading block ids common to every request of the batch (one group: the whole
batch), cut so that each request keeps at least its current token outside it. Cascade steps run eagerly (never
from a CUDA graph: the prefix length changes the launch grids); ``FLASHSERVE_CASCADE_ATTENTION=0`` switches
cascade attention off, and models with sliding windows never use it.
"""
import dataclasses
import os

import torch

from flashserve.context import AttentionContext, SharedPrefix
from flashserve.engine.request import Request

MIN_PREFIX_TOKENS = 256
MIN_REQUESTS = 8


def cascade_enabled() -> bool:
    """False when ``FLASHSERVE_CASCADE_ATTENTION=0``."""
    return os.environ.get("FLASHSERVE_CASCADE_ATTENTION", "1") != "0"


def shared_prefix_blocks(requests: list[Request], block_size: int, min_blocks: int = 1) -> int:
    """The number of leading blocks whose ids all ``requests`` share, at most ``num_computed_tokens // block_size``
    of each (the current token stays outside); 0 when that is fewer than ``min_blocks`` (>= 1). Block
    ``min_blocks - 1`` is compared first (O(1) per request, the usual rejection); then slices compare in C and a
    mismatch narrows by bisection."""
    first = requests[0].block_ids
    if len(first) < min_blocks:
        return 0
    probe = first[min_blocks - 1]
    if any(len(request.block_ids) < min_blocks or request.block_ids[min_blocks - 1] != probe
           for request in requests):
        return 0
    count = min(len(first), min(request.num_computed_tokens for request in requests) // block_size)
    if count < min_blocks:
        return 0
    for request in requests[1:]:
        ids = request.block_ids
        if ids[:count] == first[:count]:
            continue
        low, high = 0, count - 1  # the common length is in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            if ids[:middle] == first[:middle]:
                low = middle
            else:
                high = middle - 1
        count = low
        if count < min_blocks:
            return 0
    return count


def plan(requests: list[Request], block_size: int) -> int:
    """Blocks of the shared prefix a decode step of ``requests`` should run cascade attention over; 0: none."""
    if len(requests) < MIN_REQUESTS:
        return 0
    return shared_prefix_blocks(requests, block_size, -(-MIN_PREFIX_TOKENS // block_size))


def with_shared_prefix(context: AttentionContext, num_blocks: int, block_size: int) -> AttentionContext:
    """``context`` (a decode step's) with its ``shared_prefix`` set to the first ``num_blocks`` blocks. The tables
    are views of the step's block table; the small tensors are made on the device (no host sync)."""
    length = num_blocks * block_size
    batch = context.seqused_k.shape[0]
    device = context.seqused_k.device
    shared = SharedPrefix(
        block_table=context.block_table[:1, :num_blocks], length=length,
        seqused_k=torch.full((1,), length, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(0, batch + 1, batch, dtype=torch.int32, device=device),
        suffix_block_table=context.block_table[:, num_blocks:], suffix_seqused_k=context.seqused_k - length)
    return dataclasses.replace(context, shared_prefix=shared)
