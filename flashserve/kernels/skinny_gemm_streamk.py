"""The stream-K schedule of the small-M matrix product (``skinny_gemm`` configs with ``programs_per_sm > 0``): a
persistent grid of ``programs_per_sm`` programs per SM that share the weight's tiles equally.

Work units: the weight's ``n_blocks = cdiv(n_out, BLOCK_N)`` feature blocks of ``k_tiles = cdiv(K, BLOCK_K)``
(BLOCK_N, BLOCK_K) tiles each, numbered ``unit = block * k_tiles + k_tile`` (``units`` in all). Program p of P
owns the contiguous units ``[p * units // P, (p + 1) * units // P)``: every SM streams the same number of tiles
whatever the shape (no partly filled last wave, no split of K into equal ways), through one flat loop, so that
Triton's software pipeline keeps loading across feature-block boundaries. At the last tile of a block a program
holding the whole block runs the epilogue at once; a block shared with neighbouring programs (only the first and
the last block of a range can be) leaves its fp32 partial in the program's slot (0: the range's first block,
1: its last) after the loop and takes a ticket on the counter of the block's first program; the last arrival
adds the partials in program order (results are deterministic), runs the epilogue and resets the counter to 0.

A tile's product: ``tl.dot`` on the rows padded to >= 16 (``use_dot``), or, for at most ``STREAMK_FMA_MAX_ROWS``
rows, FMAs and a reduction over the tile's K for each row (no padding, no tensor cores). Weight loads are marked
``evict_first``: each weight byte is read once, so it should not push the rows and partials out of L2.

``pdl`` configs launch with programmatic dependent launch where ``flashserve.kernels.pdl.enabled``: the grid
may start while the previous kernel of the stream (or CUDA graph) still runs. Until ``gdc_wait`` returns (that
kernel complete, its writes visible) a program touches only the weights, which no kernel writes: it prefetches its
first ``PDL_PREFETCH_TILES`` tiles into L2. That overlaps the launch gap and the previous kernel's tail with the
weight read — on ~8 MB weights a launch costs about as much as the read itself. It then lets the next kernel
launch early in turn (a kernel launched without PDL ignores that).
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl as pdl_launch
from flashserve.kernels._launch import CachedLauncher, LaunchPlan, cdiv, next_power_of_2
from flashserve.kernels.pdl import prefetch_l2, wait_for_previous
from flashserve.kernels.skinny_gemm_epilogue import epilogue
from flashserve.kernels.skinny_gemm_plans import STREAMK_FMA_MAX_ROWS, GemmConfig, block_rows

MAX_UNIT_PRODUCT = 2 ** 31  # units * programs must fit the kernel's int32 arithmetic
PDL_PREFETCH_TILES = tl.constexpr(4)  # tiles a pdl program pulls into L2 before waiting for the previous kernel


@triton.jit
def _owner(unit, units, programs):
    """The program whose range holds ``unit``: the largest p with p * units // programs <= unit."""
    return ((unit + 1) * programs - 1) // units


@triton.jit
def _slot_ptrs(partial_ptr, program, slot, features, rows, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
               GATED: tl.constexpr):
    """Pointers to the (BLOCK_N, BLOCK_M) fp32 partial of ``program``'s slot (0 or 1); the up half follows it."""
    tile = BLOCK_N * BLOCK_M * (2 if GATED else 1)
    return partial_ptr + (program * 2 + slot) * tile + rows[None, :] * BLOCK_N + features[:, None]


@triton.jit
def _share(acc, acc_up, block, slot, pid, units, programs, k_tiles, features, rows, partial_ptr, counter_ptr, M,
           n_out, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om, BLOCK_N: tl.constexpr,
           BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    """Hand in this program's partial of ``block`` if other programs hold the block's other tiles: store it in
    ``slot``, take a ticket; the last of the block's programs sums every partial in program order and stores."""
    first_unit = block * k_tiles
    first_owner = _owner(first_unit, units, programs)
    last_owner = _owner(first_unit + k_tiles - 1, units, programs)
    if first_owner != last_owner:
        ptrs = _slot_ptrs(partial_ptr, pid, slot, features, rows, BLOCK_N, BLOCK_M, GATED)
        tl.store(ptrs, acc)
        if GATED:
            tl.store(ptrs + BLOCK_N * BLOCK_M, acc_up)
        tl.debug_barrier()  # every thread's partial stores precede the (one-thread, acq_rel) ticket
        ticket = tl.atomic_add(counter_ptr + first_owner, 1)
        if ticket == last_owner - first_owner:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            total_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for owner in range(first_owner, last_owner + 1):
                owner_slot = ((owner * units // programs) // k_tiles != block).to(tl.int32)
                ptrs = _slot_ptrs(partial_ptr, owner, owner_slot, features, rows, BLOCK_N, BLOCK_M, GATED)
                total += tl.load(ptrs, cache_modifier=".cg")
                if GATED:
                    total_up += tl.load(ptrs + BLOCK_N * BLOCK_M, cache_modifier=".cg")
            tl.store(counter_ptr + first_owner, 0)
            epilogue(total, total_up, rows, block * BLOCK_N + features, M, n_out, bias_ptr, residual_ptr, out_ptr,
                     stride_rm, stride_om, HAS_BIAS, HAS_RESIDUAL, GATED)


@triton.jit
def _weight_tiles(w_ptr, unit, unit_end, k_tiles, features, offs_k, n_out, K, stride_wn, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr, GUARDED: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) weight tile of ``unit`` and its up half (GATED; else the tile again), marked
    ``evict_first``. GUARDED: loaded only if ``unit < unit_end``, else zeros without memory traffic."""
    block = unit // k_tiles
    k_tile = unit - block * k_tiles
    # Features past n_out wrap around to valid weight rows (no load mask); their results are never stored.
    w_rows = ((block * BLOCK_N + features) % n_out).to(tl.int64)
    ks = k_tile * BLOCK_K + offs_k
    ptrs = w_ptr + w_rows[:, None] * stride_wn + ks[None, :]
    if GUARDED:
        mask = ((ks < K) & (offs_k * 0 + unit < unit_end))[None, :]  # a tensor, not a scalar bool
        w = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        w_up = w
        if GATED:
            w_up = tl.load(ptrs + n_out * stride_wn, mask=mask, other=0.0, eviction_policy="evict_first")
    elif EVEN_K:
        w = tl.load(ptrs, eviction_policy="evict_first")
        w_up = w
        if GATED:
            w_up = tl.load(ptrs + n_out * stride_wn, eviction_policy="evict_first")
    else:
        mask = (ks < K)[None, :]
        w = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        w_up = w
        if GATED:
            w_up = tl.load(ptrs + n_out * stride_wn, mask=mask, other=0.0, eviction_policy="evict_first")
    return w, w_up


@triton.jit
def _prefetch_weight_tiles(w_ptr, unit, k_tiles, features, n_out, K, stride_wn, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GATED: tl.constexpr):
    """L2 prefetch of the weight tile of ``unit`` (and its up half): one pointer per 64 elements of a row."""
    block = unit // k_tiles
    k_tile = unit - block * k_tiles
    w_rows = ((block * BLOCK_N + features) % n_out).to(tl.int64)
    lines = tl.minimum(k_tile * BLOCK_K + tl.arange(0, BLOCK_K // 64) * 64, K - 1)
    ptrs = w_ptr + w_rows[:, None] * stride_wn + lines[None, :]
    prefetch_l2(ptrs)
    if GATED:
        prefetch_l2(ptrs + n_out * stride_wn)


@triton.jit(do_not_specialize=["M", "units", "programs", "k_tiles"])
def _streamk_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, counter_ptr, M, n_out, K, units,
                    programs, k_tiles, stride_xm, stride_wn, stride_rm, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    unit_start = pid * units // programs
    unit_end = (pid + 1) * units // programs
    start_block = unit_start // k_tiles
    features = tl.arange(0, BLOCK_N)
    if PDL:
        # Launched with programmatic dependent launch, this grid may start before the previous kernel ends: until
        # the wait it touches only the weights (no kernel writes them), prefetching its first tiles into L2.
        for i in tl.static_range(PDL_PREFETCH_TILES):
            _prefetch_weight_tiles(w_ptr, tl.minimum(unit_start + i, unit_end - 1), k_tiles, features, n_out, K,
                                   stride_wn, BLOCK_N, BLOCK_K, GATED)
    wait_for_previous(PDL)  # then the next kernel may start its own prefetch where this one leaves room
    rows = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    head = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the range's first block (a partial if shared)
    head_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if not USE_DOT:  # Triton does not software-pipeline these loads (no tl.dot): prefetch one tile ahead by hand
        w_next, w_up_next = _weight_tiles(w_ptr, unit_start, unit_end, k_tiles, features, offs_k, n_out,
                                          K, stride_wn, BLOCK_N, BLOCK_K, EVEN_K, GATED, True)
    for unit in range(unit_start, unit_end):
        block = unit // k_tiles
        k_tile = unit - block * k_tiles
        ks = k_tile * BLOCK_K + offs_k
        k_mask = ks < K
        if USE_DOT:
            w, w_up = _weight_tiles(w_ptr, unit, unit_end, k_tiles, features, offs_k, n_out, K, stride_wn,
                                    BLOCK_N, BLOCK_K, EVEN_K, GATED, False)
            xt = tl.load(x_ptr + rows[None, :] * stride_xm + ks[:, None], mask=(rows < M)[None, :] & k_mask[:, None],
                         other=0.0)
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
            if GATED:
                acc_up = tl.dot(w_up, xt, acc_up, input_precision=DOT_PRECISION)
        else:
            w, w_up = w_next, w_up_next
            w_next, w_up_next = _weight_tiles(w_ptr, unit + 1, unit_end, k_tiles, features, offs_k, n_out,
                                              K, stride_wn, BLOCK_N, BLOCK_K, EVEN_K, GATED, True)
            for m in tl.static_range(BLOCK_M):
                # rows past M read row M - 1 again (no row mask); their results are never stored
                x_m = tl.load(x_ptr + tl.minimum(M - 1, m) * stride_xm + ks, mask=k_mask, other=0.0).to(tl.float32)
                pick = (rows == m)[None, :]
                acc += tl.where(pick, tl.sum(w.to(tl.float32) * x_m[None, :], axis=1)[:, None], 0.0)
                if GATED:
                    acc_up += tl.where(pick, tl.sum(w_up.to(tl.float32) * x_m[None, :], axis=1)[:, None], 0.0)
        if (k_tile == k_tiles - 1) | (unit == unit_end - 1):
            first_unit = block * k_tiles
            if _owner(first_unit, units, programs) == _owner(first_unit + k_tiles - 1, units, programs):
                epilogue(acc, acc_up, rows, block * BLOCK_N + features, M, n_out, bias_ptr, residual_ptr, out_ptr,
                         stride_rm, stride_om, HAS_BIAS, HAS_RESIDUAL, GATED)
            if block == start_block:
                head = acc
                head_up = acc_up
            if unit != unit_end - 1:  # the last block's sums stay in acc for after the loop
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    _share(head, head_up, start_block, 0, pid, units, programs, k_tiles, features, rows, partial_ptr, counter_ptr,
           M, n_out, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om, BLOCK_N, BLOCK_M, HAS_BIAS,
           HAS_RESIDUAL, GATED)
    end_block = (unit_end - 1) // k_tiles
    if end_block != start_block:
        _share(acc, acc_up, end_block, 1, pid, units, programs, k_tiles, features, rows, partial_ptr, counter_ptr,
               M, n_out, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om, BLOCK_N, BLOCK_M, HAS_BIAS,
               HAS_RESIDUAL, GATED)


STREAMK_LAUNCHER = CachedLauncher(_streamk_kernel)


def launch_plan(x_rows: torch.Tensor, weight: torch.Tensor, has_bias: bool, has_residual: bool, stride_rm: int,
                gated: bool, config: GemmConfig, counter_slots: int, sms: int) -> tuple[LaunchPlan, tuple]:
    """The stream-K launch of ``skinny_gemm.launch_plan`` on ``sms`` SMs for inputs of this geometry (x_rows
    (M, K), weight (N, K); residual rows of row stride ``stride_rm``), with at most ``counter_slots`` counters:
    (the ``LaunchPlan``, called with the tensors (x_rows, weight, bias, residual_rows, out, partial, counters) —
    absent ones stand in as in ``skinny_gemm`` —, the shape of the fp32 partials it needs). ValueError where the
    config cannot serve the shape."""
    num_rows, k = x_rows.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    if not config.use_dot and num_rows > STREAMK_FMA_MAX_ROWS:
        raise ValueError(f"a stream-K config without tl.dot serves at most {STREAMK_FMA_MAX_ROWS} rows, "
                         f"got {num_rows}")
    if config.pdl and config.block_k % 64:
        raise ValueError(f"a pdl config needs block_k divisible by 64 (its L2 prefetch), got {config.block_k}")
    block_m = block_rows(num_rows) if config.use_dot else next_power_of_2(num_rows)
    k_tiles = cdiv(k, config.block_k)
    units = cdiv(n_out, config.block_n) * k_tiles
    programs = min(units, config.programs_per_sm * sms)
    if units * programs >= MAX_UNIT_PRODUCT or programs > counter_slots:
        raise ValueError(f"stream-K with {units} tiles over {programs} programs is out of range; use a larger tile")
    pdl = config.pdl and pdl_launch.enabled(x_rows.device)  # off: a plain launch (the interpreter, FLASHSERVE_PDL=0)
    plan = STREAMK_LAUNCHER.plan((programs,), (
        num_rows, n_out, k, units, programs, k_tiles, x_rows.stride(0), weight.stride(0), stride_rm, n_out,
    ), dict(
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, GATED=gated, USE_DOT=config.use_dot,
        DOT_PRECISION="ieee" if x_rows.dtype == torch.float32 else "tf32", PDL=pdl,
    ), num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch.launch_options(pdl))
    return plan, (programs, 2, 2 if gated else 1, block_m, config.block_n)
