"""Plain-PyTorch reference of variable-length and paged attention (``flash_attn_varlen_func``'s semantics).

Each sequence's keys and values are gathered (from the block table when the cache is paged) and attended with
``attention_batch``, one sequence at a time. It loops and syncs on the host: it is the oracle, not a fast path.
"""
import torch

from flashserve.kernels.reference.attention import attention_batch


def gather_paged_kv(cache: torch.Tensor, block_table_row: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The first ``seqlen`` tokens of one sequence from a paged cache.

    Args:
        cache: (num_blocks, page_size, Hk, D); token t lives in block ``block_table_row[t // page_size]``,
            row ``t % page_size``.
        block_table_row: (max_blocks,) int32 block ids of the sequence.

    Returns:
        (seqlen, Hk, D) tensor (a copy).
    """
    page_size = cache.shape[1]
    num_pages = -(-seqlen // page_size)
    blocks = block_table_row[:num_pages].long()
    return cache[blocks].reshape(num_pages * page_size, *cache.shape[2:])[:seqlen]


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences of different lengths.

    Args:
        q: (total_q, H, D); sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k, v: (total_k, Hk, D) packed like q through ``cu_seqlens_k``, or, with ``block_table`` (B, max_blocks),
            paged caches (num_blocks, page_size, Hk, D).
        cu_seqlens_k: (B + 1,) int32, or None when ``seqused_k`` gives the KV lengths.
        seqused_k: (B,) int32 number of keys of each sequence (overrides the lengths from ``cu_seqlens_k``).
        alibi_slopes: None, (H,) or (B, H), fp32.
        upcast: compute in fp32 (the oracle) or in the input precision.

    Returns:
        out (total_q, H, D) in q's dtype, lse (H, total_q) fp32 (``-inf`` for rows that see no key).
    """
    total_q, nheads, head_dim = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((nheads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    used_k = seqused_k.tolist() if seqused_k is not None else None
    for b in range(len(starts_q) - 1):
        q_lo, q_hi = starts_q[b], starts_q[b + 1]
        if q_hi == q_lo:
            continue
        seqlen_k = used_k[b] if used_k is not None else starts_k[b + 1] - starts_k[b]
        if block_table is not None:
            k_seq = gather_paged_kv(k, block_table[b], seqlen_k)
            v_seq = gather_paged_kv(v, block_table[b], seqlen_k)
        else:
            k_seq = k[starts_k[b]:starts_k[b] + seqlen_k]
            v_seq = v[starts_k[b]:starts_k[b] + seqlen_k]
        slopes = alibi_slopes[b:b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out_seq, lse_seq = attention_batch(q[q_lo:q_hi].unsqueeze(0), k_seq.unsqueeze(0), v_seq.unsqueeze(0),
                                           softmax_scale, causal, window_size, softcap, slopes, upcast)
        out[q_lo:q_hi] = out_seq[0]
        lse[:, q_lo:q_hi] = lse_seq[0]
    return out, lse
