"""Argument checks of the small-M matrix products (``skinny_gemm``) and of their RMSNorm-prologue variants
(``norm_linear``): ValueError naming the bad argument."""
from flashserve.kernels import _validate
from flashserve.kernels.norm import check_norm_weight


def check_product(x, weight, bias, residual, gated: bool) -> int:
    """Validate the arguments of ``linear`` (``linear_silu_and_mul`` when ``gated``; ValueError naming the bad
    one); returns the number of output features."""
    _validate.check_tensor("x", x, None, _validate.ATTENTION_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    _validate.check_last_dim_contiguous("x", x)
    _validate.check_tensor("weight", weight, 2, (x.dtype,), x.device)
    _validate.check_last_dim_contiguous("weight", weight)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, {x.shape[-1]}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"weight must have an even number of rows (gate and up halves), got {weight.shape[0]}")
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    if bias is not None:
        _validate.check_tensor("bias", bias, 1, (x.dtype,), x.device)
        _validate.check_shape("bias", bias, (weight.shape[0],))
        _validate.check_last_dim_contiguous("bias", bias)
    if residual is not None:
        _validate.check_tensor("residual", residual, None, (x.dtype,), x.device)
        _validate.check_shape("residual", residual, (*x.shape[:-1], n_out))
        _validate.check_last_dim_contiguous("residual", residual)
    return n_out


def check_norm(x, norm_weight, eps) -> None:
    """Validate the RMSNorm arguments of ``rms_norm_linear``: norm_weight (K,) of a float dtype on x's device,
    eps >= 0 (``norm.check_norm_weight``)."""
    check_norm_weight("norm_weight", norm_weight, x, eps)
