"""Range checks of the values inside index tensors (block ids, lengths, slots, rows), for the public kernel functions.

Shapes and dtypes are checked without touching the device (``_validate``); values live on the GPU, so checking them
costs one host synchronisation per call (FlashAttention 2 pays the same for its ``block_table`` bound). Where the
Triton kernels run, ``flash_attn_with_kvcache``'s and ``flash_attn_varlen_func``'s checks are one small Triton
launch each (one flag word per sequence, copied to the host): no PyTorch ops, whose CUDA modules would each load
lazily on a process's first call (~10 ms apiece on an H200). Elsewhere each check builds a 0-dim bool tensor "this
is wrong" on the device; ``raise_first`` copies them all to the host at once and raises ValueError with the
message of the first that holds. The checks are skipped while a CUDA graph is being
captured (a synchronisation would break the capture): there, as on the engine's unchecked paths, the kernels' own
clamps and masks are what keep every access inside its tensor. ``flash_attn_with_kvcache``'s checks are also
skipped for index tensors that already passed them unchanged (``checked_indices``: the layers of a decode step).
"""
import functools

import torch
import triton
import triton.language as tl

from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import CachedLauncher, LaunchPlan, bounded_put, next_power_of_2
from flashserve.kernels.checked_indices import CheckedIndices
from flashserve.kernels.scratch import SCRATCH

# flash_attn_with_kvcache's index tensors that passed their value checks (see checked_indices).
KVCACHE_CHECKED = CheckedIndices()


@functools.lru_cache(maxsize=1)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (no synchronisation allowed)."""
    return _cuda_available() and torch.cuda.is_current_stream_capturing()


def raise_first(checks: list[tuple[torch.Tensor, str]]) -> None:
    """``checks``: (0-dim bool tensor that is True when the input is wrong, error message). One synchronisation for
    all of them; raises ValueError(message) for the first that is True."""
    if not checks:
        return
    flags = torch.stack([bad.reshape(()) for bad, _ in checks]).tolist()
    for flag, (_, message) in zip(flags, checks):
        if flag:
            raise ValueError(message)


def outside(values: torch.Tensor, low: int, high: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """0-dim bool: any of ``values`` (restricted to ``where``) outside [low, high)."""
    bad = (values < low) | (values >= high)
    if where is not None:
        bad = bad & where
    return bad.any()


def used_blocks_mask(block_table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
    """(B, max_blocks) bool: the block-table entries that hold one of the first ``seqlens[b]`` tokens."""
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    return columns[None, :] * page_size < seqlens[:, None]


def block_table_checks(block_table: torch.Tensor, seqlens: torch.Tensor, num_blocks: int, page_size: int,
                       lengths_name: str) -> list[tuple[torch.Tensor, str]]:
    """``seqlens`` (B,) (the tokens each sequence reads or writes) within the table's capacity and the block ids
    they use within [0, num_blocks)."""
    too_long, bad_id = _block_table_messages(block_table, num_blocks, page_size, lengths_name)
    return [((seqlens > block_table.shape[1] * page_size).any(), too_long),
            (outside(block_table, 0, num_blocks, used_blocks_mask(block_table, seqlens, page_size)), bad_id)]


def _block_table_messages(block_table: torch.Tensor, num_blocks: int, page_size: int, lengths_name: str):
    """(lengths past the table's capacity, block ids outside the cache): the errors name ``block_table``."""
    capacity = block_table.shape[1] * page_size
    return (f"block_table is too short: {block_table.shape[1]} blocks of {page_size} tokens hold {capacity} tokens, "
            f"fewer than {lengths_name}",
            f"block_table entries must be block ids in [0, {num_blocks}) (the cache's blocks)")


@triton.jit
def _bad_block_ids(block_table_ptr, batch, stride_table, width, page_size, num_tokens, num_blocks,
                   BLOCK_W: tl.constexpr):
    """1 if a block-table entry of row ``batch`` that holds one of its first ``num_tokens`` tokens is outside
    [0, num_blocks), else 0 (int32)."""
    bad = tl.zeros([BLOCK_W], tl.int32)
    for first in range(0, width, BLOCK_W):
        columns = first + tl.arange(0, BLOCK_W)
        used = (columns < width) & (columns * page_size < num_tokens)
        ids = tl.load(block_table_ptr + batch.to(tl.int64) * stride_table + columns, mask=used, other=0)
        bad = bad | (used & ((ids < 0) | (ids >= num_blocks))).to(tl.int32)
    return tl.max(bad, axis=0)


@triton.jit(do_not_specialize=["int_seqlen", "seqlen_new", "capacity", "num_rows", "num_blocks", "width"])
def _kvcache_check_kernel(seqlens_ptr, leftpad_ptr, batch_idx_ptr, block_table_ptr, flags_ptr, int_seqlen,
                          seqlen_new, capacity, num_rows, num_blocks, stride_table, width, page_size,
                          SEQLENS_TENSOR: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
                          PAGED: tl.constexpr, BLOCK_W: tl.constexpr):
    """All of ``flash_attn_with_kvcache``'s value checks for sequence ``program_id(0)`` in one launch: writes
    ``flags[b]``, one bit per failed check (the order of ``_KVCACHE_FAILURES``)."""
    batch = tl.program_id(0)
    start = tl.zeros((), tl.int32) + int_seqlen
    if SEQLENS_TENSOR:
        start = tl.load(seqlens_ptr + batch)
    end = start + seqlen_new
    flags = (start < 0).to(tl.int32) | ((end > capacity).to(tl.int32) << 1)
    if HAS_LEFTPAD:
        pad = tl.load(leftpad_ptr + batch)
        flags = flags | (((pad < 0) | (pad > start)).to(tl.int32) << 2)
    if HAS_BATCH_IDX:
        row = tl.load(batch_idx_ptr + batch)
        flags = flags | (((row < 0) | (row >= num_rows)).to(tl.int32) << 3)
    if PAGED:
        flags = flags | (_bad_block_ids(block_table_ptr, batch, stride_table, width, page_size, end, num_blocks,
                                        BLOCK_W) << 4)
    tl.store(flags_ptr + batch, flags)


KVCACHE_CHECK_LAUNCHER = CachedLauncher(_kvcache_check_kernel)


def _kvcache_failures(capacity: int, k_cache: torch.Tensor, block_table) -> list[str]:
    """The messages of the checks, in the bit order of ``_kvcache_check_kernel``."""
    if block_table is not None:
        too_long, bad_id = _block_table_messages(block_table, k_cache.shape[0], k_cache.shape[1],
                                                 "cache_seqlens + the new tokens")
    else:
        too_long, bad_id = f"cache_seqlens + the new tokens must be <= {capacity} (k_cache's length)", ""
    return ["cache_seqlens must be >= 0", too_long, "cache_leftpad must be in [0, cache_seqlens] for every sequence",
            f"cache_batch_idx entries must be rows of k_cache, in [0, {k_cache.shape[0]})", bad_id]


def _check_kvcache_in_one_launch(batch, cache_seqlens, seqlen_new, capacity, k_cache, block_table, cache_batch_idx,
                                 cache_leftpad) -> None:
    """The Triton path of ``check_kvcache_values``: one launch and one small copy to the host."""
    device = k_cache.device
    flags = SCRATCH.exact(device, batch, torch.int32)  # (written in full by the check, read back before it returns)
    seqlens_tensor = isinstance(cache_seqlens, torch.Tensor)
    key = (batch, None if seqlens_tensor else cache_seqlens, seqlen_new, capacity, k_cache.shape[0], k_cache.shape[1],
           None if block_table is None else (block_table.shape[1], block_table.stride()[0]),
           cache_batch_idx is None, cache_leftpad is None, device)
    plan = _CHECK_PLANS.get(key)
    if plan is None:
        width = block_table.shape[1] if block_table is not None else 0
        plan = KVCACHE_CHECK_LAUNCHER.plan((batch,), (
            0 if seqlens_tensor else cache_seqlens, seqlen_new, capacity, k_cache.shape[0], k_cache.shape[0],
            block_table.stride()[0] if block_table is not None else 0, width, k_cache.shape[1],
        ), dict(
            SEQLENS_TENSOR=seqlens_tensor, HAS_LEFTPAD=cache_leftpad is not None,
            HAS_BATCH_IDX=cache_batch_idx is not None, PAGED=block_table is not None,
            BLOCK_W=min(1024, next_power_of_2(max(width, 1))),
        ), num_warps=1)
        bounded_put(_CHECK_PLANS, key, plan, _MAX_CHECK_PLANS)
    plan((cache_seqlens if seqlens_tensor else flags, flags if cache_leftpad is None else cache_leftpad,
          flags if cache_batch_idx is None else cache_batch_idx, flags if block_table is None else block_table, flags))
    _raise_flagged(flags, lambda: _kvcache_failures(capacity, k_cache, block_table))


def _raise_flagged(flags: torch.Tensor, messages) -> None:
    """``flags``: a check kernel's (B,) int32 words, bit i set where check i failed (one copy to the host). Raises
    ValueError with the first failed check's message, ``messages()[i]`` (built only then)."""
    failed = 0
    for flag in flags.tolist():
        failed |= flag
    if not failed:
        return
    for bit, message in enumerate(messages()):
        if failed >> bit & 1:
            raise ValueError(message)


# The check launch of each geometry (the index tensors are int32 on k_cache's device: checked before).
_MAX_CHECK_PLANS = 256
_CHECK_PLANS: dict[tuple, LaunchPlan] = {}


def check_kvcache_values(batch: int, cache_seqlens, seqlen_new: int, capacity: int, k_cache: torch.Tensor,
                         block_table, cache_batch_idx, cache_leftpad) -> None:
    """The value checks of ``flash_attn_with_kvcache`` (``cache_seqlens`` a (B,) int32 tensor or an int): one
    Triton launch and one synchronisation where the kernels run, PyTorch ops on the reference path. Skipped while
    a graph is captured, and when these index tensors passed the same check unchanged (``KVCACHE_CHECKED``)."""
    seqlens_tensor = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    if batch == 0 or (seqlens_tensor is None and block_table is None and cache_batch_idx is None
                      and cache_leftpad is None) or capturing():
        return  # (an int length alone was checked on the host by decode_checks)
    tensors = (seqlens_tensor, block_table, cache_batch_idx, cache_leftpad)
    k_shape = k_cache.shape
    ints = (batch, -1 if seqlens_tensor is not None else cache_seqlens, seqlen_new, capacity, k_shape[0], k_shape[1])
    if KVCACHE_CHECKED.passed(tensors, ints):
        return
    _check_kvcache(batch, cache_seqlens, seqlen_new, capacity, k_cache, block_table, cache_batch_idx, cache_leftpad)
    KVCACHE_CHECKED.remember(tensors, ints)


def _check_kvcache(batch, cache_seqlens, seqlen_new, capacity, k_cache, block_table, cache_batch_idx,
                   cache_leftpad) -> None:
    if use_triton(k_cache):
        _check_kvcache_in_one_launch(batch, cache_seqlens, seqlen_new, capacity, k_cache, block_table,
                                     cache_batch_idx, cache_leftpad)
        return
    negative, too_long, bad_pad, bad_row, bad_id = _kvcache_failures(capacity, k_cache, block_table)
    ends = cache_seqlens + seqlen_new
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = ends = torch.full((batch,), ends, device=k_cache.device)
    checks = [((cache_seqlens < 0).any(), negative), ((ends > capacity).any(), too_long)]
    if cache_leftpad is not None:
        checks.append((((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).any(), bad_pad))
    if cache_batch_idx is not None:
        checks.append((outside(cache_batch_idx, 0, k_cache.shape[0]), bad_row))
    if block_table is not None:
        used = used_blocks_mask(block_table, ends, k_cache.shape[1])
        checks.append((outside(block_table, 0, k_cache.shape[0], used), bad_id))
    raise_first(checks)


@triton.jit(do_not_specialize=["total_q", "total_k", "num_blocks", "stride_table", "width"])
def _varlen_check_kernel(cu_q_ptr, cu_k_ptr, seqused_ptr, block_table_ptr, flags_ptr, total_q, total_k, num_blocks,
                         stride_table, width, page_size, HAS_CU_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
                         PAGED: tl.constexpr, BLOCK_W: tl.constexpr):
    """``flash_attn_varlen_func``'s value checks for sequence ``program_id(0)`` in one launch: writes ``flags[b]``,
    one bit per failed check (the order of ``_varlen_failures``)."""
    batch = tl.program_id(0)
    q_start = tl.load(cu_q_ptr + batch)
    q_end = tl.load(cu_q_ptr + batch + 1)
    flags = ((q_end < q_start) | (q_end > total_q) | ((batch == 0) & (q_start != 0))).to(tl.int32)
    keys = tl.zeros((), tl.int32)
    if HAS_CU_K:
        k_start = tl.load(cu_k_ptr + batch)
        k_end = tl.load(cu_k_ptr + batch + 1)
        keys = k_end - k_start
        if not PAGED:
            flags = flags | (((k_end < k_start) | (k_end > total_k) | ((batch == 0) & (k_start != 0))).to(tl.int32)
                             << 1)
    if PAGED:
        used = keys
        if HAS_SEQUSED:
            used = tl.load(seqused_ptr + batch)
        flags = flags | ((used < 0).to(tl.int32) << 2) | ((used > width * page_size).to(tl.int32) << 3)
        flags = flags | (_bad_block_ids(block_table_ptr, batch, stride_table, width, page_size, used, num_blocks,
                                        BLOCK_W) << 4)
    elif HAS_SEQUSED:
        used = tl.load(seqused_ptr + batch)
        flags = flags | (((used < 0) | (used > keys)).to(tl.int32) << 5)
    tl.store(flags_ptr + batch, flags)


VARLEN_CHECK_LAUNCHER = CachedLauncher(_varlen_check_kernel)


def _varlen_failures(q, k, seqused_k, block_table) -> list[str]:
    """The messages of the varlen checks, in the bit order of ``_varlen_check_kernel`` (and the order the PyTorch
    path raises them in)."""
    too_long = bad_id = ""
    if block_table is not None:
        too_long, bad_id = _block_table_messages(block_table, k.shape[0], k.shape[1],
                                                 "seqused_k" if seqused_k is not None else "the key lengths")
    return [f"cu_seqlens_q must start at 0, never decrease and end <= {q.shape[0]} (q's tokens)",
            f"cu_seqlens_k must start at 0, never decrease and end <= {k.shape[0]} (k's tokens)",
            "seqused_k must be >= 0" if seqused_k is not None else "cu_seqlens_k must never decrease", too_long,
            bad_id, "seqused_k must be in [0, cu_seqlens_k[b + 1] - cu_seqlens_k[b]] for every sequence"]


def _check_varlen_in_one_launch(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table) -> None:
    """The Triton path of ``check_varlen_values``: one launch and one small copy to the host (no PyTorch ops,
    whose CUDA modules would each load on a process's first call)."""
    batch = cu_seqlens_q.shape[0] - 1
    flags = SCRATCH.exact(q.device, batch, torch.int32)  # (written in full by the check, read back before it returns)
    paged = block_table is not None
    width = block_table.shape[1] if paged else 0
    VARLEN_CHECK_LAUNCHER(
        (batch,), (cu_seqlens_q, flags if cu_seqlens_k is None else cu_seqlens_k,
                   flags if seqused_k is None else seqused_k, flags if block_table is None else block_table, flags,
                   q.shape[0], k.shape[0], k.shape[0], block_table.stride()[0] if paged else 0, width,
                   k.shape[1] if paged else 1),
        dict(HAS_CU_K=cu_seqlens_k is not None, HAS_SEQUSED=seqused_k is not None, PAGED=paged,
             BLOCK_W=min(1024, next_power_of_2(max(width, 1)))), num_warps=1)
    _raise_flagged(flags, lambda: _varlen_failures(q, k, seqused_k, block_table))


def check_varlen_values(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q, cu_seqlens_k, seqused_k,
                        block_table) -> None:
    """The value checks of ``flash_attn_varlen_func``: cumulative lengths non-decreasing from 0 and within q / k,
    ``seqused_k`` within each sequence's keys (or the block table's capacity), block ids within the cache. One
    Triton launch and one synchronisation where the kernels run (PyTorch ops on the reference path and for an
    empty batch); skipped while a graph is captured."""
    if capturing():
        return
    if use_triton(q) and cu_seqlens_q.shape[0] > 1:
        _check_varlen_in_one_launch(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table)
        return
    bad_q, bad_k, negative_lengths, _, _, bad_seqused = _varlen_failures(q, k, seqused_k, block_table)
    checks = [(((cu_seqlens_q[0] != 0) | (cu_seqlens_q.diff() < 0).any() | (cu_seqlens_q[-1] > q.shape[0])), bad_q)]
    if cu_seqlens_k is not None and block_table is None:
        checks.append((((cu_seqlens_k[0] != 0) | (cu_seqlens_k.diff() < 0).any() | (cu_seqlens_k[-1] > k.shape[0])),
                       bad_k))
    if block_table is not None:
        seqlens = seqused_k if seqused_k is not None else cu_seqlens_k.diff()
        checks.append(((seqlens < 0).any(), negative_lengths))
        checks += block_table_checks(block_table, seqlens, k.shape[0], k.shape[1],
                                     "seqused_k" if seqused_k is not None else "the key lengths")
    elif seqused_k is not None:
        checks.append((((seqused_k < 0) | (seqused_k > cu_seqlens_k.diff())).any(), bad_seqused))
    raise_first(checks)


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """``slot_mapping`` entries < num_slots (negative entries are padding)."""
    if capturing() or slot_mapping.numel() == 0:
        return
    raise_first([((slot_mapping >= num_slots).any(),
                  f"slot_mapping entries must be < {num_slots} (num_blocks * block_size) or negative (padding)")])
