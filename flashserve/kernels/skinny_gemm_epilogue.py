"""The epilogue shared by the small-M matrix product kernels (``skinny_gemm`` and ``skinny_gemm_streamk``): bias,
rounding to the output dtype, SiLU-and-mul and residual add on a (features x rows) fp32 tile, then the store."""
import triton
import triton.language as tl


@triton.jit
def epilogue(acc, acc_up, rows, cols, M, n_out, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om,
             HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    """Store the (BLOCK_N, BLOCK_M) fp32 tile ``acc`` (features x rows; ``acc_up`` the up half when GATED) as
    out[rows, cols] after bias, rounding to the output dtype, SiLU-and-mul and residual add."""
    dtype = out_ptr.dtype.element_ty
    col_mask = cols < n_out
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
    y = acc.to(dtype).to(tl.float32)
    if GATED:
        if HAS_BIAS:
            acc_up += tl.load(bias_ptr + n_out + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
        up = acc_up.to(dtype).to(tl.float32)
        y = y / (1.0 + tl.exp(-y)) * up
    mask = col_mask[:, None] & (rows < M)[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + rows[None, :] * stride_rm + cols[:, None], mask=mask, other=0.0)
        y += residual.to(tl.float32)
    tl.store(out_ptr + rows[None, :] * stride_om + cols[:, None], y.to(dtype), mask=mask)
