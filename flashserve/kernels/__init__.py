"""flashserve's kernel library: FlashAttention-compatible attention and fused layer helpers, written in Triton.

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

