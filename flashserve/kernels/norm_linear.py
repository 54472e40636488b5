"""RMSNorm folded into the next matrix product: ``rms_norm_linear`` (``rms_norm(x) @ weight.T + bias``, optionally
plus a residual) and ``rms_norm_linear_silu_and_mul`` (the same into a SwiGLU gate/up product): the pre-norm
transformer's ``input_layernorm`` + QKV and ``post_attention_layernorm`` + gate/up in one launch at decode batch
sizes.

The small-M grid kernel of ``skinny_gemm`` runs with its RMSNorm prologue (NORM): every program first reads its
rows of x over the whole of K (each split of split-K too) for ``rstd = rsqrt(mean(x ** 2) + eps)`` in fp32, then
normalises each x tile as the unfused ``flashserve.kernels.rms_norm`` does — ``x * rstd`` rounded to x's dtype,
times the norm weight, rounded again — before the product. So the result equals ``rms_norm`` then ``linear`` (or
``linear_silu_and_mul``) up to the order of the fp32 sums (of the squares and of the product). Rows are padded
and masked as in the plain product; x's rows need only unit stride in K.

A resident plan (``skinny_gemm_resident``) normalises the same way without a pre-pass: its programs hold whole
rows of x, so the rstd comes from the tile they multiply.

The normed call shares the plain product's launch plan (same key, same config: the pre-pass adds no shared memory
and is small against the weight a program streams, see ``NORM_MAX_X_BYTES``). Where the kernel does not fold
(``folds``) — torch by ``use_triton``, a cuBLAS plan, a stream-K plan (no prologue there), a grid-kernel plan with
x larger than ``NORM_MAX_X_BYTES`` — the ``rms_norm`` kernel runs, then ``linear`` / ``linear_silu_and_mul`` on its
output: the same results, two launches.
"""
import math

import torch

from flashserve.kernels import pdl, skinny_gemm, skinny_gemm_plans
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import bounded_put, geometry_key
from flashserve.kernels.norm import rms_norm
from flashserve.kernels.skinny_gemm import linear, linear_silu_and_mul
from flashserve.kernels.skinny_gemm_checks import check_norm, check_product

__all__ = ["NORM_MAX_X_BYTES", "folds", "max_fused_rows", "rms_norm_linear", "rms_norm_linear_silu_and_mul"]
# Every program's pre-pass re-reads all of x (M x K, from L2) after its PDL wait and before its weight stream
# starts, so it is latency on every program's path, and L2 traffic of M / BLOCK_N (x split_k) of the weight bytes a
# program reads from HBM. Folded while x is at most this: at most 4 round trips of the pre-pass's 8 KB tiles (4
# warps), against the ~2-3 µs launch of the separate norm it saves: <= 16 rows at Qwen3-0.6B's K = 1024, <= 4 at
# Llama-3.1-8B's 4096 (bf16), where the extra L2 reads are <= 1/2 of the weight bytes of the decode plans' tiles
# (BLOCK_N >= 32, no split-K on QKV or gate/up). Larger x: two launches.
# Off (0) by default: on the H200 (2026-12-02, B1 graphs under PDL) folding at 32 KB made the step slower,
# Qwen3-0.6B 1.068 -> 1.198 ms and Llama-3.1-8B 4.538 -> 4.975 ms: the pre-pass after the PDL wait costs the
# products more than the separate norm launch it saves. Set it (e.g. 32 * 1024) to fold. A resident plan
# (``skinny_gemm_resident``) folds whatever this says: its programs hold whole rows of x already.
NORM_MAX_X_BYTES = 0


def max_fused_rows(k: int, element_bytes: int) -> int:
    """The most rows of K elements of ``element_bytes`` the prologue takes (NORM_MAX_X_BYTES of x)."""
    return NORM_MAX_X_BYTES // (k * element_bytes)


def _folds(config, num_rows: int, k: int, element_bytes: int) -> bool:
    if config is None or config.programs_per_sm:
        return False
    return config.resident or num_rows <= max_fused_rows(k, element_bytes)


def folds(num_rows: int, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> bool:
    """Whether ``rms_norm_linear`` (``rms_norm_linear_silu_and_mul`` when ``gated``) of ``num_rows`` rows with this
    weight and bias runs as one launch: the plan is the kernel's, and resident (the norm is free there) or the
    grid kernel's with x within ``NORM_MAX_X_BYTES``."""
    config = skinny_gemm.plan(num_rows, weight, bias, gated)
    return _folds(config, num_rows, weight.shape[1], weight.element_size())


_MAX_CALLS = 256
# (geometry, eps, gated, PDL generation, NORM_MAX_X_BYTES) -> (plans' generation, the folded launch's
# skinny_gemm.ProductCall, or None: two launches)
_CALLS: dict[tuple, tuple] = {}


def _run(x, norm_weight, eps: float, weight, bias, residual, gated: bool) -> torch.Tensor:
    """The checks, the plan and the launch plan of a geometry are made when it is first seen and kept (``_CALLS``)
    while ``skinny_gemm_plans.generation`` stays the same, as ``skinny_gemm`` keeps those of the plain product."""
    geometry = geometry_key((x, norm_weight, weight, bias, residual))
    key = None if geometry is None or not use_triton(x) else (geometry, eps, gated, pdl.generation,
                                                               NORM_MAX_X_BYTES)
    entry = _CALLS.get(key) if key is not None else None
    if entry is None or entry[0] != skinny_gemm_plans.generation:
        n_out = check_product(x, weight, bias, residual, gated)
        check_norm(x, norm_weight, eps)
        num_rows = math.prod(x.shape[:-1])
        config = skinny_gemm.plan(num_rows, weight, bias, gated)
        call = None
        if _folds(config, num_rows, x.shape[-1], x.element_size()):
            call = skinny_gemm.ProductCall(x, weight, bias, residual, gated, n_out, config, True, eps)
        entry = bounded_put(_CALLS, key, (skinny_gemm_plans.generation, call), _MAX_CALLS)
    if entry[1] is not None:
        return entry[1](x, weight, bias, residual, norm_weight)
    normed = rms_norm(x, norm_weight, eps)
    return linear_silu_and_mul(normed, weight, bias) if gated else linear(normed, weight, bias, residual)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``rms_norm(x, norm_weight, eps) @ weight.T + bias (+ residual)``: x (..., K), norm_weight (K,), weight (N, K),
    bias (N,), residual (..., N); x, weight, bias and residual of one dtype and device, unit stride in the last
    dimension; returns a new (..., N) tensor of x's dtype, rounded as the unfused ``rms_norm`` then ``linear``
    round (module docstring). ValueError naming a bad argument."""
    return _run(x, norm_weight, eps, weight, bias, residual, False)


def rms_norm_linear_silu_and_mul(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_silu_and_mul(rms_norm(x, norm_weight, eps), weight, bias)``: weight (2I, K) holds the gate rows then
    the up rows (bias (2I,) likewise); x (..., K) -> (..., I) of x's dtype."""
    return _run(x, norm_weight, eps, weight, bias, None, True)
