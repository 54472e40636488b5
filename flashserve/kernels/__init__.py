"""flashserve's kernel library: FlashAttention-compatible attention and fused layer helpers, written in Triton.

Dispatch (see ``flashserve.kernels._dispatch``): CUDA tensors run the Triton kernels; CPU tensors run them under
``TRITON_INTERPRET=1`` and otherwise the plain-PyTorch reference in ``flashserve.kernels.reference``;
``FLASHSERVE_ATTENTION_BACKEND=torch`` forces the reference everywhere.
"""
# -- prefill attention (foundation issue) --

# -- decode attention, merge, cache write, layer helpers (decode issue) --
