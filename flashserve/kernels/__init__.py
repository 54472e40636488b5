"""flashserve's kernel library: FlashAttention-compatible attention, fused layer helpers and the fused
mixture-of-experts layer, written in Triton.

Dispatch (see ``flashserve.kernels._dispatch``): CUDA tensors run the Triton kernels; CPU tensors run them under
``TRITON_INTERPRET=1`` and otherwise the plain-PyTorch reference in ``flashserve.kernels.reference``;
``FLASHSERVE_ATTENTION_BACKEND=torch`` forces the reference everywhere.
"""
# Prefill attention: dense, packed, varlen and paged.
from flashserve.kernels.flash_attn_interface import (
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
)
from flashserve.kernels.packed_interface import (
    flash_attn_kvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

# Attention scores from the forward's LSE (each key's attention mass, for KV eviction).
from flashserve.kernels.attention_scores import attention_scores_from_lse

# Decode attention (flash-decoding), merging attention states, the KV-cache write, fused layer helpers, small-M
# matrix products (plain, residual-add epilogue, RMSNorm prologue), fused MoE.
from flashserve.kernels.activation import silu_and_mul
from flashserve.kernels.cache import reshape_and_cache_flash
from flashserve.kernels.kvcache_interface import flash_attn_with_kvcache
from flashserve.kernels.moe import fused_experts, fused_moe
from flashserve.kernels.moe_align import moe_align_block_size
from flashserve.kernels.moe_routing import moe_routing
from flashserve.kernels.merge import merge_attn_states
from flashserve.kernels.norm import fused_add_rms_norm, rms_norm
from flashserve.kernels.norm_linear import rms_norm_linear, rms_norm_linear_silu_and_mul
from flashserve.kernels.skinny_gemm import linear, linear_silu_and_mul
from flashserve.kernels.qk_rope_cache import qk_norm_rope_and_cache
from flashserve.kernels.rotary import apply_rotary
