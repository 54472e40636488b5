"""The decode kernels behind ``flash_attn_with_kvcache`` (``kvcache_interface.py``): attention of a few query
tokens over a paged or dense KV cache (flash-decoding), and their launch arithmetic (``decode_launch.py``
launches them).

Kernel structure:
- one program per (KV split, row block x KV head, batch). The rows of a program are the ``Sq * group`` pairs
  (query token, query head of the KV group), padded to >= 16 so that ``tl.dot`` runs on tensor cores; each K/V
  tile is read once for the whole group.
- each sequence's visible keys (after the causal / window bounds of the row block) are cut into ``num_splits``
  ranges, a multiple of BLOCK_N each. With one split the kernel writes the output and LSE directly; with more it
  writes fp32 partial outputs and LSEs (one fp32 buffer), merged with the combine code of ``merge_attn_states``
  (``merge.lse_weights``) by ``_combine_splits_kernel`` (a second launch), or, when asked (``fused_combine``), by
  the last of the splits that hold keys in each (batch, row block, KV head) group (``merge.merge_split_rows``; an
  atomic ticket in a persistent counter that program resets: one launch, no memset; a sequence whose keys fit one
  split has that split write the result; see ``FUSED_COMBINE_MAX_GROUPS``).
- paged caches gather each tile's block ids from ``block_table`` (cast to int64 before multiplying by the block
  stride); dense caches use ``cache_batch_idx``. Strides are plain ints so Triton specialises on them.
The grid is sized from the cache capacity, never from ``cache_seqlens`` values (the launch itself needs no host
synchronisation; the public function checks index values on the host, see its docstring).
Both kernels launch with programmatic dependent launch where ``flashserve.kernels.pdl.enabled`` (``PDL``: every
program first waits for the previous kernel).
"""
import functools

import torch
import triton
import triton.language as tl

from flashserve.kernels._launch import CachedLauncher, next_power_of_2
from flashserve.kernels.merge import lse_weights, merge_split_rows, weighted
from flashserve.kernels.pdl import wait_for_previous

MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 64
# Paged K/V tiles are prefetched one tile ahead (their addresses come from a block-table load in the loop), so the
# memory parallelism comes from several programs per SM: the split heuristic aims at this many.
PROGRAMS_PER_SM = 4
# Split layouts with at most this many (batch, row block, KV head) groups merge their splits inside the decode
# kernel (one launch: the last program of each group combines); larger ones launch the combine kernel, which
# spreads the merge over more programs. 0 (off): on the H200 (2026-12-02, one call per graph, engine entry point)
# the one-launch form, merging all rows of a group at once, ties with two launches at H 32/8 (B1 L4096 17.2 vs
# 17.1 µs; it took 27.4 when it merged row by row) and loses at H 16/8 (B1 L4096 19.8 vs 17.3, B8 59.7 vs 51.0).
FUSED_COMBINE_MAX_GROUPS = 0
FUSED_COMBINE_MAX_ROWS = 16  # query rows (Sq x group) of a program that the in-kernel combine merges at once
MERGE_TILE_ELEMENTS = 4096  # fp32 elements of one [rows, splits, head_dim] tile of the in-kernel combine


def uses_fused_combine(splits: int, groups: int, rows: int) -> bool:
    """Whether a launch with ``splits`` splits, ``groups`` (batch x row blocks x KV heads) groups and ``rows``
    (Sq x group) query rows per sequence and KV head combines its splits inside the decode kernel."""
    return splits > 1 and groups <= FUSED_COMBINE_MAX_GROUPS and rows <= FUSED_COMBINE_MAX_ROWS


def merge_tile(rows: int, block_m: int, block_s: int, block_d: int) -> tuple[int, int]:
    """(MERGE_ROWS, MERGE_SPLITS) of the in-kernel combine: the program's query rows padded to a power of two, and
    the splits of one output tile (``MERGE_TILE_ELEMENTS`` fp32 at most, but at least one split)."""
    merge_rows = min(block_m, next_power_of_2(rows))
    return merge_rows, max(1, min(block_s, MERGE_TILE_ELEMENTS // (merge_rows * block_d)))


@triton.jit
def _store_result(out_ptr, lse_ptr, out, lse, batch, query, head, row_valid, seqlen_q, num_heads, head_dim, dims,
                  dim_valid):
    """Store the rows (query, head) of the one-launch decode's result: out (B, Sq, H, D) in out_ptr's dtype and the
    LSE (B, H, Sq), both contiguous."""
    rows = ((batch * seqlen_q + query) * num_heads + head) * head_dim
    tl.store(out_ptr + rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])
    tl.store(lse_ptr + (batch * num_heads + head) * seqlen_q + query, lse, mask=row_valid)


# Bounds that only clamp and mask are not specialised (seqlen_q and num_splits are: 1 is the common case).
@triton.jit(do_not_specialize=["capacity", "num_cache_rows", "window_left", "window_right"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr, block_table_ptr, batch_idx_ptr, seqlens_k_ptr, alibi_ptr,
    leftpad_ptr, key_start_ptr, counter_ptr, final_out_ptr, final_lse_ptr, capacity, num_cache_rows,
    seqlen_q, num_heads_k, head_dim, num_splits, sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_osplit, stride_oh, stride_lb, stride_ls, stride_lsplit, stride_lh,
    stride_block_table, stride_alibi,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    HAS_KEY_START: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FUSED_COMBINE: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_ROWS: tl.constexpr,
    MERGE_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # every input but the softmax scale comes from earlier kernels or copies
    split = tl.program_id(0)
    kv_head = tl.program_id(1) % num_heads_k
    row_start = (tl.program_id(1) // num_heads_k) * BLOCK_M
    batch = tl.program_id(2).to(tl.int64)

    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < seqlen_q * GROUP
    query = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim
    # Memory safety without host checks: the key range never passes the cache capacity (so the block-table walk
    # stays inside the table's width), a dense cache row outside the cache sees no key, and (below) a block id
    # outside the cache is clamped into it. Out-of-range metadata gives wrong numbers, never a wild access.
    seqlen_k = tl.minimum(tl.maximum(tl.load(seqlens_k_ptr + batch), 0), capacity)
    first_row = 0  # cache row of key 0 (the left pad of a dense cache)
    if not PAGED:
        cache_row = batch
        if HAS_BATCH_IDX:
            cache_row = tl.load(batch_idx_ptr + batch).to(tl.int64)
        if HAS_LEFTPAD:  # seqlens_k holds the end row: keys are the rows [pad, end)
            first_row = tl.minimum(tl.maximum(tl.load(leftpad_ptr + batch), 0), seqlen_k)
            seqlen_k = seqlen_k - first_row
        seqlen_k = tl.where((cache_row >= 0) & (cache_row < num_cache_rows), seqlen_k, 0)
    diagonal = query + seqlen_k - seqlen_q  # the key each row is aligned to (bottom right)

    key_lo = 0
    key_hi = seqlen_k
    if HAS_RIGHT:
        last_query = tl.minimum((row_start + BLOCK_M - 1) // GROUP, seqlen_q - 1)
        key_hi = tl.minimum(key_hi, last_query + seqlen_k - seqlen_q + window_right + 1)
    if HAS_LEFT:
        key_lo = tl.maximum(key_lo, row_start // GROUP + seqlen_k - seqlen_q - window_left)
    if HAS_KEY_START:  # keys before it are attended elsewhere (cascade attention's shared prefix)
        key_lo = tl.maximum(key_lo, tl.load(key_start_ptr))
    num_keys = tl.maximum(key_hi - key_lo, 0)
    keys_per_split = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    split_lo = key_lo + split * keys_per_split
    split_hi = tl.minimum(split_lo + keys_per_split, key_hi)

    q = tl.load(q_ptr + batch * stride_qb + query[:, None] * stride_qs + head[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + batch * stride_alibi + head, mask=row_valid, other=0.0).to(tl.float32)
    k_head_ptr = k_cache_ptr + kv_head * stride_kh + dims[None, :]
    v_head_ptr = v_cache_ptr + kv_head * stride_vh + dims[None, :]

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(split_lo, split_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < split_hi
        if PAGED:
            block = tl.load(block_table_ptr + batch * stride_block_table + keys // PAGE_SIZE, mask=key_valid,
                            other=0)
            # clamped, not masked: a mask that depends on the loaded ids costs 25-35% of the bandwidth (H200)
            block = tl.minimum(tl.maximum(block, 0), num_cache_rows - 1).to(tl.int64)
            k_offsets = block * stride_kb + (keys % PAGE_SIZE) * stride_ks
            v_offsets = block * stride_vb + (keys % PAGE_SIZE) * stride_vs
        else:
            k_offsets = cache_row * stride_kb + (first_row + keys).to(tl.int64) * stride_ks
            v_offsets = cache_row * stride_vb + (first_row + keys).to(tl.int64) * stride_vs
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_head_ptr + k_offsets[:, None], mask=kv_mask, other=0.0)
        v = tl.load(v_head_ptr + v_offsets[:, None], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP or HAS_ALIBI:
            scores = scores * sm_scale
            if HAS_SOFTCAP:
                scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
            if HAS_ALIBI:
                distance = tl.abs(diagonal[:, None] - keys[None, :]).to(tl.float32)
                scores = scores - slope[:, None] * distance
            scores = scores * 1.4426950408889634
        else:
            scores = scores * (sm_scale * 1.4426950408889634)
        visible = key_valid[None, :]
        if HAS_RIGHT:
            visible = visible & (keys[None, :] <= diagonal[:, None] + window_right)
        if HAS_LEFT:
            visible = visible & (keys[None, :] >= diagonal[:, None] - window_left)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    empty = row_sum == 0.0
    safe_sum = tl.where(empty, 1.0, row_sum)
    out = acc / safe_sum[:, None]
    lse = tl.where(empty, float("-inf"), row_max * 0.6931471805599453 + tl.log(safe_sum))
    lse_rows = lse_ptr + batch * stride_lb + query * stride_ls + head * stride_lh
    out_rows = out_ptr + batch * stride_ob + query * stride_os + head * stride_oh
    if FUSED_COMBINE:
        # One launch. The splits that hold keys (``active``: the same for every program of this (batch, row block,
        # KV head) group) each write a partial state and take a ticket on the group's persistent counter
        # (``counters.zeroed_counters``); the last to arrive merges them, all rows at once, and resets the counter
        # to 0 for the next launch. The barrier orders every thread's stores before the counter's release; the
        # acquire side reads the states past L1 (merge_split_rows). With one active split it writes the result
        # itself, and splits past the keys do nothing.
        active = tl.maximum(tl.cdiv(num_keys, tl.maximum(keys_per_split, 1)), 1)
        num_heads = num_heads_k * GROUP
        if active == 1:
            if split == 0:
                _store_result(final_out_ptr, final_lse_ptr, out, lse, batch, query, head, row_valid, seqlen_q,
                              num_heads, head_dim, dims, dim_valid)
        elif split < active:
            tl.store(out_rows[:, None] + split * stride_osplit + dims[None, :], out, mask=row_valid[:, None]
                     & dim_valid[None, :])
            tl.store(lse_rows + split * stride_lsplit, lse, mask=row_valid)
            tl.debug_barrier()
            counter = counter_ptr + batch * tl.num_programs(1) + tl.program_id(1)
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == active - 1:
                tl.store(counter, 0)
                merge_rows = row_start + tl.arange(0, MERGE_ROWS)
                merge_valid = merge_rows < seqlen_q * GROUP
                merge_query = merge_rows // GROUP
                merge_head = kv_head * GROUP + merge_rows % GROUP
                merged, merged_lse = merge_split_rows(
                    out_ptr, lse_ptr, batch * stride_ob + merge_query * stride_os + merge_head * stride_oh,
                    batch * stride_lb + merge_query * stride_ls + merge_head * stride_lh, merge_valid,
                    stride_osplit, stride_lsplit, active, dims, dim_valid, BLOCK_S, MERGE_SPLITS)
                _store_result(final_out_ptr, final_lse_ptr, merged, merged_lse, batch, merge_query, merge_head,
                              merge_valid, seqlen_q, num_heads, head_dim, dims, dim_valid)
    else:
        # A split past the sequence's end (short contexts under a split layout chosen for the cache capacity)
        # stores its LSE (-inf) alone: the combine never reads the output of an empty state.
        store_mask = row_valid[:, None] & dim_valid[None, :]
        if num_splits > 1:  # (a row vector, not a scalar: Triton's interpreter rejects a scalar in a mask)
            store_mask = store_mask & ((rows * 0 + split_lo) < split_hi)[:, None]
        tl.store(out_rows[:, None] + split * stride_osplit + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=store_mask)
        tl.store(lse_rows + split * stride_lsplit, lse, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    out_ptr, lse_ptr, part_ptr, seqlen_q, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """Merge the partial states written by ``_decode_kernel`` (SPLIT_OUTPUT layout, one buffer at ``part_ptr``)
    into out (B, Sq, H, D) and, with WRITE_LSE, lse (B, H, Sq), both contiguous."""
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)  # batch * seqlen_q + query
    batch = token // seqlen_q
    query = token % seqlen_q
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    head_valid = heads < NUM_HEADS
    dim_valid = dims < HEAD_DIM
    state_valid = head_valid[:, None] & (splits < num_splits)[None, :]
    state = (token * num_splits + splits[None, :]) * NUM_HEADS + heads[:, None]  # [BLOCK_H, BLOCK_S]
    part_lse_ptr = part_ptr + tl.num_programs(0).to(tl.int64) * num_splits * NUM_HEADS * HEAD_DIM
    part_lse = tl.load(part_lse_ptr + state, mask=state_valid, other=float("-inf"))
    weights, lse = lse_weights(part_lse)
    nonempty = state_valid & (part_lse > float("-inf"))
    part_out = tl.load(part_ptr + state[:, :, None] * HEAD_DIM + dims[None, None, :],
                       mask=nonempty[:, :, None] & dim_valid[None, None, :], other=0.0)
    out = tl.sum(weighted(part_out, weights[:, :, None]), axis=1)
    tl.store(out_ptr + (token * NUM_HEADS + heads[:, None]) * HEAD_DIM + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None] & dim_valid[None, :])
    if WRITE_LSE:
        tl.store(lse_ptr + (batch * NUM_HEADS + heads) * seqlen_q + query, lse, mask=head_valid)


# Launches with the Python cost of Triton's argument binding paid once per variant (_launch.CachedLauncher).
DECODE_LAUNCHER = CachedLauncher(_decode_kernel)
COMBINE_LAUNCHER = CachedLauncher(_combine_splits_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_splits: int, programs: int, capacity: int, device: torch.device) -> int:
    """Splits per sequence: ``num_splits`` if forced (clamped to 64), else as many as keep the grid within
    PROGRAMS_PER_SM programs per SM (132 SMs assumed off-GPU; rounding down avoids a lone tail wave) while keeping
    each split >= MIN_TOKENS_PER_SPLIT tokens of the cache capacity.

    A lone sequence (B1 L4096: 8 programs, one per KV head) gets 32 splits of 128 keys and a combine launch: with
    one split each program would walk 64 tiles one after the other, and at ~4 MB of K/V the time is the latency of
    that chain, not bandwidth, so the second (tiny) launch is the cheaper option."""
    if num_splits > 0:
        return min(num_splits, MAX_SPLITS)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    wanted = (PROGRAMS_PER_SM * sms) // max(programs, 1)
    return max(1, min(wanted, capacity // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


@functools.lru_cache(maxsize=4096)
def launch_config(batch: int, seqlen_q: int, num_heads: int, num_heads_k: int, head_dim: int, capacity: int,
                  num_splits: int, device: torch.device) -> tuple:
    """Everything about a launch that depends on shapes only, computed once per shape (host cost: ``triton``'s
    helpers are not free to call):
    (decode grid, splits, BLOCK_M, BLOCK_N, BLOCK_D, combine grid, BLOCK_H, BLOCK_S, combine num_warps)."""
    group = num_heads // num_heads_k
    block_m = max(16, min(64, next_power_of_2(seqlen_q * group)))
    row_blocks = -(-seqlen_q * group // block_m)
    block_d = max(16, next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    splits = choose_num_splits(num_splits, batch * num_heads_k * row_blocks, capacity, device)
    block_s = next_power_of_2(splits)
    block_h = min(next_power_of_2(num_heads), max(1, 4096 // (block_s * block_d)))
    combine_grid = (batch * seqlen_q, -(-num_heads // block_h))
    return ((splits, num_heads_k * row_blocks, batch), splits, block_m, block_n, block_d, combine_grid, block_h,
            block_s, 8 if block_s * block_d > 4096 else 4)


@functools.lru_cache(maxsize=4096)
def state_layout(batch: int, seqlen_q: int, num_heads: int, head_dim: int, splits: int) -> tuple:
    """Where the decode kernel writes its states, from the shapes alone: (number of partial states (0 with one
    split), output strides (batch, query, split, head), LSE strides (batch, query, split, head)). One split: the
    contiguous out (B, Sq, H, D) and lse (B, H, Sq); more: one fp32 buffer holding the partial outputs
    (B, Sq, splits, H, D), then their LSEs (B, Sq, splits, H)."""
    if splits == 1:
        return 0, (seqlen_q * num_heads * head_dim, num_heads * head_dim, 0, head_dim), \
            (num_heads * seqlen_q, 1, 0, seqlen_q)
    heads_per_query = splits * num_heads
    return (batch * seqlen_q * heads_per_query,
            (seqlen_q * heads_per_query * head_dim, heads_per_query * head_dim, num_heads * head_dim, head_dim),
            (seqlen_q * heads_per_query, heads_per_query, num_heads, 1))
