"""The attention-scores kernel: each key's attention mass per KV head, recomputed from the forward's LSE.

The forward pass already knows each query row's log-sum-exp, so the weight of key j for query row i is
``exp(score[i, j] - lse[i])`` without the S x S matrix ever being stored. One program owns BLOCK_N keys of one
(sequence, KV head): it loads that K tile once, then streams the query rows that can see any of those keys (the
causal / window bounds cut the range) — a row being one (query, query head of the KV head's group) pair, as in
the decode kernel — and accumulates the weights over the rows (sum or max). One pass over K; Q is re-read per
key tile (from L2 for most shapes). Layouts, masks, softcap, ALiBi and the memory-safety clamps are the prefill
kernel's (``kv_layout.sequence_bounds``, ``kv_layout.kv_row_offsets``).
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate
from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import cdiv, next_power_of_2
from flashserve.kernels.flash_attn_interface import check_options, check_qkv, check_varlen_indices
from flashserve.kernels.kv_layout import KV_DENSE, KV_PAGED, KV_VARLEN, kv_row_offsets, sequence_bounds
from flashserve.kernels.reference import scores as reference


# As the prefill kernel: lengths, counts and window sizes are not specialised (strides are).
@triton.jit(do_not_specialize=["total_q", "total_k", "seqlen_q_dense", "seqlen_k_dense", "out_keys", "window_left",
                               "window_right", "max_blocks", "num_blocks"])
def _scores_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, block_table_ptr, alibi_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_lb, stride_lh, stride_ob, stride_oh,
    stride_tb, stride_ab, max_blocks, num_blocks, total_q, total_k, seqlen_q_dense, seqlen_k_dense, out_keys,
    sm_scale, softcap, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN_Q: tl.constexpr,
    KV_LAYOUT: tl.constexpr, HAS_SEQUSED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, REDUCE_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    key_start = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(
        batch, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, total_q, total_k, max_blocks, seqlen_q_dense,
        seqlen_k_dense, VARLEN_Q, KV_LAYOUT, HAS_SEQUSED, PAGE_SIZE)
    seqlen_k = tl.minimum(seqlen_k, out_keys)  # keys past the output's width are not scored
    if key_start >= seqlen_k:
        return
    batch64 = batch.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    keys = key_start + offs_n
    key_valid = keys < seqlen_k
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    if KV_LAYOUT == 2:
        k_base = kv_head.to(tl.int64) * stride_kh
        block_table_row = block_table_ptr + batch64 * stride_tb
    else:
        k_base = batch64 * stride_kb + k_start * stride_ks + kv_head.to(tl.int64) * stride_kh
        block_table_row = block_table_ptr
    k_rows = kv_row_offsets(key_start, offs_n, key_valid, block_table_row, num_blocks, k_base, stride_kb,
                            stride_ks, KV_LAYOUT, PAGE_SIZE, BLOCK_N)
    k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=key_valid[:, None] & dim_valid[None, :], other=0.0)

    # The query rows that see at least one of these keys: query i sees key j when
    # i + diag - window_left <= j <= i + diag + window_right (bottom-right aligned).
    diag = seqlen_k - seqlen_q
    query_lo = tl.zeros((), tl.int32)
    query_hi = seqlen_q
    if HAS_RIGHT:
        query_lo = tl.maximum(key_start - diag - window_right, 0)
    if HAS_LEFT:
        query_hi = tl.minimum(key_start + BLOCK_N - 1 - diag + window_left + 1, seqlen_q)
    row_hi = query_hi * GROUP
    acc = tl.zeros([BLOCK_N], tl.float32)
    for row_start in range(query_lo * GROUP, row_hi, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < row_hi
        query = rows // GROUP
        head = (kv_head * GROUP + rows % GROUP).to(tl.int64)
        q_rows = batch64 * stride_qb + (q_start + query) * stride_qs + head * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_valid[:, None] & dim_valid[None, :],
                    other=0.0)
        lse = tl.load(lse_ptr + batch64 * stride_lb + head * stride_lh + q_start + query, mask=row_valid,
                      other=float("-inf"))
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        if HAS_SOFTCAP:
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + batch64 * stride_ab + head, mask=row_valid, other=0.0)
            scores = scores - slope[:, None] * tl.abs((query + diag)[:, None] - keys[None, :]).to(tl.float32)
        visible = (row_valid & (lse > float("-inf")) & (lse < float("inf")))[:, None] & key_valid[None, :]
        if HAS_RIGHT:
            visible = visible & (keys[None, :] <= (query + diag + window_right)[:, None])
        if HAS_LEFT:
            visible = visible & (keys[None, :] >= (query + diag - window_left)[:, None])
        weights = tl.where(visible, tl.exp2((scores - lse[:, None]) * 1.4426950408889634), 0.0)
        if REDUCE_MAX:
            acc = tl.maximum(acc, tl.max(weights, axis=0))
        else:
            acc = acc + tl.sum(weights, axis=0)
    out_row = out_ptr + batch64 * stride_ob + kv_head * stride_oh
    if KV_LAYOUT == 1:  # packed keys: the output is (Hk, total_k)
        out_row += k_start
    tl.store(out_row + keys, acc, mask=key_valid)


def launch_attention_scores(q, k, lse, out, softmax_scale, causal, window_size, softcap, alibi_slopes, reduce,
                            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_k=None, seqused_k=None,
                            block_table=None) -> None:
    """Fill ``out`` (zeros on entry) on validated inputs; no checks, no synchronisation.

    Dense: q (B, Sq, H, D), k (B, Sk, Hk, D), lse (B, H, Sq), out (B, Hk, Sk). Varlen: q (total_q, H, D) with
    ``cu_seqlens_q``, lse (H, total_q); k (total_k, Hk, D) with ``cu_seqlens_k`` (optionally ``seqused_k``) and out
    (Hk, total_k), or a paged cache with ``block_table`` and ``seqused_k`` or ``cu_seqlens_k`` and out
    (B, Hk, max_seqlen_k). ``max_seqlen_k`` must bound the key lengths (it sizes the grid).
    """
    varlen = q.dim() == 3
    nheads, head_dim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        seqlen_q = seqlen_k = 0
        stride_q = (0, q.stride(0), q.stride(1))
        stride_l = (0, lse.stride(0))
        if block_table is not None:
            layout, page_size, stride_k = KV_PAGED, k.shape[1], k.stride()[:3]
            stride_o, out_keys = out.stride()[:2], out.shape[2]
        else:
            layout, page_size, stride_k = KV_VARLEN, 1, (0, k.stride(0), k.stride(1))
            stride_o, out_keys = (0, out.stride(0)), max(max_seqlen_k, 1)
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = max_seqlen_k = k.shape[1]
        layout, page_size = KV_DENSE, 1
        stride_q, stride_k, stride_l = q.stride()[:3], k.stride()[:3], lse.stride()[:2]
        stride_o, out_keys = out.stride()[:2], seqlen_k
    if batch == 0 or max_seqlen_k == 0 or nheads == 0:
        return
    left, right = window_size
    if causal:
        right = 0
    interpret = triton_interpret_enabled()
    block_d = max(16, next_power_of_2(head_dim))
    block_n = 32 if interpret or block_d > 128 else 64
    block_m = 32 if interpret else 64
    dummy = lse
    grid = (cdiv(max_seqlen_k, block_n), nheads_k, batch)
    _scores_kernel[grid](
        q, k, lse, out,
        cu_seqlens_q if cu_seqlens_q is not None else dummy, cu_seqlens_k if cu_seqlens_k is not None else dummy,
        seqused_k if seqused_k is not None else dummy, block_table if block_table is not None else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        *stride_q, *stride_k, *stride_l, *stride_o,
        block_table.stride(0) if block_table is not None else 0,
        alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        block_table.shape[1] if block_table is not None and k.shape[0] > 0 else 0, max(k.shape[0], 1),
        q.shape[0], k.shape[0], seqlen_q, seqlen_k, out_keys,
        float(softmax_scale if softmax_scale is not None else head_dim ** -0.5), float(softcap),
        max(left, 0), max(right, 0),
        GROUP=nheads // nheads_k, HEAD_DIM=head_dim, BLOCK_D=block_d, VARLEN_Q=varlen, KV_LAYOUT=layout,
        HAS_SEQUSED=seqused_k is not None, PAGE_SIZE=page_size, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, REDUCE_MAX=reduce == "max",
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=2,
    )


def attention_scores_from_lse(q, k, lse, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_k=None,
                              softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, block_table=None, seqused_k=None, reduce="sum"):
    """Each key's attention mass per KV head, accumulated over the queries (and the query heads of its group),
    recomputed in one pass over K from the forward's log-sum-exp — what H2O / SnapKV-style KV eviction ranks keys
    by — without materialising the S x S attention matrix.

    The weight of key j for query i of query head h is ``exp(score - lse[h, i])`` with the score exactly as the
    forward computed it (``softmax_scale``, softcap, ALiBi, causal / window masks bottom-right aligned, GQA
    ``h // (H // Hk)``): pass the same options as to the forward call that returned ``lse``. Rows whose LSE is
    infinite (no visible key) weigh nothing.

    Arguments:
        q: (B, Sq, H, D) dense, or (total_q, H, D) packed with ``cu_seqlens_q`` (B + 1,) int32.
        k: (B, Sk, Hk, D) dense; (total_k, Hk, D) packed with ``cu_seqlens_k`` (and optionally ``seqused_k``);
            or a paged cache (num_blocks, page_size, Hk, D) with ``block_table`` (B, max_blocks) and ``seqused_k``
            (or ``cu_seqlens_k``). Last dimensions contiguous, other strides free.
        lse: fp32, the forward's softmax LSE: (B, H, Sq) dense, (H, total_q) packed.
        max_seqlen_k: packed / paged: an upper bound of the key lengths (it sizes the launch).
        reduce: "sum" (the attention mass, H2O) or "max" (the largest weight any query gives the key).

    Returns:
        fp32 scores: (B, Hk, Sk) dense, (Hk, total_k) packed keys, (B, Hk, max_seqlen_k) paged (key t of sequence
        b at ``[b, :, t]``); keys past a sequence's length score 0.
    """
    if reduce not in reference.REDUCTIONS:
        raise ValueError(f"reduce must be one of {reference.REDUCTIONS}, got {reduce!r}")
    window = check_options(0.0, softmax_scale, window_size, softcap)
    varlen = isinstance(q, torch.Tensor) and q.dim() == 3
    check_qkv(q, k, k, 3 if varlen else 4, None if varlen else 4)  # k stands in for v: there is none
    nheads = q.shape[-2]
    if varlen:
        if cu_seqlens_q is None or max_seqlen_k is None:
            raise ValueError("cu_seqlens_q and max_seqlen_k are needed with packed q (total_q, H, D)")
        max_seqlen_k = _validate.check_count("max_seqlen_k", max_seqlen_k)
        batch = check_varlen_indices(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_table, seqused_k)
        lse_shape = (nheads, q.shape[0])
        if block_table is not None:
            out_shape = (batch, k.shape[2], max_seqlen_k)
        else:
            out_shape = (k.shape[1], k.shape[0])
    else:
        batch = q.shape[0]
        if k.shape[0] != batch:
            raise ValueError(f"k must have q's batch size {batch}, got shape {tuple(k.shape)}")
        lse_shape = (batch, nheads, q.shape[1])
        out_shape = (batch, k.shape[2], k.shape[1])
    _validate.check_tensor("lse", lse, len(lse_shape), (torch.float32,), q.device)
    _validate.check_shape("lse", lse, lse_shape)
    _validate.check_last_dim_contiguous("lse", lse)
    _validate.check_alibi_slopes(alibi_slopes, batch, nheads, q.device)
    if not use_triton(q):
        if varlen:
            return reference.attention_scores_varlen(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_k,
                                                     softmax_scale, causal, window, softcap, alibi_slopes,
                                                     block_table, seqused_k, reduce)
        return reference.attention_scores_batch(q, k, lse, softmax_scale, causal, window, softcap, alibi_slopes,
                                                reduce)
    out = torch.zeros(out_shape, dtype=torch.float32, device=q.device)
    launch_attention_scores(q, k, lse, out, softmax_scale, causal, window, softcap, alibi_slopes, reduce,
                            cu_seqlens_q, cu_seqlens_k, max_seqlen_k=max_seqlen_k, seqused_k=seqused_k,
                            block_table=block_table)
    return out
