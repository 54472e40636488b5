"""Cascade attention: a decode batch whose sequences share a prefix of cached blocks, the prefix's keys and values
read once for the whole batch instead of once per sequence.

The attention of every query is split over two disjoint key sets and merged by their log-sum-exps:

1. the shared prefix: the B queries (one per sequence) form ONE multi-query sequence attending, non-causally, to
   the prefix's blocks (the prefill kernel over the paged cache): the prefix is read once per tile of queries;
2. each sequence's own suffix (its keys after the prefix, its current token included): the split-KV decode over
   the block table's columns after the prefix, with its split layout chosen for the full table's width (the same
   compiled variants as the plain decode);
3. ``merge_attn_states`` combines the two (exact up to rounding).

Causality holds because every prefix key precedes every query. Like ``paged_attention`` this is an engine entry
point: no argument checks, Triton on CUDA or under the interpreter, else the PyTorch references; nothing syncs
with the host.
"""
import torch

from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.decode import launch_decode
from flashserve.kernels.merge import merge_attn_states
from flashserve.kernels.prefill import prefill_attention
from flashserve.kernels.reference import decode as reference_decode
from flashserve.kernels.reference.varlen import attention_varlen


def cascade_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_block_table: torch.Tensor,
                   prefix_len: int, prefix_seqused_k: torch.Tensor, prefix_cu_seqlens_q: torch.Tensor,
                   suffix_block_table: torch.Tensor, suffix_seqused_k: torch.Tensor,
                   softmax_scale: float) -> torch.Tensor:
    """One query token per sequence over a paged cache whose first ``prefix_len`` keys all sequences share.

    Args:
        q: (B, H, D), last dimension contiguous (rotary already applied).
        k_cache, v_cache: (num_blocks, block_size, Hk, D), this step's keys already written.
        prefix_block_table: (1, P) int32, the shared prefix's blocks (``prefix_len = P * block_size`` keys).
        prefix_seqused_k: (1,) int32 holding ``prefix_len``; prefix_cu_seqlens_q: (2,) int32 holding [0, B].
        suffix_block_table: (B, W - P) int32, each sequence's blocks after the prefix (a view of a (B, W) table).
        suffix_seqused_k: (B,) int32, each sequence's keys after the prefix (>= 1: its current token).
        softmax_scale: the scale of q·k.
    Returns:
        out (B, H, D) in q's dtype.
    """
    batch, num_heads, _ = q.shape
    q4 = q.unsqueeze(1)
    if use_triton(q):
        prefix_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        # padded row stride, as in paged_attention.prefill: one specialisation for every batch size
        prefix_lse = torch.empty((num_heads, -(-batch // 16) * 16), dtype=torch.float32, device=q.device)[:, :batch]
        prefill_attention(q, k_cache, v_cache, prefix_out, prefix_lse, softmax_scale, False, (-1, -1), 0.0, None,
                          cu_seqlens_q=prefix_cu_seqlens_q, max_seqlen_q=batch, max_seqlen_k=prefix_len,
                          seqused_k=prefix_seqused_k, block_table=prefix_block_table)
        capacity = (prefix_block_table.shape[1] + suffix_block_table.shape[1]) * k_cache.shape[1]
        suffix_out, suffix_lse = launch_decode(q4, k_cache, v_cache, suffix_seqused_k, suffix_block_table, None, None,
                                               softmax_scale, 0.0, -1, 0, capacity, 0, True)
    else:
        prefix_out, prefix_lse = attention_varlen(q, k_cache, v_cache, prefix_cu_seqlens_q, None, softmax_scale,
                                                  False, (-1, -1), 0.0, None, prefix_block_table, prefix_seqused_k)
        suffix_out, suffix_lse = reference_decode.flash_attn_with_kvcache(
            q4, k_cache, v_cache, None, None, None, None, suffix_seqused_k, None, suffix_block_table, softmax_scale,
            True, (-1, 0), 0.0, True, None)
    out = torch.empty_like(prefix_out)
    merge_attn_states(out, prefix_out, prefix_lse, suffix_out.squeeze(1), suffix_lse[:, :, 0].T)
    return out
