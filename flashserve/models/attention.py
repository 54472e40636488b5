"""The attention of one layer over the paged KV cache, driven by the batch's ``AttentionContext``.

The model runner assigns ``k_cache`` and ``v_cache`` (num_blocks, block_size, num_kv_heads, head_dim) — possibly
strided views of one big buffer — and installs the batch's metadata with ``flashserve.context.set_context``.
Grouped-query attention is left to the kernels (query head ``h`` reads KV head ``h // (H // Hk)``).

Per layer and step this is two launches: one fused kernel for the optional per-head q/k RMSNorm, the rotary and
the KV-cache write, then the attention kernel (plus the split-KV combine of a decode; a decode step whose context
carries a ``shared_prefix`` runs cascade attention, ``flashserve.kernels.cascade``). It calls the engine entry
points of ``flashserve.kernels.paged_attention``, which skip the public API's argument checks: the runner builds
the metadata in one fixed layout, and the shapes of q, k and v follow from the model's spec.
"""
import torch
from torch import nn

from flashserve.context import get_context
from flashserve.kernels import paged_attention
from flashserve.kernels.cascade import cascade_decode


class Attention(nn.Module):
    """Causal attention of the packed tokens of a batch, each request attending to its own cached keys/values
    (the runner assigns ``k_cache``/``v_cache`` before the first forward pass).

    ``sliding_window`` follows Hugging Face: with window ``w`` a query sees itself and the ``w - 1`` keys before
    it, i.e. FlashAttention's ``window_size = (w - 1, 0)``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, softmax_scale: float,
                 rotary: nn.Module, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale
        self.rotary = rotary
        self.window_left = sliding_window - 1 if sliding_window is not None else -1
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                q_norm: nn.Module | None = None, k_norm: nn.Module | None = None) -> torch.Tensor:
        """q (T, H, D), k and v (T, Hk, D) of this step's tokens (last dimension contiguous, e.g. views of the
        fused QKV output; q and k are normalised and rotated in place) -> out (T, H, D).

        ``q_norm``/``k_norm``: per-head RMSNorm modules (Qwen3), applied before the rotary.
        """
        context = get_context()
        q_weight = q_norm.weight if q_norm is not None else None
        k_weight = k_norm.weight if k_norm is not None else None
        eps = q_norm.eps if q_norm is not None else 0.0
        paged_attention.qk_norm_rope_cache(q, k, v, self.rotary.cos_sin_cache, positions, self.k_cache,
                                           self.v_cache, context.slot_mapping, q_weight, k_weight, eps)
        if context.shared_prefix is not None:
            return cascade_decode(q, self.k_cache, self.v_cache, context.block_table, context.seqused_k,
                                  context.shared_prefix.length, self.softmax_scale)
        if context.is_decode:
            return paged_attention.decode(q, self.k_cache, self.v_cache, context.seqused_k, context.block_table,
                                          self.softmax_scale, self.window_left)
        return paged_attention.prefill(q, self.k_cache, self.v_cache, context.cu_seqlens_q, context.seqused_k,
                                       context.block_table, context.max_seqlen_q, context.max_seqlen_k,
                                       self.softmax_scale, self.window_left)
