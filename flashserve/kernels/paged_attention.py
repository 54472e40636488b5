"""Attention over a paged KV cache for an inference engine's hot path: no argument checks, one call per layer.

The public functions (``flash_attn_varlen_func``, ``flash_attn_with_kvcache``) validate every argument on every
call, which is right for a library user and wasted work for an engine that builds the same metadata layout each
step: it validates its layout once (shapes, dtypes, contiguity) and then calls these. They dispatch like the rest
of ``flashserve.kernels`` (Triton on CUDA or under the interpreter, else the PyTorch reference) and launch nothing
that depends on host-side knowledge of the sequence lengths, so ``decode`` can be captured in a CUDA graph.

Shapes: q (T, H, D) with the last dimension contiguous (a strided view of a fused QKV output is fine);
k_cache, v_cache (num_blocks, block_size, Hk, D); block_table (B, max_blocks) int32; seqused_k (B,) int32;
``window_left`` is the sliding-window's left extent (-1: none); attention is causal (bottom-right aligned).
"""
import torch

from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.decode import launch_config, uses_fused_combine
from flashserve.kernels.decode_launch import paged_decode_plan
from flashserve.kernels.prefill import prefill_attention
from flashserve.kernels.prefill_tuning import HEAD_PACKING_MAX_QUERY, LENGTH_CLASS_BOUNDS
from flashserve.kernels.qk_rope_cache import launch_qk_norm_rope_cache
from flashserve.kernels.reference import decode as reference_decode
from flashserve.kernels.reference import layers as reference_layers
from flashserve.kernels.reference.varlen import attention_varlen


def qk_norm_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
                       positions: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                       slot_mapping: torch.Tensor | None, q_norm_weight: torch.Tensor | None,
                       k_norm_weight: torch.Tensor | None, eps: float) -> None:
    """Optional per-head RMSNorm of q and k, GPT-NeoX rotary at ``positions``, and the write of k and v into the
    cache at ``slot_mapping`` (slot -1: skipped; no caches: no write), in one launch; q and k change in place
    (see ``flashserve.kernels.qk_norm_rope_and_cache``). q (T, H, D), k and v (T, Hk, D)."""
    if use_triton(q):
        launch_qk_norm_rope_cache(q, k, v, cos_sin_cache, positions, k_cache, v_cache, slot_mapping,
                                  q_norm_weight, k_norm_weight, eps, True)
    else:
        reference_layers.qk_norm_rope_and_cache(q, k, v, cos_sin_cache, positions, k_cache, v_cache, slot_mapping,
                                                q_norm_weight, k_norm_weight, eps, True)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqused_k: torch.Tensor,
           block_table: torch.Tensor, softmax_scale: float, window_left: int = -1) -> torch.Tensor:
    """One query token per sequence (B = T): q (B, H, D) -> out (B, H, D).

    Sequence b attends to its first ``seqused_k[b]`` cached keys (its own key included: write the cache first);
    ``seqused_k[b] = 0`` gives a zero row (padding rows of a CUDA graph). The split-KV layout is chosen from the
    block table's width, never from the lengths.
    """
    if not use_triton(q):
        out, _ = reference_decode.flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, None, None, None, None, seqused_k, None, block_table, softmax_scale,
            True, (window_left, 0), 0.0, True, None)
        return out.squeeze(1)
    # (launch_decode, inline; its plan's plain-input launch)
    return paged_decode_plan(q, k_cache, v_cache, seqused_k, block_table, softmax_scale, window_left).plain(
        q, k_cache, v_cache, seqused_k, block_table)[0]


def prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
            seqused_k: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
            softmax_scale: float, window_left: int = -1) -> torch.Tensor:
    """Packed queries of any lengths over their cached keys: q (T, H, D) -> out (T, H, D).

    Sequence b owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``, the last of its ``seqused_k[b]`` keys
    (write the cache first). ``max_seqlen_q``/``max_seqlen_k`` must bound the lengths (they choose the launch).
    """
    if not use_triton(q):
        out, _ = attention_varlen(q, k_cache, v_cache, cu_seqlens_q, None, softmax_scale, True, (window_left, 0),
                                  0.0, None, block_table, seqused_k)
        return out
    num_tokens, num_heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # The LSE's row stride is the one launch argument that follows the token count: padded to a multiple of 16
    # it always gets the same specialisation, so no token count compiles a new variant.
    lse = torch.empty((num_heads, -(-num_tokens // 16) * 16), dtype=torch.float32, device=q.device)[:, :num_tokens]
    prefill_attention(q, k_cache, v_cache, out, lse, softmax_scale, True, (window_left, 0), 0.0, None,
                      cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                      seqused_k=seqused_k, block_table=block_table)
    return out


def prefill_warmup_lengths(max_seqlen_q: int, max_seqlen_k: int) -> list[tuple[int, int]]:
    """(query length, key length) pairs whose ``prefill`` calls, between them, compile (and autotune) every variant
    of the prefill kernel that batches with ``2 <= max_seqlen_q <= max_seqlen_k`` can launch: one pair per
    combination of the kernel's length classes and of GQA head packing (queries shorter than 64)."""
    query_bounds = (2, HEAD_PACKING_MAX_QUERY, *LENGTH_CLASS_BOUNDS, max_seqlen_q)
    query_lengths = sorted({min(n, max_seqlen_q) for n in query_bounds if n >= 2})
    pairs = []
    for query_length in query_lengths:
        key_lengths = {max(query_length, min(bound, max_seqlen_k)) for bound in (*LENGTH_CLASS_BOUNDS, max_seqlen_k)}
        pairs += [(query_length, key_length) for key_length in sorted(key_lengths)]
    return list(dict.fromkeys(pairs))


def decode_variant(batch: int, num_heads: int, num_heads_k: int, head_dim: int, capacity: int,
                   device: torch.device) -> tuple:
    """What decides which compiled variant ``decode`` launches for this batch size (its split layout and tile
    sizes): two batch sizes with equal results need one compile between them."""
    grid, splits, block_m, block_n, block_d, _, block_h, block_s, combine_warps = launch_config(
        batch, 1, num_heads, num_heads_k, head_dim, capacity, 0, device)
    # Triton specialises an integer argument on being 1 or a multiple of 16: that is all it sees of the split count
    # and of the partial-state strides that follow from it.
    split_ints = (splits, splits * num_heads, splits * num_heads * head_dim)
    return (*((n == 1, n % 16 == 0) for n in split_ints), block_m, block_n, block_d, block_h, block_s,
            combine_warps, uses_fused_combine(splits, batch * grid[1], num_heads // num_heads_k))
