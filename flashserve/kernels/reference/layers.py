"""Plain-PyTorch references of the layer helpers: RMSNorm (HF ``LlamaRMSNorm``), fused residual add + RMSNorm,
rotary embedding in place, the fused q/k norm + rotary + cache write, ``silu_and_mul``, the small-M products and
RMSNorm folded into them. Same contracts as the kernels in ``norm.py``, ``rotary.py``, ``qk_rope_cache.py``,
``activation.py``, ``skinny_gemm.py`` and ``norm_linear.py``."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """HF LlamaRMSNorm: fp32 normalisation, cast to ``dtype`` (default x's), times the weight; returned in that
    dtype."""
    dtype = dtype or x.dtype
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * hidden.to(dtype).float()).to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``residual += x`` (in place, fp32 add rounded to residual's dtype), returns ``rms_norm(residual)`` in x's
    dtype (the stored residual is normalised as it is, also when its dtype differs from x's)."""
    residual.copy_((x.float() + residual.float()).to(residual.dtype))
    return rms_norm(residual, weight, eps, x.dtype)


def rotary_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                    interleaved: bool) -> None:
    """Rotate the first ``2 * cos.shape[1]`` features of x (T, H, D) in place at ``positions`` (T,).

    cos, sin: (P, rotary_dim / 2). ``interleaved`` pairs (2j, 2j+1), otherwise (j, j + rotary_dim / 2).
    """
    half = cos.shape[1]
    c = cos[positions.long()].float().unsqueeze(1)  # (T, 1, half)
    s = sin[positions.long()].float().unsqueeze(1)
    rot = x[..., : 2 * half].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    out1, out2 = x1 * c - x2 * s, x2 * c + x1 * s
    if interleaved:
        rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((out1, out2), dim=-1)
    x[..., : 2 * half] = rotated.to(x.dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor | None, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                 is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of ``flashserve.kernels.rotary.apply_rotary``: q and k rotated in place and returned."""
    half = cos_sin_cache.shape[1] // 2
    cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
    rotary_in_place(q, cos, sin, positions, not is_neox)
    if k is not None:
        rotary_in_place(k, cos, sin, positions, not is_neox)
    return q, k


def qk_norm_rope_and_cache(q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping,
                           q_norm_weight=None, k_norm_weight=None, eps=1e-6, is_neox=True):
    """Reference of ``flashserve.kernels.qk_rope_cache.qk_norm_rope_and_cache``: q and k normed (with weights)
    and rotated in place, k and v written to the caches (when given); returns q, k."""
    from flashserve.kernels.reference.decode import reshape_and_cache_flash  # decode.py imports this module

    if q_norm_weight is not None:
        q.copy_(rms_norm(q, q_norm_weight, eps))
        k.copy_(rms_norm(k, k_norm_weight, eps))
    apply_rotary(q, k, cos_sin_cache, positions, is_neox)
    if key_cache is not None:
        reshape_and_cache_flash(k, v, key_cache, value_cache, slot_mapping)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2I) -> silu(x[..., :I]) * x[..., I:] computed in fp32, returned in x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``flashserve.kernels.skinny_gemm.linear``: ``F.linear`` in x's dtype, then the residual added
    in fp32 and rounded to x's dtype (one in-place add: torch computes 16-bit float sums in fp32 and rounds once,
    on the CPU as on CUDA; the kernel fallback's add after a cuBLAS product is this single launch)."""
    out = torch.nn.functional.linear(x, weight, bias)
    return out if residual is None else out.add_(residual)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``flashserve.kernels.skinny_gemm.linear_silu_and_mul``: ``silu_and_mul(F.linear(x, weight,
    bias))``."""
    return silu_and_mul(torch.nn.functional.linear(x, weight, bias))


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``flashserve.kernels.norm_linear.rms_norm_linear``: ``rms_norm`` (rounded to x's dtype), then
    ``linear``."""
    return linear(rms_norm(x, norm_weight, eps), weight, bias, residual)


def rms_norm_linear_silu_and_mul(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``flashserve.kernels.norm_linear.rms_norm_linear_silu_and_mul``: ``rms_norm``, then
    ``linear_silu_and_mul``."""
    return linear_silu_and_mul(rms_norm(x, norm_weight, eps), weight, bias)
