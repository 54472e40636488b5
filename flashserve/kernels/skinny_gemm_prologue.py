"""The RMSNorm prologue of the small-M matrix product's grid kernel (``skinny_gemm``, NORM configs): the rows' rstd
from a pre-pass over x, then each x tile normalised as the unfused ``flashserve.kernels.rms_norm`` rounds it
(see norm.py: ``x * rstd`` rounded to x's dtype, times the norm weight, rounded again) before it meets the weight.

The pre-pass runs after the PDL wait, before the weight stream starts, so its latency is on every program's path:
it reads (NORM_ROWS, NORM_K) row-major tiles (16-byte loads along K), ``prepass_tile`` elements per program at
once, so that one row of K <= 4096 (4 warps) is a single round trip to L2.
"""
import triton
import triton.language as tl

from flashserve.kernels._launch import next_power_of_2

PREPASS_ELEMENTS_PER_THREAD = 32  # fp32 sums of squares each thread holds in the pre-pass


def prepass_tile(num_rows: int, k: int, num_warps: int) -> tuple[int, int]:
    """(NORM_ROWS, NORM_K) of the pre-pass over x's ``num_rows`` rows of ``k``: the rows padded to a power of two,
    and as much of K as PREPASS_ELEMENTS_PER_THREAD per thread allow."""
    norm_rows = next_power_of_2(num_rows)
    budget = PREPASS_ELEMENTS_PER_THREAD * 32 * num_warps // norm_rows
    return norm_rows, max(16, min(next_power_of_2(k), budget))


@triton.jit
def row_rstd(x_ptr, rows, M, K, stride_xm, eps, BLOCK_M: tl.constexpr, NORM_ROWS: tl.constexpr,
             NORM_K: tl.constexpr):
    """``rsqrt(mean(x[row, :K] ** 2) + eps)`` in fp32 for each of ``rows`` (BLOCK_M,), over the whole of K (a split
    of split-K needs the full row too); the values of rows >= M are never used (their products are not stored)."""
    norm_rows = tl.arange(0, NORM_ROWS)
    cols = tl.arange(0, NORM_K)
    ptrs = x_ptr + norm_rows[:, None] * stride_xm + cols[None, :]
    row_mask = (norm_rows < M)[:, None]
    sum_sq = tl.zeros((NORM_ROWS, NORM_K), dtype=tl.float32)
    for k in range(0, K, NORM_K):
        x = tl.load(ptrs + k, mask=row_mask & ((cols + k) < K)[None, :], other=0.0).to(tl.float32)
        sum_sq += x * x
    rstd = tl.math.rsqrt(tl.sum(sum_sq, axis=1) / K + eps)
    if NORM_ROWS == BLOCK_M:
        return rstd
    # The kernel pads its rows tile further (tl.dot's 16): spread the NORM_ROWS values over it.
    return tl.sum(tl.where(rows[:, None] == norm_rows[None, :], rstd[None, :], 0.0), axis=1)


@triton.jit
def normalise(x, rstd, norm_weight):
    """``(x * rstd)`` rounded to x's dtype, times ``norm_weight``, rounded to x's dtype again; x a tile of the
    input, rstd and norm_weight broadcastable to it."""
    dtype = x.dtype
    normalised = (x.to(tl.float32) * rstd).to(dtype).to(tl.float32)
    return (normalised * norm_weight.to(tl.float32)).to(dtype)
