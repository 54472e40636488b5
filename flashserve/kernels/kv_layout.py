"""Where a sequence's queries and keys live, for the kernels that read dense, packed (varlen) or paged layouts (the
prefill and the attention-scores kernels): the clamped bounds of sequence b and the element offsets of a key tile.

KV layouts (the kernels' constexpr ``KV_LAYOUT``): ``KV_DENSE`` (B, Sk, Hk, D), ``KV_VARLEN`` (total_k, Hk, D) with
``cu_seqlens_k``, ``KV_PAGED`` (num_blocks, page_size, Hk, D) with a block table.
"""
import triton
import triton.language as tl

KV_DENSE, KV_VARLEN, KV_PAGED = 0, 1, 2


@triton.jit
def kv_row_offsets(start_n, offs_n, load_mask, block_table_row, num_blocks, kv_base, stride_b, stride_s,
                   KV_LAYOUT: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 element offsets of the BLOCK_N key rows ``start_n + offs_n`` (head and batch already in kv_base).
    Paged: a block id outside [0, num_blocks) is clamped into it (wrong keys, never a read outside the cache)."""
    if KV_LAYOUT == 2:
        if PAGE_SIZE % BLOCK_N == 0:
            # The whole tile lies in one page: one block id per tile.
            block = tl.load(block_table_row + start_n // PAGE_SIZE)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)
            return kv_base + block * stride_b + ((start_n % PAGE_SIZE) + offs_n) * stride_s
        tokens = start_n + offs_n
        blocks = tl.load(block_table_row + tokens // PAGE_SIZE, mask=load_mask, other=0)
        blocks = tl.minimum(tl.maximum(blocks, 0), num_blocks - 1).to(tl.int64)
        return kv_base + blocks * stride_b + (tokens % PAGE_SIZE) * stride_s
    return kv_base + tl.cast(start_n, tl.int64) * stride_s + offs_n * stride_s


@triton.jit
def sequence_bounds(batch, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, total_q, total_k, max_blocks,
                    seqlen_q_dense, seqlen_k_dense, VARLEN_Q: tl.constexpr, KV_LAYOUT: tl.constexpr,
                    HAS_SEQUSED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """(first query row (int64), query count, first key row (int64; varlen keys only), key count) of sequence
    ``batch``. Memory safety without host checks: every index is clamped into its tensor (query rows into q's
    ``total_q`` tokens, key rows into k's ``total_k``, a paged key count into the block table's capacity)."""
    q_start = tl.zeros((), tl.int64)
    seqlen_q = seqlen_q_dense
    if VARLEN_Q:
        q_first = tl.minimum(tl.maximum(tl.load(cu_seqlens_q_ptr + batch), 0), total_q)
        seqlen_q = tl.minimum(tl.maximum(tl.load(cu_seqlens_q_ptr + batch + 1), q_first), total_q) - q_first
        q_start = q_first.to(tl.int64)
    k_start = tl.zeros((), tl.int64)
    seqlen_k = seqlen_k_dense
    if KV_LAYOUT == 1:
        k_first = tl.minimum(tl.maximum(tl.load(cu_seqlens_k_ptr + batch), 0), total_k)
        if HAS_SEQUSED:
            seqlen_k = tl.minimum(tl.maximum(tl.load(seqused_k_ptr + batch), 0), total_k - k_first)
        else:
            seqlen_k = tl.minimum(tl.maximum(tl.load(cu_seqlens_k_ptr + batch + 1), k_first), total_k) - k_first
        k_start = k_first.to(tl.int64)
    elif KV_LAYOUT == 2:
        if HAS_SEQUSED:
            seqlen_k = tl.load(seqused_k_ptr + batch)
        else:
            seqlen_k = tl.load(cu_seqlens_k_ptr + batch + 1) - tl.load(cu_seqlens_k_ptr + batch)
        seqlen_k = tl.minimum(tl.maximum(seqlen_k, 0), max_blocks * PAGE_SIZE)
    return q_start, seqlen_q, k_start, seqlen_k
