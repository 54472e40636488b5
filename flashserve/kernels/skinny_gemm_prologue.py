"""The RMSNorm prologue of the small-M matrix product's grid kernel (``skinny_gemm``, NORM configs): the rows' rstd
from a pre-pass over x, then each x tile normalised as the unfused ``flashserve.kernels.rms_norm`` rounds it
(see norm.py: ``x * rstd`` rounded to x's dtype, times the norm weight, rounded again) before it meets the weight.
"""
import triton
import triton.language as tl


@triton.jit
def row_rstd(x_ptr, rows, M, K, stride_xm, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``rsqrt(mean(x[row, :K] ** 2) + eps)`` in fp32 for each of ``rows`` (BLOCK_M,), over the whole of K (a split
    of split-K needs the full row too); rows >= M read zeros."""
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = (rows < M)[None, :]
    ptrs = x_ptr + rows[None, :] * stride_xm + offs_k[:, None]
    sum_sq = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        xt = tl.load(ptrs + k, mask=row_mask & ((offs_k + k) < K)[:, None], other=0.0).to(tl.float32)
        sum_sq += xt * xt
    return tl.math.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)


@triton.jit
def normalise(x, rstd, norm_weight):
    """``(x * rstd)`` rounded to x's dtype, times ``norm_weight``, rounded to x's dtype again; x a tile of the
    input, rstd and norm_weight broadcastable to it."""
    dtype = x.dtype
    normalised = (x.to(tl.float32) * rstd).to(dtype).to(tl.float32)
    return (normalised * norm_weight.to(tl.float32)).to(dtype)
