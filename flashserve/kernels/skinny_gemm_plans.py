"""Launch plans of the small-M matrix product (``skinny_gemm``): which config, or cuBLAS, per (output features,
K, row bucket, dtype, gated).

A plan comes from, in order: the measured table of this GPU model (``skinny_gemm_table``: timed as a decode step
runs the products, back to back under PDL, which the start-up tuning's single calls cannot see — the resident
configs win there by overlapping the previous kernel); the plans tuned in this process or read from disk;
otherwise, inside ``tuning()`` (the engine's start-up warm-up), a one-time measurement of the candidate configs
against cuBLAS (``tune``), kept and saved; otherwise the rules of ``default_config``, which are never measured and
never saved. So a CUDA-graph capture, which runs outside ``tuning()``, never benchmarks anything.

Tuned plans persist through ``flashserve.kernels.tuning_cache.PersistentTuning`` (one JSON file per GPU name,
Triton version and kernel source, under ``$FLASHSERVE_CACHE_DIR/autotune``): ``PlanTable`` offers the Autotuner
attributes it reads (``fn``, ``keys``, ``configs``, ``cache``), ``configs`` being every config a plan can hold
(``ALL_CONFIGS``; its last entry, ``CUBLAS``, means "run torch").

Tuning is on by default on Hopper and newer GPUs; ``FLASHSERVE_AUTOTUNE=0`` switches it off (the table then
decides), as for the prefill kernel.
"""
import contextlib
import functools
import itertools
from dataclasses import dataclass

import torch

from flashserve.kernels import prefill_tuning, skinny_gemm_resident, skinny_gemm_table, tuning_cache
from flashserve.kernels._launch import cdiv, next_power_of_2

MAX_ROWS = 64  # the kernel path serves x with at most this many rows
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # plans are made per power-of-two bucket of the row count
KEY_NAMES = ("n_out", "k", "row_bucket", "dtype", "gated")


@dataclass(frozen=True)
class GemmConfig:
    """One launch of ``skinny_gemm``: output features per tile, K per tile, split-K ways, warps, stages, whether the
    product runs on ``tl.dot`` (else FMAs: one-row inputs for the grid kernel, <= 4 rows for stream-K), and the
    schedule: ``programs_per_sm == 0`` the grid kernel (a program per feature block and split), else the stream-K
    kernel (``skinny_gemm_streamk``: that many persistent programs per SM share the tiles; ``split_k`` is 0), with
    ``pdl``: launched with programmatic dependent launch (prefetching weights while the previous kernel ends).
    ``resident``: the resident schedule (``skinny_gemm_resident``: one program per ``block_n`` features holds its
    whole weight tile, loaded before the PDL wait; ``block_k``, ``split_k`` and ``num_stages`` unused, 0, 1, 1).
    ``block_n == 0`` is the cuBLAS marker (``CUBLAS``)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    use_dot: bool = True
    programs_per_sm: int = 0
    pdl: bool = False
    resident: bool = False


CUBLAS = GemmConfig(0, 0, 0, 0, 0)
# (block_n, block_k, num_warps, num_stages) tried by the tuning, each with the split-K ways of ``split_ways`` and
# without split-K: 16-32 KB weight tiles, 2-3 of them in flight per program. Few, because each is compiled per
# row tile (16, 32, 64 rows), split or not, gated or not.
TILE_CHOICES = ((64, 128, 4, 4), (32, 256, 4, 4), (128, 128, 8, 3), (64, 256, 4, 3), (64, 64, 4, 4))
# One-row inputs also try the FMA path (no tensor cores): (BLOCK_N, BLOCK_K) fp32 partial sums in registers.
FMA_TILE_CHOICES = ((32, 128, 4, 3), (64, 128, 8, 3), (16, 256, 4, 3))
SPLIT_CHOICES = (1, 2, 4, 8, 16)
ALL_CONFIGS = [GemmConfig(n, k, s, w, st) for (n, k, w, st), s in itertools.product(TILE_CHOICES, SPLIT_CHOICES)]
ALL_CONFIGS += [GemmConfig(n, k, s, w, st, False)
                for (n, k, w, st), s in itertools.product(FMA_TILE_CHOICES, SPLIT_CHOICES)]
# Stream-K (block_n, block_k, num_warps, num_stages), each with the programs per SM of STREAMK_OCCUPANCY that
# fit the SM's shared memory: 3 of 4 stages in flight make 48-96 KB of weight loads outstanding per SM.
STREAMK_TILE_CHOICES = ((64, 128, 4, 4), (32, 256, 4, 4), (128, 128, 8, 4), (64, 256, 8, 4))
STREAMK_OCCUPANCY = (1, 2)
# FMA products (<= STREAMK_FMA_MAX_ROWS rows): Triton does not pipeline them (1 stage; the kernel prefetches one
# tile by hand), so more programs per SM; 8-16 KB tiles, as larger ones take ~250 registers (sm_90, 4 rows).
STREAMK_FMA_TILE_CHOICES = ((16, 256, 4, 1), (32, 256, 8, 1))
STREAMK_FMA_OCCUPANCY = (2, 4)
STREAMK_FMA_MAX_ROWS = 4
STREAMK_PDL_TILE_CHOICES = STREAMK_TILE_CHOICES[:2]  # also tried with programmatic dependent launch (sm_90+)
ALL_CONFIGS += [GemmConfig(n, k, 0, w, st, True, p)
                for (n, k, w, st), p in itertools.product(STREAMK_TILE_CHOICES, STREAMK_OCCUPANCY)]
ALL_CONFIGS += [GemmConfig(n, k, 0, w, st, False, p)
                for (n, k, w, st), p in itertools.product(STREAMK_FMA_TILE_CHOICES, STREAMK_FMA_OCCUPANCY)]
ALL_CONFIGS += [GemmConfig(n, k, 0, w, st, True, p, True)
                for (n, k, w, st), p in itertools.product(STREAMK_PDL_TILE_CHOICES, STREAMK_OCCUPANCY)]
# Resident (block_n, num_warps, use_dot): 16-64 KB register tiles of a small model's projections.
RESIDENT_TILE_CHOICES = ((4, 4, False), (8, 4, False), (8, 8, False), (16, 8, False), (16, 4, True), (32, 8, True))
RESIDENT_CONFIGS = [GemmConfig(n, 0, 1, w, 1, dot, 0, False, True) for n, w, dot in RESIDENT_TILE_CHOICES]
ALL_CONFIGS += RESIDENT_CONFIGS
ALL_CONFIGS.append(CUBLAS)
INTERPRETER_CONFIG = GemmConfig(128, 128, 1, 4, 1)  # the fastest tiles in the interpreter (fewest programs)


def row_bucket(num_rows: int) -> int:
    """The power-of-two bucket (1, 2, 4, ..., 64) a row count's plan is kept under."""
    return next_power_of_2(num_rows)


def block_rows(num_rows: int) -> int:
    """BLOCK_M of the kernel for ``num_rows`` rows: the bucket, at least 16 (``tl.dot``'s minimum)."""
    return max(16, next_power_of_2(num_rows))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device, read once."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_sms(device: torch.device) -> int:
    """The SMs the kernels plan for on ``device`` (split-K ways, stream-K programs)."""
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so that tests meet split-K
    return num_sms(_device_index(device))


def split_ways(n_out: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Split-K ways that bring the programs to about two per SM, keeping >= 2 K tiles per split (a power of two
    from SPLIT_CHOICES)."""
    programs = cdiv(n_out, block_n)
    ways = 1
    while (ways * 2 <= SPLIT_CHOICES[-1] and programs * ways < 2 * sms
           and cdiv(k, block_k) >= 4 * ways):
        ways *= 2
    return ways


def default_config(n_out: int, k: int, rows: int, dtype: torch.dtype, device: torch.device,
                   gated: bool = False) -> GemmConfig:
    """The plan without measuring (tuning off): on CUDA, cuBLAS except where the H200 run of 2026-12-01
    (benchmarks/RESULTS.md, "Small-M matrix products") measured ``kernel_config`` faster than cuBLAS — at <= 16 rows,
    vocabulary-sized products (LM heads, N >= 32768: 1.03-1.04x) and narrow, long ones (N <= 2048 with K >= 2N,
    such as Qwen3-0.6B's o and down projections: 1.07-2.4x); the gated product, the QKV projections and Llama's
    o/down measured 0.6-0.93x. A shape in the measured table (``table_plan``) gets its entry instead. Elsewhere
    (the interpreter) ``kernel_config``."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    measured = table_plan(n_out, k, rows, dtype, device, gated)
    if measured is not None:
        return measured
    if gated or row_bucket(rows) > 16:
        return CUBLAS
    if n_out >= 32768 or (n_out <= 2048 and k >= 2 * n_out):
        return kernel_config(n_out, k, rows, dtype, device)
    return CUBLAS


def table_plan(n_out: int, k: int, rows: int, dtype: torch.dtype, device: torch.device,
               gated: bool = False) -> GemmConfig | None:
    """The plan ``skinny_gemm_table`` measured for this shape and row bucket (CUBLAS for cuBLAS), or None where it
    has none: another GPU, a 4-byte dtype, a shape it did not time."""
    if not skinny_gemm_table.PLANS or torch.finfo(dtype).bits != 16:
        return None
    key = (n_out, k, row_bucket(rows), gated)
    if key not in skinny_gemm_table.PLANS or tuning_cache.gpu_name(device) != skinny_gemm_table.GPU:
        return None
    entry = skinny_gemm_table.PLANS[key]
    return CUBLAS if entry is None else GemmConfig(*entry)


def kernel_config(n_out: int, k: int, rows: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The table's kernel config (one of the tuning's candidates): 64 features x 128 of K per tile, 4 stages (64 of
    K for fp32 or for 64-row tiles), split-K to about two programs per SM."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    block_n, block_k, warps, stages = TILE_CHOICES[4] if dtype == torch.float32 or block_rows(rows) >= 64 \
        else TILE_CHOICES[0]
    return GemmConfig(block_n, block_k, split_ways(n_out, k, block_n, block_k, device_sms(device)), warps, stages)


@functools.lru_cache(maxsize=None)
def _device_property(device_index: int, name: str, fallback: int) -> int:
    return getattr(torch.cuda.get_device_properties(device_index), name, 0) or fallback


def shared_memory_bytes(device_index: int) -> int:
    """The shared memory one program may use on a CUDA device (opt-in maximum), read once."""
    return _device_property(device_index, "shared_memory_per_block_optin", 232_448)


def sm_shared_memory_bytes(device_index: int) -> int:
    """The shared memory of one SM of a CUDA device (what its resident programs share), read once."""
    return _device_property(device_index, "shared_memory_per_multiprocessor", 233_472)


SMEM_RESERVED_BYTES = 1024  # shared memory the driver reserves per resident program


def _device_shared_memory(device: torch.device, per_sm: bool = False) -> int | None:
    """``shared_memory_bytes`` (``sm_shared_memory_bytes`` when ``per_sm``) of a CUDA device; None (no limit) in
    the interpreter."""
    if device.type != "cuda":
        return None
    index = _device_index(device)
    return sm_shared_memory_bytes(index) if per_sm else shared_memory_bytes(index)


def pipeline_bytes(block_m: int, block_n: int, block_k: int, stages: int, gated: bool, element_bytes: int) -> int:
    """Shared memory of the tensor-core path's software pipeline: ``stages`` copies of the row tile and of the
    weight tile (two weight tiles, gate and up, when ``gated``)."""
    return stages * (block_m * block_k + (2 if gated else 1) * block_n * block_k) * element_bytes


def candidates(n_out: int, k: int, rows: int, dtype: torch.dtype, device: torch.device,
               gated: bool = False) -> list[GemmConfig]:
    """Configs the tuning measures for a shape and row bucket: every grid-kernel tile choice that fits K, the dtype
    and the device's shared memory (the FMA ones too for one row), each with its ``split_ways`` and without split-K
    (the table's default is among them), and the resident configs that fit (``resident_candidates``). The
    stream-K configs (``streamk_candidates``) are not among them: on the H200 they lost to the grid kernel at every
    Llama-3.1-8B shape (benchmarks/RESULTS.md, session 4); only the sweep times them, and the measured table may
    name one."""
    sms = device_sms(device)
    smem = _device_shared_memory(device)
    element_bytes = torch.finfo(dtype).bits // 8
    tiles = [(tile, True) for tile in TILE_CHOICES] + [(tile, False) for tile in FMA_TILE_CHOICES if rows == 1]
    found = []
    for (block_n, block_k, warps, stages), use_dot in tiles:
        if block_k > max(64, next_power_of_2(k)) or (dtype == torch.float32 and block_k > 128):
            continue
        if use_dot and smem is not None and pipeline_bytes(block_rows(rows), block_n, block_k, stages, gated,
                                                           element_bytes) > smem:
            continue
        for ways in sorted({1, split_ways(n_out, k, block_n, block_k, sms)}):
            found.append(GemmConfig(block_n, block_k, ways, warps, stages, use_dot))
    return found + resident_candidates(k, rows, dtype, gated)


def resident_candidates(k: int, rows: int, dtype: torch.dtype, gated: bool = False) -> list[GemmConfig]:
    """The resident configs (RESIDENT_CONFIGS) whose register tile holds K of ``dtype`` for ``rows`` rows
    (``skinny_gemm_resident.fits``)."""
    element_bytes = torch.finfo(dtype).bits // 8
    return [c for c in RESIDENT_CONFIGS if skinny_gemm_resident.fits(rows, k, c.block_n, gated, element_bytes,
                                                                     c.use_dot)]


def streamk_candidates(k: int, rows: int, dtype: torch.dtype, device: torch.device,
                       gated: bool = False) -> list[GemmConfig]:
    """The stream-K configs the sweep times: each tile of STREAMK_TILE_CHOICES (and of STREAMK_FMA_TILE_CHOICES
    for <= STREAMK_FMA_MAX_ROWS rows; of STREAMK_PDL_TILE_CHOICES with ``pdl`` on GPUs that have it) that fits K
    and the dtype, with each programs-per-SM count (STREAMK_OCCUPANCY, STREAMK_FMA_OCCUPANCY) whose pipelines fit
    the SM's shared memory together."""
    smem = _device_shared_memory(device, per_sm=True)
    element_bytes = torch.finfo(dtype).bits // 8
    tiles = [(tile, True, False) for tile in STREAMK_TILE_CHOICES]
    tiles += [(tile, False, False) for tile in STREAMK_FMA_TILE_CHOICES if rows <= STREAMK_FMA_MAX_ROWS]
    if device.type != "cuda" or prefill_tuning.compute_capability_major(_device_index(device)) >= 9:
        tiles += [(tile, True, True) for tile in STREAMK_PDL_TILE_CHOICES]
    found = []
    for (block_n, block_k, warps, stages), use_dot, pdl in tiles:
        if block_k > max(64, next_power_of_2(k)) or (dtype == torch.float32 and block_k > 128):
            continue
        block_m = block_rows(rows) if use_dot else next_power_of_2(rows)
        tile_bytes = pipeline_bytes(block_m, block_n, block_k, stages, gated, element_bytes) + SMEM_RESERVED_BYTES
        for programs in STREAMK_OCCUPANCY if use_dot else STREAMK_FMA_OCCUPANCY:
            if smem is None or programs * tile_bytes <= smem:
                found.append(GemmConfig(block_n, block_k, 0, warps, stages, use_dot, programs, pdl))
    return found


class PlanTable:
    """The tuned plans, shaped like a ``triton.autotune`` Autotuner for ``PersistentTuning``: ``cache`` maps a key
    (KEY_NAMES values) to a config of ``configs``; ``fn`` is the kernel whose source keys the file."""

    def __init__(self, kernel):
        self.fn = kernel
        self.keys = list(KEY_NAMES)
        self.configs = ALL_CONFIGS
        self.cache: dict[tuple, GemmConfig] = {}


_plans: dict[tuple, GemmConfig] = {}  # every plan in use: tuned, read from disk, or the table's default
_tuned_keys: set[tuple] = set()
_table_keys: set[tuple] = set()  # plans taken from the measured table (never tuned, never saved)
_persistence: tuning_cache.PersistentTuning | None = None
_tuning_depth = 0
# Changes whenever what ``lookup`` answers may change (a plan made or forgotten, ``tuning()`` entered or left): a
# cache of its answers (``skinny_gemm``'s per-geometry calls) holds only while this is the value it was made under.
generation = 0


def _changed() -> None:
    global generation
    generation += 1


def attach(kernel, *other_kernels) -> None:
    """Tie the plans' file to the source of ``kernel`` and ``other_kernels`` (``skinny_gemm`` calls this once at
    import)."""
    global _persistence
    _persistence = tuning_cache.PersistentTuning("skinny_gemm", PlanTable(kernel),
                                                 depends=(candidates, resident_candidates, streamk_candidates,
                                                          *other_kernels))


@contextlib.contextmanager
def tuning():
    """Within this block a shape without a tuned plan is measured once (on tuning devices); outside, it gets the
    table's default. The engine's warm-up runs inside, CUDA-graph capture outside."""
    global _tuning_depth
    _tuning_depth += 1
    _changed()
    try:
        yield
    finally:
        _tuning_depth -= 1
        _changed()


def tuning_enabled(device: torch.device) -> bool:
    """Whether a plan missing on ``device`` is measured now: inside ``tuning()``, on a GPU that autotunes."""
    return _tuning_depth > 0 and prefill_tuning.use_autotune(device)


def lookup(key: tuple) -> GemmConfig | None:
    """The plan in use for ``key`` (a config, or CUBLAS), or None when ``decide`` should make it: there is none
    yet, or only the table's default while a ``tuning()`` block is open. Steady state: one dict lookup."""
    config = _plans.get(key)
    if _tuning_depth > 0 and key not in _tuned_keys and key not in _table_keys:
        return None
    return config


def decide(key: tuple, dtype: torch.dtype, device: torch.device, default: GemmConfig, measure) -> GemmConfig:
    """The plan of ``key`` (KEY_NAMES values), made once and kept: the measured table's entry for this GPU model
    (``table_plan``), else a tuned plan (this process or the file), else
    ``tune(measure, candidates(...))`` when tuning is enabled (saved to the file), else ``default`` (kept in memory
    only, so a later ``tuning()`` block still measures it). ``measure(config)`` returns the median µs of one call
    with that config (CUBLAS: the torch path)."""
    _changed()
    n_out, k, bucket, _, gated = key
    measured = table_plan(n_out, k, bucket, dtype, device, gated) if device.type == "cuda" else None
    if measured is not None:
        _plans[key] = measured
        _table_keys.add(key)
        return measured
    table = _persistence.autotuner
    if device not in _persistence.devices:
        _persistence.load(device)
        _tuned_keys.update(table.cache)
    if key in _tuned_keys:
        _plans[key] = table.cache[key]
    elif tuning_enabled(device):
        table.cache[key] = _plans[key] = tune(measure, candidates(n_out, k, bucket, dtype, device, gated))
        _tuned_keys.add(key)
        _persistence.save(device)
    else:
        _plans[key] = default
    return _plans[key]


def tune(measure, configs: list[GemmConfig]) -> GemmConfig:
    """The fastest of ``configs`` and CUBLAS by ``measure`` (CUBLAS wins ties: ours only where it is faster)."""
    best, best_us = CUBLAS, measure(CUBLAS)
    for config in configs:
        us = measure(config)
        if us < best_us:
            best, best_us = config, us
    return best


def reset() -> None:
    """Forget every plan in memory (tests)."""
    _changed()
    _plans.clear()
    _tuned_keys.clear()
    _table_keys.clear()
    if _persistence is not None:
        _persistence.autotuner.cache.clear()
        _persistence.devices.clear()
