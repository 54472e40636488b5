"""The attention of one layer over the paged KV cache, driven by the batch's ``AttentionContext``.

The model runner assigns ``k_cache`` and ``v_cache`` (num_blocks, block_size, num_kv_heads, head_dim) — possibly
strided views of one big buffer — and installs the batch's metadata with ``flashserve.engine.context.set_context``.
Grouped-query attention is left to the kernels (query head ``h`` reads KV head ``h // (H // Hk)``).
"""
import torch
from torch import nn

from flashserve import kernels
from flashserve.engine.context import get_context


class Attention(nn.Module):
    """Causal attention of the packed tokens of a batch, each request attending to its own cached keys/values.

    Without a cache (``k_cache is None``: e.g. a profiling pass before the cache is allocated) every request must
    be a prompt starting at position 0, and attention runs over the new keys/values alone.

    ``sliding_window`` follows Hugging Face: with window ``w`` a query sees itself and the ``w - 1`` keys before
    it, i.e. FlashAttention's ``window_size = (w - 1, 0)``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, softmax_scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale
        self.window_size = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (T, H, D), k and v (T, Hk, D) of this step's tokens (last dimension contiguous) -> out (T, H, D)."""
        context = get_context()
        if self.k_cache is None:
            return kernels.flash_attn_varlen_func(
                q, k, v, context.cu_seqlens_q, context.cu_seqlens_q, context.max_seqlen_q, context.max_seqlen_q,
                softmax_scale=self.softmax_scale, causal=True, window_size=self.window_size)
        kernels.reshape_and_cache_flash(k, v, self.k_cache, self.v_cache, context.slot_mapping)
        if context.is_decode:
            out = kernels.flash_attn_with_kvcache(
                q.unsqueeze(1), self.k_cache, self.v_cache, cache_seqlens=context.seqused_k,
                block_table=context.block_table, softmax_scale=self.softmax_scale, causal=True,
                window_size=self.window_size)
            return out.squeeze(1)
        return kernels.flash_attn_varlen_func(
            q, self.k_cache, self.v_cache, context.cu_seqlens_q, None, context.max_seqlen_q, context.max_seqlen_k,
            softmax_scale=self.softmax_scale, causal=True, window_size=self.window_size,
            block_table=context.block_table, seqused_k=context.seqused_k)
