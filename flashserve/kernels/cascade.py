"""Cascade attention: a decode batch whose sequences share a prefix of cached blocks, the prefix's keys and values
read once for the whole batch instead of once per sequence.

The attention of every query is split over two disjoint key sets and merged by their log-sum-exps:

1. the shared prefix: the B queries (one per sequence) form ONE multi-query sequence attending, non-causally, to
   the prefix's blocks (row 0 of the block table): the split-KV decode kernel with ``Sq = B``, so each K/V tile
   is read once per block of (query, head) rows and the prefix is spread over many programs;
2. each sequence's own suffix (its keys from ``prefix_len`` on, its current token included): the split-KV decode
   over the whole block table, starting at key ``prefix_len``;
3. ``merge_attn_states`` combines the two (exact up to rounding).

Causality holds because every prefix key precedes every query. The launches depend on shapes only (the prefix
length is read on the device and the split layouts follow from the table's width), so a cascade step can be
captured in a CUDA graph and replayed for any prefix length. Like ``paged_attention`` this is an engine entry
point: no argument checks, Triton on CUDA or under the interpreter, else the PyTorch references.
"""
import torch

from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.decode import launch_config
from flashserve.kernels.decode_launch import launch_decode
from flashserve.kernels.merge import merge_attn_states
from flashserve.kernels.paged_attention import decode_variant
from flashserve.kernels.reference import decode as reference_decode


def cascade_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   seqused_k: torch.Tensor, prefix_len: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """One query token per sequence over a paged cache whose first ``prefix_len`` keys all sequences share.

    Args:
        q: (B, H, D), last dimension contiguous (rotary already applied).
        k_cache, v_cache: (num_blocks, block_size, Hk, D), this step's keys already written.
        block_table: (B, W) int32; the prefix is the first ``prefix_len / block_size`` blocks of every row (row 0's
            are read for all).
        seqused_k: (B,) int32, each sequence's KV length (> prefix_len for real rows; 0 for padding rows, which
            then see the prefix alone — their outputs are meant to be ignored).
        prefix_len: (1,) int32 on q's device, a multiple of block_size.
        softmax_scale: the scale of q·k.
    Returns:
        out (B, H, D) in q's dtype.
    """
    if use_triton(q):
        capacity = block_table.shape[1] * k_cache.shape[1]
        prefix_out, prefix_lse = launch_decode(q.unsqueeze(0), k_cache, v_cache, prefix_len, block_table[:1], None,
                                               None, softmax_scale, 0.0, -1, -1, capacity, 0, True)
        suffix_out, suffix_lse = launch_decode(q.unsqueeze(1), k_cache, v_cache, seqused_k, block_table, None, None,
                                               softmax_scale, 0.0, -1, 0, capacity, 0, True, key_start=prefix_len)
    else:
        prefix_blocks = int(prefix_len[0]) // k_cache.shape[1]
        prefix_out, prefix_lse = reference_decode.flash_attn_with_kvcache(
            q.unsqueeze(0), k_cache, v_cache, None, None, None, None, prefix_len, None, block_table[:1], softmax_scale,
            False, (-1, -1), 0.0, True, None)
        suffix_out, suffix_lse = reference_decode.flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, None, None, None, None, (seqused_k - prefix_len).clamp(min=0), None,
            block_table[:, prefix_blocks:], softmax_scale, True, (-1, 0), 0.0, True, None)
    out = torch.empty_like(q)
    merge_attn_states(out, prefix_out[0], prefix_lse[0], suffix_out[:, 0], suffix_lse[:, :, 0].T)
    return out


def cascade_variant(batch: int, num_heads: int, num_heads_k: int, head_dim: int, capacity: int,
                    device: torch.device) -> tuple:
    """What decides which compiled variants ``cascade_decode`` launches for ``batch`` sequences: the suffix's decode
    variant, and the prefix launch's layout with ``Sq = batch`` (tile sizes, splits, and what Triton specialises of
    the query count)."""
    prefix = launch_config(1, batch, num_heads, num_heads_k, head_dim, capacity, 0, device)
    return (decode_variant(batch, num_heads, num_heads_k, head_dim, capacity, device), prefix[1:5],
            batch == 1, batch % 16 == 0)
