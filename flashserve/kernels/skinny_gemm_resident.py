"""The resident schedule of the small-M matrix product (``skinny_gemm``, configs with ``resident``): each program
loads its whole weight tile — ``BLOCK_N`` output features (gate and up rows when gated) by all of K — in one go,
*before* its PDL wait, then multiplies it with x once the previous kernel is done.

Why: at decode batch sizes a projection's time inside a chain of kernels is its bytes over the bandwidth plus a
fixed ~3.7 µs (H200, session 8: a 4.2 MB weight takes as long as an 8.4 MB one). That fixed part is the chain of
dependent memory round trips after the wait — the weight stream's first loads, the loop's later ones, split-K's
partials and ticket, the store. Weights are never written by a kernel, so nothing stops a program from reading
its share of them while the previous kernel still runs: with programmatic dependent launch (``pdl``) this kernel's
programs start when the previous kernel's programs pass their own wait, issue every weight load at once, and
after their wait only x (and the residual) remain to be read. Without PDL the kernel is a plain one-tile-per-program
product (no loop, no split-K).

The tile lives in registers: ``BLOCK_N * next_power_of_2(K)`` elements (twice that when gated) per program, which
bounds it to the small models' projections (``MAX_TILE_BYTES``). The product runs on ``tl.dot`` (up to 16 rows,
padded to 16; ``BLOCK_N >= 16``) or, for up to ``FMA_MAX_ROWS`` rows, on FMAs one row at a time against the same tile.
Rounding and the epilogue are those of the grid kernel (``skinny_gemm_epilogue``). With NORM (``norm_linear``)
x is normalised as the grid kernel's RMSNorm prologue does (``skinny_gemm_prologue.normalise``), at no extra round
trip: every program holds whole rows of x anyway, so each computes the rows' rstd from the tile it multiplies, and
the norm weight, which no kernel writes, is loaded before the wait with the weight tile.
"""
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels._launch import CachedLauncher, LaunchPlan, cdiv, next_power_of_2
from flashserve.kernels.pdl import wait_for_previous
from flashserve.kernels.skinny_gemm_epilogue import epilogue
from flashserve.kernels.skinny_gemm_prologue import normalise

__all__ = ["MAX_TILE_BYTES", "FMA_MAX_ROWS", "DOT_MAX_ROWS", "fits", "launch_plan"]
MAX_TILE_BYTES = 64 * 1024  # weight bytes (K padded to a power of two) one program holds in registers
FMA_MAX_ROWS = 8  # the FMA product walks the rows one at a time: up to this many
DOT_MAX_ROWS = 16  # tl.dot's row tile (x's (K, 16) operand beside the weight tile in shared memory)


@triton.jit(do_not_specialize=["M"])
def _resident_gemm_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, norm_weight_ptr, out_ptr, M, n_out, K,
                          stride_xm, stride_wn, stride_rm, stride_om, eps, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                          USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, K_PAD)
    k_mask = offs_k < K
    # Features past n_out wrap around to valid weight rows (no row mask); their results are never stored.
    w_ptrs = w_ptr + (cols % n_out).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # Before the wait only the weights, which no kernel writes (pdl's rule): the whole tile, all loads in flight.
    if EVEN_K:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
    w_up = w
    if GATED:
        if EVEN_K:
            w_up = tl.load(w_ptrs + n_out * stride_wn)
        else:
            w_up = tl.load(w_ptrs + n_out * stride_wn, mask=k_mask[None, :], other=0.0)
    norm_weight = tl.load(norm_weight_ptr + offs_k, mask=k_mask, other=0.0) if NORM else 0.0
    wait_for_previous(PDL)
    if USE_DOT:
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_k[:, None], mask=(rows < M)[None, :] & k_mask[:, None],
                     other=0.0)
        if NORM:
            xt = normalise(xt, _rstd(xt, K, eps, 0)[None, :], norm_weight[:, None])
        acc = tl.dot(w, xt, input_precision=DOT_PRECISION)
        acc_up = acc
        if GATED:
            acc_up = tl.dot(w_up, xt, input_precision=DOT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up = acc
        for m in tl.static_range(BLOCK_M):
            row_k = tl.where(m < M, K, 0)  # a row past M reads nothing
            x_row = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < row_k, other=0.0)
            if NORM:
                x_row = normalise(x_row, _rstd(x_row[None, :], K, eps, 1), norm_weight)
            x_row = x_row.to(tl.float32)
            dot_m = tl.sum(w.to(tl.float32) * x_row[None, :], axis=1)
            acc = tl.where(rows[None, :] == m, dot_m[:, None], acc)
            if GATED:
                up_m = tl.sum(w_up.to(tl.float32) * x_row[None, :], axis=1)
                acc_up = tl.where(rows[None, :] == m, up_m[:, None], acc_up)
    epilogue(acc, acc_up, rows, cols, M, n_out, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om,
             HAS_BIAS, HAS_RESIDUAL, GATED)


@triton.jit
def _rstd(x, K, eps, axis: tl.constexpr):
    """RMSNorm's ``rsqrt(mean(x ** 2) + eps)`` in fp32 along ``axis`` of a tile holding whole rows of x (zero-padded
    past K), as ``skinny_gemm_prologue.row_rstd`` computes it."""
    x = x.to(tl.float32)
    return tl.math.rsqrt(tl.sum(x * x, axis=axis) / K + eps)


LAUNCHER = CachedLauncher(_resident_gemm_kernel)


def tile_bytes(k: int, block_n: int, gated: bool, element_bytes: int) -> int:
    """Register bytes of one program's weight tile (K padded to a power of two)."""
    return (2 if gated else 1) * block_n * next_power_of_2(k) * element_bytes


def fits(num_rows: int, k: int, block_n: int, gated: bool, element_bytes: int, use_dot: bool) -> bool:
    """Whether a resident config of ``block_n`` features can serve ``num_rows`` rows of K: its tile within
    MAX_TILE_BYTES, tl.dot's 16 features and DOT_MAX_ROWS rows, the FMA path's FMA_MAX_ROWS rows."""
    if tile_bytes(k, block_n, gated, element_bytes) > MAX_TILE_BYTES:
        return False
    return block_n >= 16 and num_rows <= DOT_MAX_ROWS if use_dot else num_rows <= FMA_MAX_ROWS


def launch_plan(x_rows, weight, has_bias: bool, has_residual: bool, stride_rm: int, gated: bool, config,
                block_m: int, norm: bool = False, eps: float = 0.0) -> LaunchPlan:
    """The ``LaunchPlan`` of one resident launch (tensors: x_rows, weight, bias, residual, norm weight, out; absent
    ones passed as any tensor of the dtype) for inputs of this geometry, with the RMSNorm of ``eps`` applied to x
    where ``norm``; ValueError where ``config`` cannot serve them."""
    num_rows, k = x_rows.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    if not fits(num_rows, k, config.block_n, gated, weight.element_size(), config.use_dot):
        raise ValueError(f"a resident tile of {config.block_n} features cannot serve {num_rows} rows of K {k} "
                         f"(gated {gated}): over {MAX_TILE_BYTES} bytes, or the product's row limit")
    use_pdl = pdl.enabled(x_rows.device)
    k_pad = next_power_of_2(k)
    return LAUNCHER.plan((cdiv(n_out, config.block_n),), (
        num_rows, n_out, k, x_rows.stride(0), weight.stride(0), stride_rm, n_out, float(eps),
    ), dict(
        BLOCK_M=block_m if config.use_dot else next_power_of_2(num_rows), BLOCK_N=config.block_n, K_PAD=k_pad,
        EVEN_K=k == k_pad, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, GATED=gated, NORM=norm,
        USE_DOT=config.use_dot,
        DOT_PRECISION="ieee" if x_rows.dtype.itemsize == 4 else "tf32", PDL=use_pdl,
    ), num_warps=config.num_warps, num_stages=1, **pdl.launch_options(use_pdl))
