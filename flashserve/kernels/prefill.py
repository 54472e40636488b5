"""The prefill attention kernel family: one Triton kernel for dense, varlen and paged inputs, and its launcher.

Layouts follow FlashAttention: q (B, Sq, H, D) or (total_q, H, D); k/v (B, Sk, Hk, D), (total_k, Hk, D) or paged
caches (num_blocks, page_size, Hk, D). Any stride except the last one is accepted and passed as a plain int, so
Triton specialises the kernel on it (a multiple of 16 gives vector loads): strided views run at full speed.

A program owns BLOCK_M tile rows of one (batch, head) pair. Without GQA packing a row is one query position;
with packing (short queries and H > Hk) row ``r`` is query position ``r // G`` of query head ``r % G`` of the
KV head's group, so each K/V tile is read once for the whole group. The KV range of a tile is cut into three
parts: masked tiles left of the fully visible block, unmasked tiles, masked tiles on the right (diagonal, window
edge, sequence end); fully masked tiles are never visited. Softmax runs in fp32 with exp2 and a scale
pre-multiplied by log2(e); the natural-log LSE is written for every row (-inf and a zero output for rows that
see no key). Query tiles run longest first so causal work balances across the GPU.

On Hopper the common case (dense or unpaged varlen, no window/softcap/ALiBi) runs ``prefill_tma``'s kernel instead
(``FLASHSERVE_PREFILL_KERNEL`` chooses: see there).
"""
import contextlib

import torch
import triton
import triton.language as tl

from flashserve.kernels._launch import cdiv, next_power_of_2
from flashserve.kernels.kv_layout import KV_DENSE, KV_PAGED, KV_VARLEN, kv_row_offsets, sequence_bounds
from flashserve.kernels.online_softmax import online_softmax_step
from flashserve.kernels.prefill_tuning import (
    HEAD_PACKING_MAX_QUERY,
    TUNED_CONFIGS,
    default_config,
    length_class,
    prune_configs,
    use_autotune,
)
from flashserve.kernels.prefill_tma import tma_prefill_attention, use_tma
from flashserve.kernels.tuning_cache import PersistentTuning

LOG2E = 1.4426950408889634

@triton.jit
def _attend_range(acc, l_i, m_i, q, lo, hi, pos, slope, seqlen_k, diag, window_left, window_right,
                  k_ptr, v_ptr, k_base, v_base, block_table_row, num_blocks, offs_d, qk_scale, softcap_log2,
                  stride_kb, stride_ks, stride_vb, stride_vs,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, RAW_SCORES: tl.constexpr,
                  KV_LAYOUT: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key tiles starting at lo, lo + BLOCK_N, ... < hi (lo is BLOCK_N-aligned)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            in_seq = cols < seqlen_k
        else:
            in_seq = offs_n < BLOCK_N
        k_rows = kv_row_offsets(start_n, offs_n, in_seq, block_table_row, num_blocks, k_base, stride_kb,
                                stride_ks, KV_LAYOUT, PAGE_SIZE, BLOCK_N)
        v_rows = kv_row_offsets(start_n, offs_n, in_seq, block_table_row, num_blocks, v_base, stride_vb,
                                stride_vs, KV_LAYOUT, PAGE_SIZE, BLOCK_N)
        if MASKED:
            kv_mask = in_seq[:, None] & d_mask
            k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        elif BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :])
            v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :])
        else:
            k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=d_mask, other=0.0)
            v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=d_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            # softcap * tanh(x / softcap), tanh(t) = 1 - 2 / (exp(2t) + 1); qk_scale holds 2 * scale * log2(e) / cap
            s = softcap_log2 * (1.0 - 2.0 / (tl.exp2(qk * qk_scale) + 1.0))
        elif RAW_SCORES:
            s = qk  # scaled below, inside the exponent's FMA
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            dist = tl.abs((pos + diag)[:, None] - cols[None, :]).to(tl.float32)
            s = s - slope[:, None] * dist
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if HAS_RIGHT:
                visible = visible & (cols[None, :] <= (pos + diag + window_right)[:, None])
            if HAS_LEFT:
                visible = visible & (cols[None, :] >= (pos + diag - window_left)[:, None])
            s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, qk_scale, RAW_SCORES, MASKED, DOT_PRECISION)
    return acc, l_i, m_i


# Scalars that only bound loops and masks are not specialised (Triton compiles a variant per "== 1" / "multiple of
# 16" class of each int argument): token counts and lengths change with every batch, the tuning classes are only
# the autotuner's keys. Strides stay specialised (their divisibility gives vector loads).
@triton.jit(do_not_specialize=["total_q", "total_k", "seqlen_q_dense", "seqlen_k_dense", "window_left",
                               "window_right", "tune_seqlen_q", "tune_seqlen_k", "max_blocks", "num_blocks"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, block_table_ptr, alibi_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_tb, stride_ab, max_blocks, num_blocks, total_q, total_k,
    seqlen_q_dense, seqlen_k_dense,
    qk_scale, softcap_log2, window_left, window_right,
    tune_seqlen_q, tune_seqlen_k,
    GROUP: tl.constexpr, HEADS_PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN_Q: tl.constexpr, KV_LAYOUT: tl.constexpr, HAS_SEQUSED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    RAW_SCORES: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    head_prog = tl.program_id(0)
    batch = tl.program_id(1)
    tile = tl.num_programs(2) - 1 - tl.program_id(2)  # longest causal tiles first

    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(
        batch, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, total_q, total_k, max_blocks, seqlen_q_dense,
        seqlen_k_dense, VARLEN_Q, KV_LAYOUT, HAS_SEQUSED, PAGE_SIZE)
    row_start = tile * BLOCK_M
    if row_start >= seqlen_q * HEADS_PER_TILE:
        return

    offs_r = row_start + tl.arange(0, BLOCK_M)
    pos = offs_r // HEADS_PER_TILE
    head = head_prog * HEADS_PER_TILE + offs_r % HEADS_PER_TILE
    kv_head = (head_prog * HEADS_PER_TILE) // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = pos < seqlen_q
    d_mask = offs_d[None, :] < HEAD_DIM

    batch64 = batch.to(tl.int64)
    q_rows = batch64 * stride_qb + (q_start + pos) * stride_qs + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_mask[:, None] & d_mask, other=0.0)

    if KV_LAYOUT == 2:
        k_base = kv_head.to(tl.int64) * stride_kh
        v_base = kv_head.to(tl.int64) * stride_vh
        block_table_row = block_table_ptr + batch64 * stride_tb
    else:
        k_base = batch64 * stride_kb + k_start * stride_ks + kv_head.to(tl.int64) * stride_kh
        v_base = batch64 * stride_vb + k_start * stride_vs + kv_head.to(tl.int64) * stride_vh
        block_table_row = block_table_ptr

    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + batch64 * stride_ab + head) * 1.4426950408889634  # log2(e)
    else:
        slope = tl.zeros((BLOCK_M,), tl.float32)

    # Key range of the tile [lo, hi) and its fully visible part [full_lo, full_hi).
    diag = seqlen_k - seqlen_q
    pos_min = row_start // HEADS_PER_TILE
    pos_max = tl.minimum((row_start + BLOCK_M - 1) // HEADS_PER_TILE, seqlen_q - 1)
    lo = tl.zeros((), tl.int32)
    full_lo = tl.zeros((), tl.int32)
    hi = seqlen_k
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(pos_min + diag - window_left, 0)
        full_lo = tl.maximum(pos_max + diag - window_left, 0)
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(pos_max + diag + window_right + 1, seqlen_k), 0)
        full_hi = tl.maximum(tl.minimum(pos_min + diag + window_right + 1, seqlen_k), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    unmasked_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    unmasked_hi = (full_hi // BLOCK_N) * BLOCK_N
    left_end = tl.minimum(unmasked_lo, hi)
    mid_end = tl.maximum(tl.minimum(unmasked_hi, hi), left_end)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Masked tiles left of the fully visible block, the unmasked tiles, then the masked diagonal/edge tiles.
    for phase in tl.static_range(3):
        if phase == 0:
            start, stop = lo, left_end
        elif phase == 1:
            start, stop = left_end, mid_end
        else:
            start, stop = mid_end, hi
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, start, stop, pos, slope, seqlen_k, diag, window_left, window_right,
            k_ptr, v_ptr, k_base, v_base, block_table_row, num_blocks, offs_d, qk_scale, softcap_log2,
            stride_kb, stride_ks, stride_vb, stride_vs, phase != 1, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
            RAW_SCORES, KV_LAYOUT, PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2
    o_rows = batch64 * stride_ob + (q_start + pos) * stride_os + head.to(tl.int64) * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask)
    lse_rows = batch64 * stride_lb + head.to(tl.int64) * stride_lh + q_start + pos
    tl.store(lse_ptr + lse_rows, lse, mask=row_mask)


_prefill_kernel_tuned = triton.autotune(
    configs=TUNED_CONFIGS,
    key=["tune_seqlen_q", "tune_seqlen_k", "HEAD_DIM", "GROUP", "HEADS_PER_TILE", "VARLEN_Q", "KV_LAYOUT",
         "PAGE_SIZE", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_prefill_kernel)
# Its results on disk (``flashserve.kernels.tuning_cache``): read before the first tuned launch on a device, written
# after a launch that tuned a new key; ``tuning_cache.save_all()`` forces a save.
PREFILL_TUNING = PersistentTuning("prefill", _prefill_kernel_tuned, depends=[prune_configs])


def prefill_attention(q, k, v, out, lse, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                      seqused_k=None, block_table=None):
    """Launch the prefill kernel; inputs are already validated, nothing is copied and nothing syncs.

    Dense: q (B, Sq, H, D), k/v (B, Sk, Hk, D), out like q, lse (B, H, Sq).
    Varlen: q (total_q, H, D) with ``cu_seqlens_q`` (B + 1,); k/v (total_k, Hk, D) with ``cu_seqlens_k`` (and
    optionally ``seqused_k`` (B,), the number of keys used per sequence), or paged caches
    (num_blocks, page_size, Hk, D) with ``block_table`` (B, max_blocks) and ``seqused_k`` or ``cu_seqlens_k``;
    out like q, lse (H, total_q). ``max_seqlen_q``/``max_seqlen_k`` must bound the per-sequence lengths.
    The kernel clamps every index into its tensor: cumulative lengths into q's / k's tokens, paged key lengths to
    the block table's capacity, block ids into the cache.
    """
    varlen = q.dim() == 3
    head_dim = q.shape[-1]
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    group = nheads // nheads_k
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        seqlen_q, seqlen_k = 0, 0
        stride_qb = stride_kb = stride_vb = stride_ob = stride_lb = 0
        stride_qs, stride_qh = q.stride(0), q.stride(1)
        stride_os, stride_oh = out.stride(0), out.stride(1)
        stride_lh = lse.stride(0)
        if block_table is not None:
            kv_layout = KV_PAGED
            page_size = k.shape[1]
            stride_kb, stride_ks, stride_kh = k.stride(0), k.stride(1), k.stride(2)
            stride_vb, stride_vs, stride_vh = v.stride(0), v.stride(1), v.stride(2)
        else:
            kv_layout = KV_VARLEN
            page_size = 1
            stride_ks, stride_kh = k.stride(0), k.stride(1)
            stride_vs, stride_vh = v.stride(0), v.stride(1)
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
        kv_layout = KV_DENSE
        page_size = 1
        stride_qb, stride_qs, stride_qh = q.stride(0), q.stride(1), q.stride(2)
        stride_kb, stride_ks, stride_kh = k.stride(0), k.stride(1), k.stride(2)
        stride_vb, stride_vs, stride_vh = v.stride(0), v.stride(1), v.stride(2)
        stride_ob, stride_os, stride_oh = out.stride(0), out.stride(1), out.stride(2)
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    if batch == 0 or max_seqlen_q == 0 or nheads == 0:
        return

    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    left, right = window_size
    if causal:
        right = 0
    has_softcap = softcap > 0.0
    qk_scale = (2.0 * scale * LOG2E / softcap) if has_softcap else scale * LOG2E
    softcap_log2 = softcap * LOG2E if has_softcap else 0.0
    # Pack the query heads of a KV group into the tile rows when the queries alone would leave most rows empty.
    heads_per_tile = group if (group > 1 and max_seqlen_q < HEAD_PACKING_MAX_QUERY) else 1
    block_d = max(16, next_power_of_2(head_dim))
    dummy = cu_seqlens_q if cu_seqlens_q is not None else lse
    stride_ab = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        stride_ab = alibi_slopes.stride(0)

    strides = (stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
               stride_ob, stride_os, stride_oh, stride_lb, stride_lh)
    other_device = q.is_cuda and q.device.index is not None and q.device.index != torch.cuda.current_device()
    if use_tma(q, k, v, out, softmax_scale, (left, right), softcap, alibi_slopes, block_table, max_seqlen_q,
               heads_per_tile):
        with torch.cuda.device(q.device) if other_device else contextlib.nullcontext():
            tma_prefill_attention(q, k, v, out, lse, strides, scale * LOG2E, right == 0, batch, max_seqlen_q,
                                  max_seqlen_k, cu_seqlens_q, cu_seqlens_k, seqused_k)
        return
    args = (
        q, k, v, out, lse,
        cu_seqlens_q if cu_seqlens_q is not None else dummy,
        cu_seqlens_k if cu_seqlens_k is not None else dummy,
        seqused_k if seqused_k is not None else dummy,
        block_table if block_table is not None else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        *strides,
        block_table.stride(0) if block_table is not None else 0, stride_ab,
        block_table.shape[1] if block_table is not None and k.shape[0] > 0 else 0, max(k.shape[0], 1),
        q.shape[0], k.shape[0],
        seqlen_q, seqlen_k,
        qk_scale, softcap_log2, max(left, 0), max(right, 0),
        length_class(max_seqlen_q), length_class(max_seqlen_k),
    )
    meta = dict(
        GROUP=group, HEADS_PER_TILE=heads_per_tile, HEAD_DIM=head_dim, BLOCK_D=block_d,
        VARLEN_Q=varlen, KV_LAYOUT=kv_layout, HAS_SEQUSED=seqused_k is not None, PAGE_SIZE=page_size,
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=has_softcap, HAS_ALIBI=alibi_slopes is not None,
        RAW_SCORES=not has_softcap and alibi_slopes is None and scale > 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    rows = max_seqlen_q * heads_per_tile
    head_programs = nheads // heads_per_tile

    def grid(config):
        return (head_programs, batch, cdiv(rows, config["BLOCK_M"]))

    with torch.cuda.device(q.device) if other_device else contextlib.nullcontext():
        if use_autotune(q.device):
            PREFILL_TUNING.launch(q.device, grid, *args, **meta)
        else:
            block_m, block_n, num_warps, num_stages = default_config(q.device, block_d, q.element_size())
            _prefill_kernel[grid({"BLOCK_M": block_m})](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n,
                                                         num_warps=num_warps, num_stages=num_stages)

