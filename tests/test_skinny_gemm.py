"""The small-M matrix product (``flashserve.kernels.skinny_gemm``) and its launch plans: kernel results against
an fp32 oracle (FlashAttention's rule: error <= 2x that of the same math in the input dtype), split-K and ragged K,
the fused epilogues, dispatch, argument checks, the tuning policy and its persistence; GPU tests at real shapes,
every candidate config, and inside a CUDA graph."""
import math

import pytest
import torch

from flashserve.kernels import (counters, linear, linear_silu_and_mul, skinny_gemm, skinny_gemm_plans,
                                skinny_gemm_table, tuning_cache)
from flashserve.kernels.reference import layers as reference
from flashserve.kernels.skinny_gemm_plans import CUBLAS, GemmConfig


def _randn(*shape, dtype, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _fp32(*tensors):
    return [t.float() if t is not None else None for t in tensors]


def check_product(rows, n_out, k, dtype, config, bias=False, residual=False, gated=False, device="cpu"):
    """The kernel with ``config`` against the fp32 oracle, within 2x the error of torch in ``dtype`` (+ a floor)."""
    x = _randn(rows, k, dtype=dtype, device=device)
    w = _randn(2 * n_out if gated else n_out, k, dtype=dtype, device=device, seed=1) / math.sqrt(k)
    b = _randn(w.shape[0], dtype=dtype, device=device, seed=2) if bias else None
    r = _randn(rows, n_out, dtype=dtype, device=device, seed=3) if residual else None
    out = skinny_gemm.launch(x, w, b, r, gated, config)
    if (config.split_k > 1 or config.programs_per_sm) and (x.device, "skinny_gemm") in counters._buffers:
        # every launch leaves its counters at 0
        assert not counters._buffers[(x.device, "skinny_gemm")].any()
    if gated:
        expected = reference.linear_silu_and_mul(*_fp32(x, w, b))
        same_math = reference.linear_silu_and_mul(x, w, b)
    else:
        expected = reference.linear(*_fp32(x, w, b, r))
        same_math = reference.linear(x, w, b, r)
    assert out.shape == (rows, n_out) and out.dtype == dtype
    error = (out.float() - expected).abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert error <= 2 * (same_math.float() - expected).abs().max().item() + floor, (error, config)


CONFIGS = [GemmConfig(32, 32, 1, 4, 1), GemmConfig(16, 16, 2, 4, 1), GemmConfig(16, 32, 3, 4, 1)]
FMA_CONFIGS = [GemmConfig(32, 32, 1, 4, 1, False), GemmConfig(16, 16, 3, 4, 1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("rows, n_out, k", [(1, 40, 64), (5, 33, 80), (17, 48, 40)])
def test_linear_kernel(rows, n_out, k, dtype, config):
    check_product(rows, n_out, k, dtype, config, bias=rows == 5, residual=rows == 17)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["nosplit", "split2"])
@pytest.mark.parametrize("rows, bias", [(3, True), (33, False)])
def test_gated_kernel(rows, bias, config):
    check_product(rows, 24, 48, torch.float16, config, bias=bias, gated=True)


@pytest.mark.parametrize("config", FMA_CONFIGS, ids=["nosplit", "split3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fma_path_one_row(config, dtype):
    check_product(1, 40, 80, dtype, config, bias=True, residual=True)
    check_product(1, 24, 40, dtype, config, gated=True)
    with pytest.raises(ValueError, match="one row"):
        skinny_gemm.launch(torch.zeros(2, 16), torch.zeros(8, 16), None, None, False, config)


# Stream-K on the interpreter's 4 "SMs": 4, 8 or 12 programs over 6-24 tiles, so that feature blocks are held
# whole, shared by two programs, or by several (one tile each).
STREAMK_CONFIGS = [GemmConfig(16, 16, 0, 4, 1, True, 1), GemmConfig(16, 32, 0, 4, 1, True, 3),
                   GemmConfig(32, 16, 0, 4, 1, False, 2), GemmConfig(16, 32, 0, 4, 1, False, 3),
                   GemmConfig(16, 64, 0, 4, 1, True, 2, True)]  # pdl: a plain launch in the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", STREAMK_CONFIGS,
                         ids=lambda c: f"{'dot' if c.use_dot else 'fma'}-n{c.block_n}k{c.block_k}p{c.programs_per_sm}"
                         + ("-pdl" if c.pdl else ""))
@pytest.mark.parametrize("rows, n_out, k", [(1, 40, 80), (3, 33, 72), (4, 48, 40), (8, 40, 80), (17, 24, 64)])
def test_streamk_kernel(rows, n_out, k, dtype, config):
    if not config.use_dot and rows > skinny_gemm_plans.STREAMK_FMA_MAX_ROWS:
        with pytest.raises(ValueError, match="at most 4 rows"):
            skinny_gemm.launch(torch.zeros(rows, k), torch.zeros(n_out, k), None, None, False, config)
        return
    check_product(rows, n_out, k, dtype, config, bias=rows == 3, residual=rows in (4, 17))
    check_product(rows, n_out // 2 + 1, k, dtype, config, bias=rows == 1, gated=True)


RESIDENT_CONFIGS = [GemmConfig(8, 0, 1, 4, 1, False, 0, False, True), GemmConfig(4, 0, 1, 4, 1, False, 0, False, True),
                    GemmConfig(16, 0, 1, 4, 1, True, 0, False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", RESIDENT_CONFIGS, ids=lambda c: f"{'dot' if c.use_dot else 'fma'}-n{c.block_n}")
@pytest.mark.parametrize("rows, n_out, k", [(1, 40, 64), (3, 33, 80), (8, 24, 128), (16, 20, 48), (17, 16, 32)])
def test_resident_gemm_kernel(rows, n_out, k, dtype, config):
    """Whole weight tiles per program: K a power of two or padded, features past N wrapped, rows one at a time
    (FMA, at most 8) or padded to 16 (tl.dot, at most 16)."""
    if rows > (16 if config.use_dot else 8):
        with pytest.raises(ValueError, match="resident tile"):
            skinny_gemm.launch(torch.zeros(rows, k), torch.zeros(n_out, k), None, None, False, config)
        return
    check_product(rows, n_out, k, dtype, config, bias=rows == 3, residual=rows in (1, 8, 16))
    check_product(rows, n_out // 2 + 1, k, dtype, config, bias=rows == 1, gated=True)


def test_resident_configs_fit_their_registers():
    """The tuning offers a resident config only where its tile holds K in MAX_TILE_BYTES; tl.dot needs 16
    features."""
    found = skinny_gemm_plans.resident_candidates(1024, 1, torch.bfloat16)
    assert found and all(c in skinny_gemm_plans.ALL_CONFIGS and c.resident for c in found)
    assert not skinny_gemm_plans.resident_candidates(14336, 1, torch.bfloat16)  # Llama-3.1-8B's down: too long
    assert {c.use_dot for c in skinny_gemm_plans.resident_candidates(1024, 16, torch.bfloat16)} == {True}
    assert any(c.resident for c in skinny_gemm_plans.candidates(1024, 3072, 1, torch.bfloat16, torch.device("cpu")))
    with pytest.raises(ValueError, match="resident tile"):
        skinny_gemm.launch(torch.zeros(1, 16), torch.zeros(8, 16), None, None, False,
                           GemmConfig(8, 0, 1, 4, 1, True, 0, False, True))


@pytest.mark.parametrize("config", [CONFIGS[2], FMA_CONFIGS[1], STREAMK_CONFIGS[1], STREAMK_CONFIGS[3],
                                    RESIDENT_CONFIGS[0]],
                         ids=["grid-dot", "grid-fma", "streamk-dot", "streamk-fma", "resident-fma"])
def test_strided_inputs(config):
    """x and weight as column slices of wider tensors (row strides > K), the residual a slice too."""
    rows = 1 if not config.use_dot else 3
    x_wide = _randn(rows, 100, dtype=torch.float16)
    w_wide = _randn(40, 90, dtype=torch.float16, seed=1) / 8
    r_wide = _randn(rows, 50, dtype=torch.float16, seed=2)
    x, w, r = x_wide[:, 10:82], w_wide[:, 5:77], r_wide[:, 3:43]
    out = skinny_gemm.launch(x, w, None, r, False, config)
    expected = reference.linear(*_fp32(x, w, None, r))
    same_math = reference.linear(x.contiguous(), w.contiguous(), None, r.contiguous())
    error = (out.float() - expected).abs().max().item()
    assert error <= 2 * (same_math.float() - expected).abs().max().item() + 1e-3


def test_public_functions_match_the_unfused_ops():
    """linear / linear_silu_and_mul on leading batch dimensions, through the plan (the interpreter's default)."""
    skinny_gemm_plans.reset()
    x = _randn(2, 3, 64, dtype=torch.float32)
    w = _randn(96, 64, dtype=torch.float32, seed=1)
    b = _randn(96, dtype=torch.float32, seed=2)
    r = _randn(2, 3, 96, dtype=torch.float32, seed=3)
    torch.testing.assert_close(linear(x, w, b, r), torch.nn.functional.linear(x, w, b) + r, atol=1e-4, rtol=1e-4)
    gated = linear_silu_and_mul(x, w, b)
    assert gated.shape == (2, 3, 48)
    torch.testing.assert_close(gated, reference.linear_silu_and_mul(x, w, b), atol=1e-4, rtol=1e-4)


def test_dispatch_runs_torch_where_the_kernel_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(skinny_gemm, "launch", lambda *args: calls.append(args))
    w = _randn(32, 16, dtype=torch.float32)
    big = _randn(skinny_gemm.MAX_ROWS + 1, 16, dtype=torch.float32)
    torch.testing.assert_close(linear(big, w), big @ w.T)
    assert linear(big[:0], w).shape == (0, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: torch
    torch.testing.assert_close(linear(big[:4], w), big[:4] @ w.T)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    skinny_gemm_plans.reset()
    monkeypatch.setattr(skinny_gemm_plans, "default_config", lambda *args: CUBLAS)  # the plan says cuBLAS
    torch.testing.assert_close(linear_silu_and_mul(big[:4], w), reference.linear_silu_and_mul(big[:4], w))
    skinny_gemm_plans.reset()
    assert calls == []


@pytest.mark.parametrize("call, message", [
    (lambda: linear(torch.zeros(2, 8), torch.zeros(4, 9)), "weight must have shape"),
    (lambda: linear(torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.float16)), "weight must have dtype"),
    (lambda: linear(torch.zeros(2, 8), torch.zeros(8, 4).T), "weight must be contiguous"),
    (lambda: linear(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(5)), "bias must have shape"),
    (lambda: linear(torch.zeros(2, 8), torch.zeros(4, 8), None, torch.zeros(2, 5)), "residual must have shape"),
    (lambda: linear(torch.zeros(2, 8, dtype=torch.int32), torch.zeros(4, 8)), "x must have dtype"),
    (lambda: linear_silu_and_mul(torch.zeros(2, 8), torch.zeros(5, 8)), "even number of rows"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_tune_prefers_cublas_unless_faster():
    times = {CUBLAS: 10.0, CONFIGS[0]: 10.0, CONFIGS[1]: 9.0, CONFIGS[2]: float("inf")}
    assert skinny_gemm_plans.tune(times.get, CONFIGS) == CONFIGS[1]
    assert skinny_gemm_plans.tune(times.get, [CONFIGS[0], CONFIGS[2]]) == CUBLAS


def test_candidates_are_storable_and_split_to_fill_the_gpu():
    for n_out, k in [(4096, 1024), (151936, 1024), (1024, 3072), (28672, 4096)]:
        found = skinny_gemm_plans.candidates(n_out, k, 1, torch.bfloat16, torch.device("cpu"))
        assert found and all(config in skinny_gemm_plans.ALL_CONFIGS for config in found)
    assert skinny_gemm_plans.split_ways(4096, 1024, 64, 128, 132) == 4  # 64 programs, 8 K tiles: 2 per split
    assert skinny_gemm_plans.split_ways(1024, 4096, 64, 128, 132) == 16  # 16 programs, 32 K tiles
    assert skinny_gemm_plans.split_ways(151936, 1024, 64, 128, 132) == 1
    assert not any(c.programs_per_sm for c in found)  # stream-K: the sweep's, not the start-up tuning's
    one_row = skinny_gemm_plans.streamk_candidates(1024, 1, torch.bfloat16, torch.device("cpu"))
    assert {c.use_dot for c in one_row} == {True, False} and all(c.programs_per_sm for c in one_row)  # FMA: few rows
    eight_rows = skinny_gemm_plans.streamk_candidates(1024, 8, torch.bfloat16, torch.device("cpu"))
    assert {c.use_dot for c in eight_rows} == {True}


def test_streamk_occupancy_fits_the_sm_shared_memory(monkeypatch):
    monkeypatch.setattr(skinny_gemm_plans, "_device_shared_memory", lambda device, per_sm=False: 233_472)
    monkeypatch.setattr(skinny_gemm_plans.prefill_tuning, "compute_capability_major", lambda index: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    found = skinny_gemm_plans.streamk_candidates(4096, 64, torch.bfloat16, torch.device("cuda"), gated=True)
    assert not any(c.pdl for c in found)  # before Hopper: no programmatic dependent launch
    # 64 rows, gated: (64 x 128 + 2 x 64 x 128) x 2 bytes x 4 stages = 192 KB fits one program per SM, not two
    assert GemmConfig(64, 128, 0, 4, 4, True, 1) in found and GemmConfig(64, 128, 0, 4, 4, True, 2) not in found
    assert all(c.use_dot and c in skinny_gemm_plans.ALL_CONFIGS for c in found)


def test_measured_table_gives_the_default(monkeypatch):
    """A shape in skinny_gemm_table gets its entry on its GPU in 2-byte dtypes; elsewhere the rules decide."""
    device = torch.device("cuda", 0)
    monkeypatch.setattr(tuning_cache, "gpu_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(skinny_gemm_plans, "device_sms", lambda device: 132)
    entry = (64, 128, 0, 4, 4, True, 2)
    monkeypatch.setattr(skinny_gemm_table, "PLANS", {(4096, 4096, 1, False): entry, (1024, 3072, 2, False): None})
    assert skinny_gemm_plans.default_config(4096, 4096, 1, torch.bfloat16, device) == GemmConfig(*entry)
    assert skinny_gemm_plans.default_config(1024, 3072, 2, torch.float16, device) == CUBLAS  # the table over the rules
    assert skinny_gemm_plans.default_config(1024, 3072, 4, torch.float16, device).block_n  # not in the table
    assert skinny_gemm_plans.default_config(4096, 4096, 1, torch.float32, device) == CUBLAS  # fp32: the rules
    monkeypatch.setattr(tuning_cache, "gpu_name", lambda device: "NVIDIA H100")
    assert skinny_gemm_plans.default_config(4096, 4096, 1, torch.bfloat16, device) == CUBLAS


@pytest.fixture
def _persisting_cuda(monkeypatch, tmp_path):
    """A 'cuda' device that persists without a GPU (as in test_tuning_cache) and tunes when asked."""
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(tuning_cache, "gpu_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(skinny_gemm_plans.prefill_tuning, "use_autotune", lambda device: True)
    monkeypatch.setattr(skinny_gemm_plans, "device_sms", lambda device: 132)
    monkeypatch.setattr(skinny_gemm_plans, "_device_shared_memory",
                        lambda device, per_sm=False: 233_472 if per_sm else 232_448)
    monkeypatch.setattr(skinny_gemm_plans.prefill_tuning, "compute_capability_major", lambda index: 9)
    skinny_gemm_plans.reset()
    yield torch.device("cuda", 0)
    skinny_gemm_plans.reset()


def test_a_measured_table_entry_is_never_tuned(_persisting_cuda):
    """On the table's GPU model a shape it lists takes its entry, inside tuning() too: nothing is measured."""
    key = (4096, 1024, 1, "bfloat16", False)
    measured = []
    with skinny_gemm_plans.tuning():
        plan = skinny_gemm_plans.decide(key, torch.bfloat16, _persisting_cuda, CONFIGS[0], measured.append)
        assert plan == GemmConfig(*skinny_gemm_table.PLANS[(4096, 1024, 1, False)]) and not measured
        assert skinny_gemm_plans.lookup(key) == plan  # kept: no second decision inside the block


def test_tuning_only_inside_the_block_and_persisted(_persisting_cuda):
    device = _persisting_cuda
    key = (2048, 1024, 1, "bfloat16", False)  # a shape the measured table does not list
    measured = []

    def measure(config):
        measured.append(config)
        return 1.0 if config == CUBLAS else 2.0 - 0.1 * (config == CONFIGS[0])

    default = CONFIGS[0]
    assert skinny_gemm_plans.decide(key, torch.bfloat16, device, default, measure) == default
    assert measured == []  # outside tuning(): the table, nothing measured
    with skinny_gemm_plans.tuning():
        assert skinny_gemm_plans.decide(key, torch.bfloat16, device, default, measure) == CUBLAS
        count = len(measured)
        assert count > 2 and skinny_gemm_plans.decide(key, torch.bfloat16, device, default, measure) == CUBLAS
        assert len(measured) == count  # measured once
    skinny_gemm_plans.reset()
    with skinny_gemm_plans.tuning():  # a new process reads the file instead of measuring
        assert skinny_gemm_plans.decide(key, torch.bfloat16, device, default, measure) == CUBLAS
    assert len(measured) == count


# --- GPU: real shapes, every candidate config, CUDA graphs, tuning (skipped without CUDA) ---

GPU_SHAPES = {"qkv": (4096, 1024, False), "down": (1024, 3072, False), "gate_up": (3072, 1024, True),
              "o-8b": (4096, 4096, False)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_every_candidate_gpu(shape, dtype):
    """bf16: every config the tuning or the sweep's table may pick; fp16: the table's."""
    n_out, k, gated = GPU_SHAPES[shape]
    device = torch.device("cuda")
    configs = [skinny_gemm_plans.kernel_config(n_out, k, 1, dtype, device)]
    if dtype == torch.bfloat16:
        configs += skinny_gemm_plans.candidates(n_out, k, 64, dtype, device, gated)
        configs += [c for c in skinny_gemm_plans.candidates(n_out, k, 1, dtype, device, gated) if not c.use_dot]
        configs += skinny_gemm_plans.streamk_candidates(k, 64, dtype, device, gated)  # what the sweep may pick
        configs += [c for c in skinny_gemm_plans.streamk_candidates(k, 1, dtype, device, gated) if not c.use_dot]
        configs += skinny_gemm_plans.resident_candidates(k, 8, dtype, gated)
    for config in configs:
        if config.resident:
            rows_tried = (1, 5, 16) if config.use_dot else (1, 3, 8)
        else:
            rows_tried = (1, 5, 64) if config.use_dot else (1, 3) if config.programs_per_sm else (1,)
        for rows in rows_tried:
            check_product(rows, n_out, k, dtype, config, bias=rows == 5, residual=rows == 64 and not gated,
                          gated=gated, device="cuda")


@pytest.mark.gpu
def test_resident_table_plans_gpu():
    """Every resident plan of the measured table at its shape, bf16, with a residual (gated: without), at each row
    count of its bucket's range; and one launched from a CUDA graph under PDL after another kernel."""
    device = torch.device("cuda")
    entries = [(key, GemmConfig(*entry)) for key, entry in skinny_gemm_table.PLANS.items()
               if entry is not None and GemmConfig(*entry).resident]
    assert entries
    for (n_out, k, bucket, gated), config in entries:
        for rows in sorted({bucket // 2 + 1, bucket}):
            check_product(rows, n_out, k, torch.bfloat16, config, bias=rows == 1, residual=not gated, gated=gated,
                          device=device)
    (n_out, k, _, gated), config = entries[0]
    x = _randn(1, k, dtype=torch.bfloat16, device=device)
    w = _randn(2 * n_out if gated else n_out, k, dtype=torch.bfloat16, device=device, seed=1) / 32
    eager = lambda: [skinny_gemm.launch(x * 2, w, None, None, gated, config)]  # noqa: E731
    eager()
    torch.cuda.synchronize()
    _assert_replays_match_eager(eager, x)


@pytest.mark.gpu
def test_ragged_shapes_gpu():
    for config in (GemmConfig(64, 128, 4, 4, 4), GemmConfig(32, 256, 1, 4, 3)):
        check_product(7, 1000, 1000, torch.bfloat16, config, bias=True, residual=True, device="cuda")
        check_product(33, 500, 200, torch.bfloat16, config, gated=True, device="cuda")
    check_product(3, 256, 512, torch.float32, GemmConfig(64, 64, 4, 4, 4), device="cuda")
    streamk = GemmConfig(64, 128, 0, 4, 4, True, 2)
    check_product(7, 1000, 1000, torch.bfloat16, streamk, bias=True, residual=True, device="cuda")
    check_product(33, 500, 200, torch.bfloat16, streamk, gated=True, device="cuda")
    check_product(3, 1000, 1000, torch.bfloat16, GemmConfig(16, 256, 0, 4, 4, False, 2), bias=True, device="cuda")


@pytest.mark.gpu
def test_cuda_graph_replay_gpu():
    """Split-K, stream-K (with programmatic dependent launch too) and plain launches captured in a graph: replays
    with new inputs match eager calls."""
    device = torch.device("cuda")
    x = _randn(8, 1024, dtype=torch.bfloat16, device=device)
    w = _randn(4096, 1024, dtype=torch.bfloat16, device=device, seed=1) / 32
    gate_up = _randn(6144, 1024, dtype=torch.bfloat16, device=device, seed=2) / 32
    configs = (GemmConfig(64, 128, 4, 4, 4), GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 0, 4, 4, True, 2),
               GemmConfig(32, 256, 0, 4, 4, True, 1, True))
    eager = lambda: [skinny_gemm.launch(x, w, None, None, False, c) for c in configs] + [  # noqa: E731
        skinny_gemm.launch(x, gate_up, None, None, True, c) for c in configs[::2]]
    eager()
    torch.cuda.synchronize()
    _assert_replays_match_eager(eager, x)  # deterministic split-K: bit-identical
    assert not counters._buffers[(x.device, "skinny_gemm")].any()


def _assert_replays_match_eager(run, x):
    """Capture ``run()`` (a list of outputs) in a CUDA graph; for three new inputs copied into ``x`` its replay
    equals an eager ``run()`` bit for bit."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for seed in range(3):
        x.copy_(_randn(*x.shape, dtype=x.dtype, device=x.device, seed=10 + seed))
        graph.replay()
        for got, want in zip(captured, run()):
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_pdl_chain_gpu():
    """Programmatic dependent launches that each read the previous one's output (and a plain launch between them),
    eager and replayed in a graph: each waits for its input, so the chain matches torch's step by step."""
    device = torch.device("cuda")
    x = _randn(4, 1024, dtype=torch.bfloat16, device=device)
    weights = [_randn(1024, 1024, dtype=torch.bfloat16, device=device, seed=s) / 32 for s in range(1, 9)]
    configs = [GemmConfig(32, 256, 0, 4, 4, True, p, True) for p in (1, 2)] + [GemmConfig(64, 128, 1, 4, 4)]
    configs.append(GemmConfig(8, 0, 1, 4, 1, False, 0, False, True))  # resident: weights read before the wait

    def chain():
        y = x
        for i, w in enumerate(weights):
            y = skinny_gemm.launch(y, w, None, None, False, configs[i % 4])
        return [y]

    expected = x
    for w in weights:
        expected = torch.nn.functional.linear(expected.float(), w.float()).to(torch.bfloat16)
    torch.testing.assert_close(chain()[0], expected, atol=0.1, rtol=0.05)
    _assert_replays_match_eager(chain, x)


@pytest.mark.gpu
def test_tuning_gpu(monkeypatch, tmp_path):
    """Inside tuning() a plan is measured once and saved; the linear path then follows it."""
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(skinny_gemm_plans.prefill_tuning, "use_autotune", lambda device: True)
    skinny_gemm_plans.reset()
    device = torch.device("cuda")
    x = _randn(4, 1024, dtype=torch.bfloat16, device=device)
    w = _randn(2048, 1024, dtype=torch.bfloat16, device=device, seed=1) / 32  # a shape the table does not list
    with skinny_gemm_plans.tuning():
        out = linear(x, w)
    key = (2048, 1024, 4, "bfloat16", False)
    plan = skinny_gemm_plans.lookup(key)
    assert plan in skinny_gemm_plans.ALL_CONFIGS and key in skinny_gemm_plans._tuned_keys
    assert any(path.name.startswith("skinny_gemm-") for path in (tmp_path / "autotune").iterdir())
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), atol=2e-2, rtol=2e-2)
    skinny_gemm_plans.reset()


def test_warm_up_linear_covers_every_bucket(tmp_path, monkeypatch):
    """The start-up pass (GPU only in the engine) on a CPU runner: one pass per row bucket, capped at the token
    budget (24 rows stand for the bucket of 32), writing nothing into the cache."""
    from flashserve import LLM
    from flashserve.engine import warmup
    from flashserve.models.checkpoint import write_random_checkpoint

    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    directory = write_random_checkpoint(str(tmp_path / "llama"), "LlamaForCausalLM", seed=1)
    llm = LLM(directory, dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=24)
    runner = llm.engine.runner
    before = runner.kv_cache.clone()
    seen = []
    monkeypatch.setattr(warmup, "_forward_one_sequence", lambda runner, q, k, all_logits: seen.append((q, k)))
    assert warmup.warm_up_linear(runner, show_progress=False) == 6
    assert seen == [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (24, 24)]
    monkeypatch.undo()
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    assert warmup.warm_up_linear(runner, show_progress=False) == 6
    assert torch.equal(runner.kv_cache, before)
