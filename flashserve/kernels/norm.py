"""RMSNorm and the fused residual-add + RMSNorm ("skip_rmsnorm"), matching Hugging Face's ``LlamaRMSNorm``.

HF computes ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``: the normalisation in fp32,
then a cast back to the input dtype, then the product with the weight. The kernels follow the same sequence (the
normalised value is rounded to the input dtype before the weight multiplies it), so with a weight of the input's
dtype the result matches HF up to the order of the fp32 sum. The output always has the input's dtype.
With programmatic dependent launch (``flashserve.kernels.pdl``) the kernel loads the norm weight, then waits for
the previous kernel. Eager calls reuse the checks and the launch plan of an input geometry seen before
(``_launch.LaunchPlan``: the compiled kernel launched without Triton's per-call argument binding).
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate, pdl
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import CachedLauncher, bounded_put, geometry_key, next_power_of_2
from flashserve.kernels.pdl import wait_for_previous
from flashserve.kernels.reference import layers as reference


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, hidden, eps,
                     stride_x, stride_residual, stride_out, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: before the PDL wait
    wait_for_previous(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        residual_row = residual_ptr + row * stride_residual + cols
        summed = (x + tl.load(residual_row, mask=mask, other=0.0).to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_row, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden
    normalised = (x * tl.math.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normalised * weight).to(out_ptr.dtype.element_ty), mask=mask)


RMS_NORM_LAUNCHER = CachedLauncher(_rms_norm_kernel)


def check_norm_weight(name: str, weight, x, eps) -> None:
    """Validate an RMSNorm's weight (passed as ``name``: (hidden,) of a float dtype on x's device, unit stride) and
    eps (>= 0) for x (..., hidden): ValueError naming the bad one."""
    _validate.check_tensor(name, weight, 1, _validate.ATTENTION_DTYPES, x.device)
    _validate.check_shape(name, weight, (x.shape[-1],))
    _validate.check_last_dim_contiguous(name, weight)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _check(x, weight, eps, residual=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the arguments; returns the (rows, hidden) views of x and residual the kernel walks."""
    _validate.check_tensor("x", x, None, _validate.ATTENTION_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    _validate.check_last_dim_contiguous("x", x)
    x_rows = _validate.rows_view("x", x)
    check_norm_weight("weight", weight, x, eps)
    if residual is None:
        return x_rows, None
    _validate.check_tensor("residual", residual, None, _validate.ATTENTION_DTYPES, x.device)
    _validate.check_shape("residual", residual, x.shape)
    _validate.check_last_dim_contiguous("residual", residual)
    return x_rows, _validate.rows_view("residual", residual)


def _normalise(x, weight, eps, residual) -> torch.Tensor:
    """``rms_norm`` (``fused_add_rms_norm`` with a residual). The checks and the launch plan of a geometry (x's,
    the weight's and the residual's shapes, strides, dtypes and devices, and eps) are made when it is first seen and
    kept (``_PLANS``) where the kernel runs."""
    geometry = geometry_key((x, weight, residual))
    key = None if geometry is None or not use_triton(x) else (geometry, eps, pdl.enabled(x.device))
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        x_rows, residual_rows = _check(x, weight, eps, residual)
        if not use_triton(x):
            if residual is None:
                return reference.rms_norm(x, weight, eps)
            return reference.fused_add_rms_norm(x, residual, weight, eps)
        plan = bounded_put(_PLANS, key, _NormPlan(x, x_rows, eps, residual_rows), _MAX_PLANS)
    return plan(x, weight, residual)


class _NormPlan:
    """The kernel launch for checked inputs of one geometry: ``plan(x, weight, residual)`` -> a new tensor shaped
    like x (residual None: no add)."""

    def __init__(self, x, x_rows, eps, residual_rows):
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        num_rows, hidden = x_rows.shape
        block = next_power_of_2(hidden)
        use_pdl = pdl.enabled(x.device)
        add_residual = residual_rows is not None
        self.launch = None if num_rows == 0 else RMS_NORM_LAUNCHER.plan((num_rows,), (
            hidden, float(eps), x_rows.stride(0), (residual_rows if add_residual else x_rows).stride(0), hidden,
        ), dict(ADD_RESIDUAL=add_residual, BLOCK=block, PDL=use_pdl), num_warps=min(16, max(1, block // 256)),
            **pdl.launch_options(use_pdl))

    def __call__(self, x, weight, residual) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # contiguous: rows of ``hidden``
        if self.launch is not None:  # x and residual stand for their (rows, hidden) views: same data pointers
            self.launch((x, x if residual is None else residual, weight, out))
        return out


_MAX_PLANS = 256
_PLANS: dict[tuple, _NormPlan] = {}  # (geometry, eps, PDL on) -> plan


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: x (..., hidden), weight (hidden,). Returns a new tensor of x's dtype.

    x may be strided as long as its rows view as (rows, hidden) with the last dimension contiguous (it is never
    copied); otherwise ValueError. Zero rows give an empty result."""
    return _normalise(x, weight, eps, None)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Residual add then RMSNorm, fused: the pre-norm transformer's ``residual = x + residual; rms_norm(residual)``.

    Modifies ``residual`` in place: it becomes ``x + residual`` (added in fp32, rounded to residual's dtype, as the
    unfused ``x + residual`` would be). ``x`` is not modified. Returns a new tensor (x's dtype) holding
    ``rms_norm(residual_after_add, weight, eps)``.

    Args:
        x, residual: (..., hidden), same shape, each viewable as (rows, hidden) with the last dimension contiguous
            (ValueError otherwise; neither is copied).
        weight: (hidden,).
    """
    return _normalise(x, weight, eps, residual)
