"""When a decode step runs cascade attention, and its metadata (``flashserve.context.SharedPrefix``).

With prefix caching, requests whose prompts start alike hold the very same cache blocks at the start of their
block lists. A decode step whose requests all share at least ``MIN_PREFIX_TOKENS`` tokens of such blocks, with at
least ``MIN_REQUESTS`` requests, and whose requests would read the shared keys ``MIN_SAVED_KEY_READS`` more times
in all than cascade does, attends in two parts (``flashserve.kernels.cascade``): the prefix once for the whole
batch, then each request's own suffix, merged by LSE. Below those sizes the plain decode is as fast (the prefix is
short, or read by few requests) and saves up to three launches per layer: at 8 KV heads of 128 (bf16) 8,192 key
reads are 32 MB per layer, ~8 µs of HBM time on an H200, about what the extra launches cost (an estimate, not a
measured crossover).

The prefix is the longest run of leading block ids common to every request of the batch (one group: the whole
batch), cut so that each request keeps at least its current token outside it. The kernels read the prefix length
on the device (``InputBuffers.shared_prefix_len``) and size their launches from the block table's width, so a
cascade step replays a CUDA graph captured for its padded batch size like a plain decode step (graphs of both kinds
are captured for the sizes from ``MIN_REQUESTS``); ``FLASHSERVE_CASCADE_ATTENTION=0`` switches cascade attention
off, and models with sliding windows never use it.
"""
import dataclasses
import os

import torch

from flashserve.context import AttentionContext, SharedPrefix
from flashserve.engine.request import Request

MIN_PREFIX_TOKENS = 256
MIN_REQUESTS = 8
MIN_SAVED_KEY_READS = 8192


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
    blocks = shared_prefix_blocks(requests, block_size, -(-MIN_PREFIX_TOKENS // block_size))
    return blocks if (len(requests) - 1) * blocks * block_size >= MIN_SAVED_KEY_READS else 0


def with_shared_prefix(context: AttentionContext, length: torch.Tensor) -> AttentionContext:
    """``context`` (a decode step's) running cascade attention over the first ``length`` keys of every request:
    ``length`` is a (1,) int32 device tensor holding a multiple of the block size (its value is read on the
    device)."""
    return dataclasses.replace(context, shared_prefix=SharedPrefix(length))
