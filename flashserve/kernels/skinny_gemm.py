"""Small-M matrix products at the memory-bandwidth limit: ``linear`` (``x @ weight.T + bias``, optionally plus a
residual) and ``linear_silu_and_mul`` (a SwiGLU gate/up product with ``silu(gate) * up`` in its epilogue), for the
decode batch sizes, M <= ``MAX_ROWS`` rows.

With so few rows a projection reads its whole weight to produce a few output rows: its time is the weight's bytes
over the HBM bandwidth, and cuBLAS's tiles (made for large M) leave much of that bandwidth unused. The kernel
computes the transposed product ``out.T = weight @ x.T``: a program owns ``BLOCK_N`` output features and one of
``split_k`` ranges of K (split-K: when the feature blocks alone are too few to fill the GPU), streams its
(BLOCK_N, BLOCK_K) weight tiles through Triton's software pipeline and multiplies each with the (BLOCK_K, BLOCK_M)
tile of ``x.T`` on the tensor cores (BLOCK_M: the rows padded to a power of two >= 16; padding rows are masked),
or, for one row, with FMAs into per-K partial sums reduced at the end (``use_dot=False`` configs).
Each weight byte is read once. With ``split_k == 1`` the epilogue (bias, SiLU-and-mul, residual) runs in the same
program; otherwise every split writes an fp32 partial tile and the split that finishes last (an atomic ticket per
feature block) adds all of them in split order (results are deterministic) and runs the epilogue — one launch,
no memset: the last split also resets its ticket counter. Configs with ``programs_per_sm`` run the stream-K schedule
of ``skinny_gemm_streamk`` instead (a persistent grid sharing the weight's tiles equally between the SMs), configs
with ``resident`` the schedule of ``skinny_gemm_resident`` (each program's whole weight tile loaded before the PDL
wait: small models' projections at decode batch sizes).

With NORM (``norm_linear.rms_norm_linear`` and its gated variant) x passes through the RMSNorm prologue of
``skinny_gemm_prologue`` on both paths and in every split, and through the resident kernel's own (the stream-K
kernel has none).

Rounding follows the unfused operations: ``x @ weight.T + bias`` is rounded to x's dtype, then the SiLU-and-mul
(``silu(gate) * up`` in fp32, as ``flashserve.kernels.silu_and_mul``) or the residual add (fp32) is applied and
the result rounded once more.

Which implementation runs: torch (``F.linear``, then the ``silu_and_mul`` kernel or the add) when ``use_triton``
says so (CPU without ``TRITON_INTERPRET=1``, ``FLASHSERVE_ATTENTION_BACKEND=torch``), for more than ``MAX_ROWS``
rows, and where the launch plan of ``skinny_gemm_plans`` found cuBLAS faster; the kernel with the plan's config
otherwise.
No call synchronises with the host, so the kernel path can be captured in a CUDA graph. Eager calls are cheap on
the host: the checks, the plan and the launch arithmetic of each input geometry are made once and kept, and the
launch goes straight to the compiled kernel (``_launch.LaunchPlan``).

Where ``flashserve.kernels.pdl.enabled`` (Hopper and newer), the grid kernel launches with programmatic dependent
launch: while the previous kernel still runs, each program of a weight of at most ``PDL_PREFETCH_MAX_BYTES`` asks
L2 for the first ``PDL_PREFETCH_K`` columns of its weight rows (all of K = 1024 at Qwen3-0.6B's hidden size; weights
are never written by a kernel), then waits for that kernel (``gdc_wait``) before touching x, the residual, the
counters or any output. Larger weights skip the prefetch (only the launch overlaps): the resident programs' first
1024 columns of a Llama-3.1-8B gate/up weight are more than L2 holds, and with the prefetch its B1 decode step was
3% slower under PDL than without (H200, 2026-12-02).
"""
import logging
import math

import torch
import triton
import triton.compiler.errors
import triton.language as tl
import triton.runtime.errors

from flashserve.kernels import pdl, skinny_gemm_plans, skinny_gemm_resident, skinny_gemm_streamk
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import CachedLauncher, LaunchPlan, bounded_put, cdiv, geometry_key
from flashserve.kernels.activation import silu_and_mul
from flashserve.kernels.counters import zeroed_counters
from flashserve.kernels.pdl import prefetch_l2, wait_for_previous
from flashserve.kernels.reference import layers as reference
from flashserve.kernels.scratch import SCRATCH
from flashserve.kernels.skinny_gemm_checks import check_product
from flashserve.kernels.skinny_gemm_epilogue import epilogue
from flashserve.kernels.skinny_gemm_plans import MAX_ROWS, GemmConfig
from flashserve.kernels.skinny_gemm_prologue import normalise, prepass_tile, row_rstd

__all__ = ["MAX_ROWS", "linear", "linear_silu_and_mul", "launch", "plan"]
LOGGER = logging.getLogger("flashserve")
PDL_PREFETCH_K = 1024  # weight elements per row a program pulls into L2 before its PDL wait
PDL_PREFETCH_MAX_BYTES = 16 * 2 ** 20  # weights up to this size prefetch (a third of an H100/H200's L2)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, norm_weight_ptr, out_ptr, partial_ptr, counter_ptr,
                        M, n_out, K, k_per_split, split_k, stride_xm, stride_wn, stride_rm, stride_om, eps,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, NORM_ROWS: tl.constexpr,
                        NORM_K: tl.constexpr, USE_DOT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr, PREFETCH_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    # Features past n_out wrap around to valid weight rows (no load mask); their results are never stored.
    w_rows = (cols % n_out).to(tl.int64)
    k_start = pid_k * k_per_split
    if PDL and PREFETCH_K > 0:
        # Until the wait (the previous kernel complete, its writes visible) touch only the weights, which no kernel
        # writes: pull the first PREFETCH_K of its K range into L2 (one hint per 64 elements of a row).
        k_end = tl.minimum(k_start + k_per_split, K)
        lines = tl.minimum(k_start + tl.arange(0, PREFETCH_K // 64) * 64, k_end - 1)
        prefetch_ptrs = w_ptr + w_rows[:, None] * stride_wn + lines[None, :]
        prefetch_l2(prefetch_ptrs)
        if GATED:
            prefetch_l2(prefetch_ptrs + n_out * stride_wn)
    wait_for_previous(PDL)
    if NORM:
        rstd = row_rstd(x_ptr, rows, M, K, stride_xm, eps, BLOCK_M, NORM_ROWS, NORM_K)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :]
    w_up_ptrs = w_ptr + (w_rows + n_out)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + rows[None, :] * stride_xm + offs_k[:, None]
    row_mask = (rows < M)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # USE_DOT False (one row): FMAs into (BLOCK_N, BLOCK_K) partial sums, reduced over K after the loop.
    acc_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_k_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            if GATED:
                w_up = tl.load(w_up_ptrs)
        else:
            k_mask = (offs_k + k) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            if GATED:
                w_up = tl.load(w_up_ptrs, mask=k_mask[None, :], other=0.0)
        if NORM:
            if EVEN_K:
                norm_weight = tl.load(norm_weight_ptr + offs_k + k)
            else:
                norm_weight = tl.load(norm_weight_ptr + offs_k + k, mask=k_mask, other=0.0)
        if USE_DOT:
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=row_mask, other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=row_mask & k_mask[:, None], other=0.0)
            if NORM:
                xt = normalise(xt, rstd[None, :], norm_weight[:, None])
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
            if GATED:
                acc_up = tl.dot(w_up, xt, acc_up, input_precision=DOT_PRECISION)
        else:
            if EVEN_K:
                x_row = tl.load(x_ptr + offs_k[None, :] + k)
            else:
                x_row = tl.load(x_ptr + offs_k[None, :] + k, mask=k_mask[None, :], other=0.0)
            if NORM:
                x_row = normalise(x_row, rstd[:, None], norm_weight[None, :])
            x_row = x_row.to(tl.float32)
            acc_k += w.to(tl.float32) * x_row
            if GATED:
                acc_k_up += w_up.to(tl.float32) * x_row
        w_ptrs += BLOCK_K
        w_up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not USE_DOT:
        acc = tl.sum(acc_k, axis=1)[:, None]
        acc_up = tl.sum(acc_k_up, axis=1)[:, None]
    if SPLIT:
        # Split-K in one launch: every split stores its fp32 partial tile into (split_k, BLOCK_M, width) and takes
        # a ticket; the split that arrives last (the atomic orders the stores before it) sums all the partials in
        # split order, runs the epilogue and resets the feature block's counter to 0 for the next launch.
        padded = tl.num_programs(0) * BLOCK_N
        width = 2 * padded if GATED else padded
        tile = partial_ptr + rows[None, :] * width + cols[:, None]
        tl.store(tile + pid_k * BLOCK_M * width, acc)
        if GATED:
            tl.store(tile + pid_k * BLOCK_M * width + padded, acc_up)
        tl.debug_barrier()  # every thread's partial stores precede the (one-thread, acq_rel) ticket
        ticket = tl.atomic_add(counter_ptr + pid_n, 1)
        if ticket == split_k - 1:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in range(0, split_k):
                acc += tl.load(tile + split * BLOCK_M * width, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(tile + split * BLOCK_M * width + padded, cache_modifier=".cg")
            tl.store(counter_ptr + pid_n, 0)
            epilogue(acc, acc_up, rows, cols, M, n_out, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om,
                     HAS_BIAS, HAS_RESIDUAL, GATED)
    else:
        epilogue(acc, acc_up, rows, cols, M, n_out, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om,
                 HAS_BIAS, HAS_RESIDUAL, GATED)


skinny_gemm_plans.attach(_skinny_gemm_kernel, skinny_gemm_streamk._streamk_kernel,
                         skinny_gemm_resident._resident_gemm_kernel)
GEMM_LAUNCHER = CachedLauncher(_skinny_gemm_kernel)
COUNTER_SLOTS = 4096  # split-K feature blocks (stream-K programs) one launch can have


def _split_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed split-K and stream-K counters (``counters.zeroed_counters``, owner "skinny_gemm": each
    launch leaves them zero again; made at the first such launch, outside CUDA-graph capture)."""
    return zeroed_counters(device, "skinny_gemm", COUNTER_SLOTS)


def split_layout(k: int, config: GemmConfig) -> tuple[int, int]:
    """(splits, K per split) of the grid kernel: ``config.split_k`` ways or fewer, none empty."""
    k_blocks = cdiv(k, config.block_k)
    blocks_per_split = cdiv(k_blocks, config.split_k)
    return cdiv(k_blocks, blocks_per_split), blocks_per_split * config.block_k


def launch(x_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual_rows: torch.Tensor | None,
           gated: bool, config: GemmConfig, norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """Run the kernel with ``config`` on checked arguments: x_rows (M, K) with 1 <= M <= MAX_ROWS, weight (N, K)
    (N = 2 * n_out when ``gated``), both with unit stride in K; returns out (M, n_out) in x's dtype. With
    ``norm_weight`` (K,) the product reads ``rms_norm(x_rows, norm_weight, eps)`` (the RMSNorm prologue; grid
    kernel configs only). Launches of split-K and stream-K configs on one device must not overlap (they share its
    counters: one stream)."""
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    gemm = launch_plan(x_rows, weight, bias is not None, residual_rows, gated, config, norm_weight is not None, eps)
    out = torch.empty((x_rows.shape[0], n_out), dtype=x_rows.dtype, device=x_rows.device)
    gemm(x_rows, weight, bias, residual_rows, norm_weight, out)
    return out


class GemmLaunch:
    """One launch of the grid or stream-K kernel for inputs of one geometry with one config:
    ``gemm(x_rows, weight, bias, residual_rows, norm_weight, out)`` (absent inputs None; ``out`` a fresh contiguous
    (M, n_out) tensor, or one of the same memory layout) takes the device's counters and its fp32 partials where the
    config splits K (or is stream-K), then launches through its ``LaunchPlan`` (the tensors only need the dtypes and
    data pointers of the geometry the launch was planned for). The partials are written and read within the launch:
    scratch memory (``scratch.SCRATCH``, the current stream's buffer; a PDL launch writes them after its wait)."""

    def __init__(self, plan: LaunchPlan, device: torch.device, partial_shape: tuple | None, has_norm_slot: bool):
        self.plan, self.device, self.has_norm_slot = plan, device, has_norm_slot
        self.partial_numel = 0 if partial_shape is None else math.prod(partial_shape)

    def __call__(self, x_rows, weight, bias, residual_rows, norm_weight, out) -> None:
        if not self.partial_numel:
            partial = counters = out
        else:  # (the view keeps a buffer made while capturing a CUDA graph referenced until the launch)
            partial = SCRATCH.views(self.device, self.partial_numel, (0,))[0]
            counters = _split_counters(self.device)
        tensors = (x_rows, weight, weight if bias is None else bias, out if residual_rows is None else residual_rows)
        if self.has_norm_slot:
            tensors += (weight if norm_weight is None else norm_weight,)
        self.plan(tensors + (out, partial, counters))


class ResidentLaunch:
    """``GemmLaunch``'s call for a resident config (``skinny_gemm_resident``: no partials, no counters)."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan

    def __call__(self, x_rows, weight, bias, residual_rows, norm_weight, out) -> None:
        self.plan((x_rows, weight, weight if bias is None else bias, out if residual_rows is None else residual_rows,
                   weight if norm_weight is None else norm_weight, out))


def launch_plan(x_rows: torch.Tensor, weight: torch.Tensor, has_bias: bool, residual_rows: torch.Tensor | None,
                gated: bool, config: GemmConfig, norm: bool = False, eps: float = 0.0) -> GemmLaunch:
    """The ``GemmLaunch`` of ``launch`` for inputs of this geometry (``norm``: with the RMSNorm prologue, of
    ``eps``); ValueError where the config cannot serve them."""
    device = x_rows.device
    stride_rm = residual_rows.stride(0) if residual_rows is not None else 0
    if config.resident:
        return ResidentLaunch(skinny_gemm_resident.launch_plan(
            x_rows, weight, has_bias, residual_rows is not None, stride_rm, gated, config,
            skinny_gemm_plans.block_rows(x_rows.shape[0]), norm, eps))
    if config.programs_per_sm:
        if norm:
            raise ValueError("stream-K configs have no RMSNorm prologue: norm_weight must be None")
        plan, partial_shape = skinny_gemm_streamk.launch_plan(x_rows, weight, has_bias, residual_rows is not None,
                                                              stride_rm, gated, config, COUNTER_SLOTS,
                                                              skinny_gemm_plans.device_sms(device))
        return GemmLaunch(plan, device, partial_shape, False)
    num_rows, k = x_rows.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    if not config.use_dot and num_rows != 1:
        raise ValueError(f"a config without tl.dot serves one row, got {num_rows}")
    block_m = skinny_gemm_plans.block_rows(num_rows) if config.use_dot else 1
    split_k, k_per_split = split_layout(k, config)
    n_blocks = cdiv(n_out, config.block_n)
    if split_k > 1 and n_blocks > COUNTER_SLOTS:
        raise ValueError(f"split-K needs at most {COUNTER_SLOTS} feature blocks, got {n_blocks}")
    use_pdl = pdl.enabled(device)
    norm_rows, norm_k = prepass_tile(num_rows, k, config.num_warps) if norm else (0, 0)
    prefetch = use_pdl and weight.numel() * weight.element_size() <= PDL_PREFETCH_MAX_BYTES
    plan = GEMM_LAUNCHER.plan((n_blocks, split_k), (
        num_rows, n_out, k, k_per_split, split_k, x_rows.stride(0), weight.stride(0), stride_rm, n_out, float(eps),
    ), dict(
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT=split_k > 1,
        EVEN_K=k % k_per_split == 0, HAS_BIAS=has_bias, HAS_RESIDUAL=residual_rows is not None, GATED=gated,
        NORM=norm, NORM_ROWS=norm_rows, NORM_K=norm_k, USE_DOT=config.use_dot,
        DOT_PRECISION="ieee" if x_rows.dtype == torch.float32 else "tf32", PDL=use_pdl,
        PREFETCH_K=PDL_PREFETCH_K if prefetch else 0,
    ), num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_options(use_pdl))
    partial_shape = (split_k, block_m, (2 if gated else 1) * n_blocks * config.block_n) if split_k > 1 else None
    return GemmLaunch(plan, device, partial_shape, True)


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
TUNING_WARMUP_MS, TUNING_REP_MS = 2, 10


def plan(num_rows: int, weight, bias, gated: bool) -> GemmConfig | None:
    """The kernel config ``linear`` (``linear_silu_and_mul`` when ``gated``) of ``num_rows`` rows with this weight
    runs, None where torch runs (``use_triton`` says so, no rows or more than MAX_ROWS, K == 0, the plan is cuBLAS):
    the call's own decision (it may make the plan). The kernel adds a residual within its launch."""
    k = weight.shape[1]
    if not use_triton(weight) or not 0 < num_rows <= MAX_ROWS or k == 0:
        return None
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    key = (n_out, k, skinny_gemm_plans.row_bucket(num_rows), _DTYPE_NAMES[weight.dtype], gated)
    config = skinny_gemm_plans.lookup(key)
    if config is None:
        config = _decide(key, weight, bias, gated)
    return None if config == skinny_gemm_plans.CUBLAS else config


def _product(x, weight, bias, residual, gated: bool) -> torch.Tensor:
    """``linear`` (``linear_silu_and_mul`` when ``gated``): the kernel or torch, as the plan says. The checks and the
    plan of a geometry (every tensor's shape, strides, dtype and device) are made when it is first seen and kept
    (``_CALLS``, where ``use_triton``: torch's calls too) while ``skinny_gemm_plans.generation`` stays the same."""
    geometry = geometry_key((x, weight, bias, residual))
    key = None if geometry is None or not use_triton(x) else (geometry, gated, pdl.enabled(x.device))
    entry = _CALLS.get(key) if key is not None else None
    if entry is None or entry[0] != skinny_gemm_plans.generation:
        n_out = check_product(x, weight, bias, residual, gated)
        config = plan(math.prod(x.shape[:-1]), weight, bias, gated)
        entry = bounded_put(_CALLS, key, (
            skinny_gemm_plans.generation,
            None if config is None else ProductCall(x, weight, bias, residual, gated, n_out, config),
        ), _MAX_CALLS)
    call = entry[1]
    if call is not None:
        return call(x, weight, bias, residual)
    return _gated_fallback(x, weight, bias) if gated else reference.linear(x, weight, bias, residual)


class ProductCall:
    """The kernel product for inputs of one geometry: ``call(x, weight, bias, residual, norm_weight=None)`` -> a
    fresh (x.shape[:-1] + (n_out,)) tensor; with ``norm`` (of ``eps``) the launch applies the RMSNorm of
    ``norm_weight`` to x first (``norm_linear``'s folded call). x and residual are passed as they are where their
    (rows, K) view is a view (the launch needs only their data pointers), reshaped (copied) where it is not."""

    def __init__(self, x, weight, bias, residual, gated: bool, n_out: int, config: GemmConfig, norm: bool = False,
                 eps: float = 0.0):
        num_rows = math.prod(x.shape[:-1])
        self.out_shape, self.dtype, self.device = (*x.shape[:-1], n_out), x.dtype, x.device
        self.num_rows = num_rows
        x_rows = x.reshape(num_rows, -1)  # a copy only for inputs whose rows are not evenly strided
        residual_rows = residual.reshape(num_rows, -1) if residual is not None else None
        self.copy_x = x_rows.data_ptr() != x.data_ptr()
        self.copy_residual = residual is not None and residual_rows.data_ptr() != residual.data_ptr()
        self.gemm = launch_plan(x_rows, weight, bias is not None, residual_rows, gated, config, norm, eps)

    def __call__(self, x, weight, bias, residual, norm_weight=None) -> torch.Tensor:
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        if self.copy_x:
            x = x.reshape(self.num_rows, -1)
        if self.copy_residual:
            residual = residual.reshape(self.num_rows, -1)
        self.gemm(x, weight, bias, residual, norm_weight, out)
        return out


_MAX_CALLS = 256
_CALLS: dict[tuple, tuple] = {}  # (geometry, gated, PDL on) -> (plans' generation, ProductCall or None: torch)


def _decide(key: tuple, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> GemmConfig:
    """The plan of ``key`` from ``skinny_gemm_plans.decide``; a tuning measures each config on this weight with
    random rows of the bucket's size (do_bench, L2 flushed before each call)."""
    n_out, k, bucket, _, _ = key
    default = skinny_gemm_plans.default_config(n_out, k, bucket, weight.dtype, weight.device, gated)
    torch_fn = _gated_fallback if gated else reference.linear
    samples = []  # made at the first measurement only (never during a CUDA-graph capture, which measures nothing)

    def measure(config: GemmConfig) -> float:
        if not samples:
            samples.append(torch.randn((bucket, k), dtype=weight.dtype, device=weight.device))
        sample = samples[0]
        if config == skinny_gemm_plans.CUBLAS:
            return _median_us(lambda: torch_fn(sample, weight, bias))
        try:
            return _median_us(lambda: launch(sample, weight, bias, None, gated, config))
        except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError, ValueError) as error:
            LOGGER.debug("skinny_gemm config %s does not run: %s", config, error)
            return float("inf")

    return skinny_gemm_plans.decide(key, weight.dtype, weight.device, default, measure)


def _median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=TUNING_WARMUP_MS, rep=TUNING_REP_MS, return_mode="median") * 1e3


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias (+ residual)``: x (..., K), weight (N, K), bias (N,), residual (..., N), all of x's
    dtype and device, unit stride in the last dimension; returns a new (..., N) tensor of x's dtype. See the module
    docstring for the rounding and for which implementation runs."""
    return _product(x, weight, bias, residual, False)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(x @ weight.T + bias)`` in one product: weight (2I, K) holds the gate rows then the up rows
    (bias (2I,) likewise); x (..., K) -> (..., I) of x's dtype."""
    return _product(x, weight, bias, None, True)


def _gated_fallback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The unfused path: torch's product, then the ``silu_and_mul`` kernel (its reference on the CPU)."""
    return silu_and_mul(torch.nn.functional.linear(x, weight, bias))
