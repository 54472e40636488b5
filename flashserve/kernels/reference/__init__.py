"""Plain-PyTorch references of every kernel: the CPU path (without ``TRITON_INTERPRET=1``) and the test oracle."""
from flashserve.kernels.reference.attention import attention_batch, attention_mask

from flashserve.kernels.reference.varlen import attention_varlen, gather_paged_kv

