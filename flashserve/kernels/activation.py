"""``silu_and_mul``: the gated activation of Llama/Qwen MLPs, ``silu(gate) * up`` on the two halves of x."""
import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import CachedLauncher, cdiv, next_power_of_2
from flashserve.kernels.reference import layers as reference


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, intermediate, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


SILU_AND_MUL_LAUNCHER = CachedLauncher(_silu_and_mul_kernel)  # (no Triton argument binding per launch)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2I) -> (..., I): ``silu(x[..., :I]) * x[..., I:]``, in fp32 and rounded once to x's dtype.

    x may be strided as long as its rows view as (rows, 2I) with the last dimension contiguous (it is never
    copied); otherwise ValueError."""
    _validate.check_tensor("x", x, None, _validate.ATTENTION_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension (gate and up halves), got shape {tuple(x.shape)}")
    _validate.check_last_dim_contiguous("x", x)
    rows = _validate.rows_view("x", x)
    if not use_triton(x):
        return reference.silu_and_mul(x)
    intermediate = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], intermediate, dtype=x.dtype, device=x.device)
    out_rows = out.view(-1, intermediate)
    if rows.shape[0] == 0 or intermediate == 0:
        return out
    block = min(1024, next_power_of_2(intermediate))
    grid = (rows.shape[0], cdiv(intermediate, block))
    SILU_AND_MUL_LAUNCHER(grid, (rows, out_rows, intermediate, rows.stride(0), out_rows.stride(0)), dict(BLOCK=block),
                          num_warps=4)
    return out
