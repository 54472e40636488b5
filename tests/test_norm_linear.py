"""RMSNorm folded into the small-M matrix product (``flashserve.kernels.norm_linear``): the grid kernel's RMSNorm
prologue against rms_norm-then-linear (an fp32 oracle on the normed operand, FlashAttention's 2x rule), its
rounding of the operand, split-K, the one-row FMA path, the resident kernel's own norm, the gated epilogue, the
fallbacks (rows, cuBLAS and stream-K plans, torch) and argument checks; on the GPU, bf16 against the unfused
kernels at the decode shapes."""
import math

import pytest
import torch

from flashserve.kernels import (norm_linear, reference, rms_norm, rms_norm_linear, rms_norm_linear_silu_and_mul,
                                skinny_gemm, skinny_gemm_plans, skinny_gemm_prologue)
from flashserve.kernels.skinny_gemm_plans import CUBLAS, GemmConfig

EPS = 1e-6



@pytest.fixture(autouse=True)
def _fold_up_to_32_kb(monkeypatch):
    """The prologue is off by default (``NORM_MAX_X_BYTES = 0``, slower on the H200): these tests fold up to 32 KB
    of x."""
    monkeypatch.setattr(norm_linear, "NORM_MAX_X_BYTES", 32 * 1024)

def _randn(*shape, dtype, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _operands(rows, n_out, k, dtype, gated, bias, device="cpu"):
    x = _randn(rows, k, dtype=dtype, device=device) * 3
    norm_weight = 1 + _randn(k, dtype=dtype, device=device, seed=4) / 4
    w = _randn(2 * n_out if gated else n_out, k, dtype=dtype, device=device, seed=1) / math.sqrt(k)
    b = _randn(w.shape[0], dtype=dtype, device=device, seed=2) if bias else None
    return x, norm_weight, w, b


def _oracle(x, norm_weight, w, b, gated):
    """(the fp32 product of the rms_norm reference's output, rounded as the kernel rounds it; the error allowed:
    2x that of the same math in x's dtype + a floor)."""
    normed = reference.rms_norm(x, norm_weight, EPS)
    unfused = reference.linear_silu_and_mul if gated else reference.linear
    expected = unfused(normed.float(), w.float(), b.float() if b is not None else None)
    floor = 1e-5 if x.dtype == torch.float32 else 2e-3
    return expected, 2 * (unfused(normed, w, b).float() - expected).abs().max().item() + floor


def check_normed_product(rows, n_out, k, dtype, config, gated=False, bias=False):
    """The kernel with the prologue against ``_oracle``."""
    x, norm_weight, w, b = _operands(rows, n_out, k, dtype, gated, bias)
    out = skinny_gemm.launch(x, w, b, None, gated, config, norm_weight, EPS)
    expected, allowed = _oracle(x, norm_weight, w, b, gated)
    assert out.shape == (rows, n_out) and out.dtype == dtype
    assert (out.float() - expected).abs().max().item() <= allowed, config


CONFIGS = [GemmConfig(32, 32, 1, 4, 1), GemmConfig(16, 16, 2, 4, 1), GemmConfig(16, 32, 3, 4, 1)]
FMA_CONFIGS = [GemmConfig(32, 32, 1, 4, 1, False), GemmConfig(16, 16, 3, 4, 1, False)]
RESIDENT_CONFIGS = [GemmConfig(8, 0, 1, 4, 1, False, 0, False, True), GemmConfig(16, 0, 1, 4, 1, True, 0, False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", CONFIGS + FMA_CONFIGS + RESIDENT_CONFIGS,
                         ids=lambda c: ("res-" if c.resident else "") +
                         f"{'dot' if c.use_dot else 'fma'}-n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("rows, n_out, k", [(1, 40, 64), (5, 33, 80), (16, 48, 40)])
def test_prologue_kernel(rows, n_out, k, dtype, config):
    if not config.use_dot and rows > (8 if config.resident else 1):
        return
    check_normed_product(rows, n_out, k, dtype, config, bias=rows == 5)
    check_normed_product(rows, n_out // 2 + 1, k, dtype, config, gated=True, bias=rows == 1)


@pytest.mark.parametrize("config", [CONFIGS[1], FMA_CONFIGS[0]], ids=["dot-split2", "fma"])
def test_prepass_over_several_tiles(config, monkeypatch):
    """A pre-pass tile narrower than K (a ragged last one too): the rows' sums of squares over several tiles."""
    monkeypatch.setattr(skinny_gemm_prologue, "PREPASS_ELEMENTS_PER_THREAD", 1)  # 4 warps: 128 elements
    assert skinny_gemm_prologue.prepass_tile(3, 200, 4) == (4, 32)
    for rows in (3, 16) if config.use_dot else (1,):
        check_normed_product(rows, 24, 200, torch.float16, config, bias=True)
        check_normed_product(rows, 24, 200, torch.float32, config, gated=True)


@pytest.mark.parametrize("config", [CONFIGS[2], FMA_CONFIGS[1]] + RESIDENT_CONFIGS,
                         ids=["dot-split3", "fma-split3", "resident-fma", "resident-dot"])
def test_prologue_rounds_as_rms_norm(config):
    """With an identity weight the product is the normed operand itself: the rms_norm kernel's values, bit for bit
    but for rare one-ulp flips where the two fp32 sums of squares round differently."""
    rows = 3 if config.use_dot or config.resident else 1
    x = _randn(rows, 96, dtype=torch.float16) * 5
    norm_weight = 1 + _randn(96, dtype=torch.float16, seed=4) / 3
    out = skinny_gemm.launch(x, torch.eye(96, dtype=torch.float16), None, None, False, config, norm_weight, EPS)
    expected = rms_norm(x, norm_weight, EPS)
    ulp = torch.finfo(torch.float16).eps * expected.abs().float().clamp_min(2 ** -14)
    assert ((out.float() - expected.float()).abs() <= ulp).all()
    assert (out != expected).float().mean().item() <= 0.02


def test_strided_rows_and_leading_dimensions():
    """x as a column slice of a wider tensor with two leading dimensions, through the public functions (with a
    residual too)."""
    skinny_gemm_plans.reset()
    x_wide = _randn(2, 3, 100, dtype=torch.float32)
    x = x_wide[..., 10:74]
    norm_weight = _randn(64, dtype=torch.float32, seed=4)
    w = _randn(96, 64, dtype=torch.float32, seed=1)
    b = _randn(96, dtype=torch.float32, seed=2)
    r = _randn(2, 3, 96, dtype=torch.float32, seed=3)
    out = rms_norm_linear(x, norm_weight, EPS, w, b, r)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, reference.rms_norm_linear(x, norm_weight, EPS, w, b, r), atol=1e-4, rtol=1e-4)
    gated = rms_norm_linear_silu_and_mul(x, norm_weight, EPS, w, b)
    assert gated.shape == (2, 3, 48)
    torch.testing.assert_close(gated, reference.rms_norm_linear_silu_and_mul(x, norm_weight, EPS, w, b),
                               atol=1e-4, rtol=1e-4)


def test_fallbacks_run_rms_norm_then_the_product(monkeypatch):
    """x larger than NORM_MAX_X_BYTES, a cuBLAS plan, a stream-K plan and torch: rms_norm then the plain product
    (no prologue launch), with the reference's results."""
    launches = []  # per kernel launch planned: with the prologue?
    plain_plan = skinny_gemm.launch_plan

    def recording_plan(*args):
        launches.append(len(args) > 6 and args[6])
        return plain_plan(*args)

    monkeypatch.setattr(skinny_gemm, "launch_plan", recording_plan)
    monkeypatch.setattr(norm_linear, "NORM_MAX_X_BYTES", 16 * 48 * 4)  # 16 rows of 48 fp32
    w = _randn(32, 48, dtype=torch.float32, seed=1)
    norm_weight = _randn(48, dtype=torch.float32, seed=4)

    def check(rows, gated=False):
        x = _randn(rows, 48, dtype=torch.float32)
        fused = rms_norm_linear_silu_and_mul if gated else rms_norm_linear
        unfused = reference.rms_norm_linear_silu_and_mul if gated else reference.rms_norm_linear
        torch.testing.assert_close(fused(x, norm_weight, EPS, w), unfused(x, norm_weight, EPS, w),
                                   atol=1e-4, rtol=1e-4)

    skinny_gemm_plans.reset()
    check(16)
    assert launches == [True]
    check(17, gated=True)
    check(skinny_gemm.MAX_ROWS + 1)
    assert launches == [True, False]  # the plain kernel beyond 16 rows, torch beyond MAX_ROWS
    for plan in (CUBLAS, GemmConfig(16, 16, 0, 4, 1, True, 2)):
        skinny_gemm_plans.reset()
        monkeypatch.setattr(skinny_gemm_plans, "default_config", lambda *args, plan=plan: plan)
        launches.clear()
        check(4, gated=True)
        assert launches == ([] if plan == CUBLAS else [False])
    resident = RESIDENT_CONFIGS[0]
    skinny_gemm_plans.reset()
    monkeypatch.setattr(skinny_gemm_plans, "default_config", lambda *args: resident)
    monkeypatch.setattr(norm_linear, "NORM_MAX_X_BYTES", 0)  # a resident plan folds all the same
    launches.clear()
    check(4)
    check(2, gated=True)
    assert launches == [True, True]
    assert norm_linear.folds(4, w, None, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: the references
    launches.clear()
    check(2)
    assert launches == [] and not norm_linear.folds(4, w, None, False)
    skinny_gemm_plans.reset()


def test_a_repeated_geometry_is_planned_once(monkeypatch):
    """The folded call's checks, plan and launch plan are made at the first call of a geometry and reused (the
    eager decode step's host cost); new inputs of that geometry still give their own results."""
    planned = []
    plain_plan = skinny_gemm.launch_plan
    monkeypatch.setattr(skinny_gemm, "launch_plan", lambda *args: planned.append(args[6]) or plain_plan(*args))
    skinny_gemm_plans.reset()
    w = _randn(32, 48, dtype=torch.float32, seed=1)
    norm_weight = _randn(48, dtype=torch.float32, seed=4)
    for seed in range(3):
        x = _randn(2, 48, dtype=torch.float32, seed=seed)
        torch.testing.assert_close(rms_norm_linear(x, norm_weight, EPS, w),
                                   reference.rms_norm_linear(x, norm_weight, EPS, w), atol=1e-4, rtol=1e-4)
    assert planned == [True]
    skinny_gemm_plans.reset()


@pytest.mark.parametrize("call, message", [
    (lambda: rms_norm_linear(torch.zeros(2, 8), torch.zeros(9), EPS, torch.zeros(4, 8)), "norm_weight must have"),
    (lambda: rms_norm_linear(torch.zeros(2, 8), torch.zeros(8, dtype=torch.int32), EPS, torch.zeros(4, 8)),
     "norm_weight must have dtype"),
    (lambda: rms_norm_linear(torch.zeros(2, 8), torch.zeros(8), -1.0, torch.zeros(4, 8)), "eps must be >= 0"),
    (lambda: rms_norm_linear(torch.zeros(2, 8), torch.zeros(8), EPS, torch.zeros(4, 9)), "weight must have shape"),
    (lambda: rms_norm_linear(torch.zeros(2, 8), torch.zeros(8), EPS, torch.zeros(4, 8), torch.zeros(3)),
     "bias must have shape"),
    (lambda: rms_norm_linear_silu_and_mul(torch.zeros(2, 8), torch.zeros(8), EPS, torch.zeros(5, 8)),
     "even number of rows"),
    (lambda: skinny_gemm.launch(torch.zeros(2, 16), torch.zeros(8, 16), None, None, False,
                                GemmConfig(16, 16, 0, 4, 1, True, 1), torch.ones(16), EPS), "no RMSNorm prologue"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


GPU_SHAPES = {"qwen3-0.6b qkv": (4096, 1024, False), "qwen3-0.6b gate_up": (3072, 1024, True),
              "llama-3.1-8b qkv": (6144, 4096, False), "llama-3.1-8b gate_up": (14336, 4096, True)}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_every_candidate_against_the_unfused_kernels_gpu(shape):
    """bf16 at the decode shapes, every grid config the tuning may pick (and the table's): the fused launch
    against the rms_norm kernel then the same config's plain launch (equal but for rare one-ulp flips of the
    normed operand), and within the 2x rule of the fp32 oracle."""
    n_out, k, gated = GPU_SHAPES[shape]
    device = torch.device("cuda")
    configs = {skinny_gemm_plans.kernel_config(n_out, k, 1, torch.bfloat16, device)}
    for rows in (1, 16):
        configs |= set(skinny_gemm_plans.candidates(n_out, k, rows, torch.bfloat16, device, gated))
    for rows in (1, 4, 16):
        x, norm_weight, w, b = _operands(rows, n_out, k, torch.bfloat16, gated, rows == 4, device)
        expected, allowed = _oracle(x, norm_weight, w, b, gated)
        for config in sorted((c for c in configs if c.use_dot or rows == 1), key=str):
            fused = skinny_gemm.launch(x, w, b, None, gated, config, norm_weight, EPS)
            unfused = skinny_gemm.launch(rms_norm(x, norm_weight, EPS), w, b, None, gated, config)
            torch.testing.assert_close(fused, unfused, atol=2e-2, rtol=2e-2)
            assert (fused != unfused).float().mean().item() <= 0.02, config
            assert (fused.float() - expected).abs().max().item() <= allowed, config


@pytest.mark.gpu
def test_normed_chain_in_a_cuda_graph_gpu():
    """A decoder-like chain (normed QKV-sized product, residual-add product, normed gated product) through the
    public functions, captured in a CUDA graph (PDL where the GPU has it): replays with new inputs equal eager
    calls bit for bit."""
    device = torch.device("cuda")
    x = _randn(1, 1024, dtype=torch.bfloat16, device=device)
    norm_weight = 1 + _randn(1024, dtype=torch.bfloat16, device=device, seed=4) / 4
    qkv = _randn(4096, 1024, dtype=torch.bfloat16, device=device, seed=1) / 32
    o = _randn(1024, 4096, dtype=torch.bfloat16, device=device, seed=2) / 64
    gate_up = _randn(6144, 1024, dtype=torch.bfloat16, device=device, seed=3) / 32

    def run():
        h = skinny_gemm.linear(rms_norm_linear(x, norm_weight, EPS, qkv), o, None, x)
        return [h, rms_norm_linear_silu_and_mul(h, norm_weight, EPS, gate_up)]

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for seed in range(3):
        x.copy_(_randn(*x.shape, dtype=x.dtype, device=device, seed=10 + seed))
        graph.replay()
        for got, want in zip(captured, run()):
            assert torch.equal(got, want)
