"""Plain-PyTorch references of every kernel: the CPU path (without ``TRITON_INTERPRET=1``) and the test oracle."""
from flashserve.kernels.reference.attention import attention_batch, attention_mask

from flashserve.kernels.reference.varlen import attention_varlen, gather_paged_kv

from flashserve.kernels.reference.decode import flash_attn_with_kvcache, merge_attn_states, reshape_and_cache_flash
from flashserve.kernels.reference.layers import (
    apply_rotary, fused_add_rms_norm, linear, linear_silu_and_mul, rms_norm, rms_norm_linear,
    rms_norm_linear_silu_and_mul, silu_and_mul)
from flashserve.kernels.reference.moe import fused_experts, moe_align_block_size, moe_routing
from flashserve.kernels.reference.scores import attention_scores_batch, attention_scores_varlen
