"""Plain-PyTorch reference of ``attention_scores_from_lse``: each key's attention mass per KV head.

The attention weights ``P[h, i, j]`` of query head h and query i over key j are accumulated over the queries and
the query heads of each KV head's group: ``reduce="sum"`` gives ``sum_{h in group, i} P[h, i, j]``,
``reduce="max"`` the largest of them. With ``lse`` given the weights are ``exp(score - lse[h, i])`` (what the
kernel computes from the forward's LSE); with ``lse=None`` they are the softmax of the full score matrix (the
test oracle). Rows whose LSE is infinite (no visible key) weigh nothing.
"""
import torch

from flashserve.kernels.reference.attention import masked_scores
from flashserve.kernels.reference.varlen import gather_paged_kv

REDUCTIONS = ("sum", "max")


def attention_scores_batch(q, k, lse=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, reduce="sum", upcast=True) -> torch.Tensor:
    """q (B, Sq, H, D), k (B, Sk, Hk, D), lse None or (B, H, Sq) -> (B, Hk, Sk) fp32. ``upcast=False`` computes
    in the input precision (the baseline of FlashAttention's acceptance rule)."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dtype = torch.float32 if upcast else q.dtype
    scores = masked_scores(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, dtype)
    if lse is None:
        probs = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)
    else:
        row_lse = lse.to(dtype)[..., None]
        probs = torch.where(torch.isfinite(row_lse), torch.exp(scores - row_lse), 0.0)
    probs = probs.reshape(batch, nheads_k, (nheads // nheads_k) * seqlen_q, seqlen_k)
    if probs.shape[2] == 0:
        return torch.zeros(batch, nheads_k, seqlen_k, dtype=torch.float32, device=q.device)
    reduced = probs.sum(dim=2) if reduce == "sum" else probs.amax(dim=2)
    return reduced.float()


def attention_scores_varlen(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, alibi_slopes=None, block_table=None, seqused_k=None,
                            reduce="sum", upcast=True) -> torch.Tensor:
    """Packed sequences: q (total_q, H, D), lse None or (H, total_q); k (total_k, Hk, D) -> (Hk, total_k), or a
    paged cache (num_blocks, page_size, Hk, D) with ``block_table`` -> (B, Hk, max_seqlen_k) (key t of sequence b
    at ``[b, :, t]``). Keys past a sequence's length (``seqused_k``) get 0."""
    nheads_k = k.shape[-2]
    batch = cu_seqlens_q.shape[0] - 1
    if block_table is not None:
        out = torch.zeros(batch, nheads_k, max_seqlen_k, dtype=torch.float32, device=q.device)
    else:
        out = torch.zeros(nheads_k, k.shape[0], dtype=torch.float32, device=q.device)
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    used_k = seqused_k.tolist() if seqused_k is not None else None
    for b in range(batch):
        q_lo, q_hi = starts_q[b], starts_q[b + 1]
        seqlen_k = used_k[b] if used_k is not None else starts_k[b + 1] - starts_k[b]
        if block_table is not None:
            seqlen_k = min(seqlen_k, max_seqlen_k)
            k_seq = gather_paged_kv(k, block_table[b], seqlen_k)
        else:
            k_seq = k[starts_k[b]:starts_k[b] + seqlen_k]
        slopes = alibi_slopes[b:b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        lse_seq = lse[:, q_lo:q_hi][None] if lse is not None else None
        scores = attention_scores_batch(q[q_lo:q_hi][None], k_seq[None], lse_seq, softmax_scale, causal,
                                        window_size, softcap, slopes, reduce, upcast)[0]
        if block_table is not None:
            out[b, :, :seqlen_k] = scores
        else:
            out[:, starts_k[b]:starts_k[b] + seqlen_k] = scores
    return out
