"""Plain-PyTorch references of every kernel: the CPU path (without ``TRITON_INTERPRET=1``) and the test oracle."""
from flashserve.kernels.reference.attention import attention_batch, attention_mask

# -- prefill / varlen references (foundation issue) --

# -- decode, merge, cache write and layer-helper references (decode issue) --
