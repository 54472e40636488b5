"""The fused-MoE kernel against its plain-PyTorch reference, the routing against Hugging Face's router, and the
device-side token permutation.

Error bar (FlashAttention's rule): the kernel's max error against the fp32 reference must be at most twice that of
the same math done in the input precision in plain PyTorch (plus 1e-5 of the output's scale: in fp32 that math is
the reference itself). On the CPU the kernels run in Triton's interpreter
(tiny shapes, fp32/fp16); the GPU variants cover token counts up to 4096 and expert counts up to 128.
"""
import random

import pytest
import torch

from flashserve.kernels.moe import fused_experts, fused_moe, moe_align_block_size
from flashserve.kernels.moe_routing import moe_routing
from flashserve.kernels.moe_configs import MoeConfigTable, MoeGemmConfig, default_configs, moe_configs
from flashserve.kernels.skinny_gemm_plans import pipeline_bytes
from flashserve.kernels.reference import moe as reference


def _moe_inputs(num_tokens, hidden, intermediate, num_experts, top_k, dtype, device, seed=0, unused_experts=0):
    """Random layer inputs; the last ``unused_experts`` experts get no token (their logits are very negative)."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)
    x = randn(num_tokens, hidden)
    w13 = randn(num_experts, 2 * intermediate, hidden, scale=hidden ** -0.5)
    w2 = randn(num_experts, hidden, intermediate, scale=intermediate ** -0.5)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    if unused_experts:
        logits[:, num_experts - unused_experts:] = -1e4
    return x, w13, w2, logits.to(device)


def _check_against_reference(num_tokens, hidden, intermediate, num_experts, top_k, dtype, device="cpu",
                             unused_experts=0, configs=None):
    x, w13, w2, logits = _moe_inputs(num_tokens, hidden, intermediate, num_experts, top_k, dtype, device,
                                     unused_experts=unused_experts)
    weights, ids = reference.moe_routing(logits, top_k, True)
    out = fused_experts(x, w13, w2, weights, ids, configs)
    assert out.dtype == dtype and out.shape == x.shape
    exact = reference.fused_experts(x.float(), w13.float(), w2.float(), weights, ids)
    same_precision = reference.fused_experts(x, w13, w2, weights, ids, compute_dtype=dtype)
    error = (out.float() - exact).abs().max().item()
    bar = (same_precision.float() - exact).abs().max().item()
    # In fp32 the same-precision run is the reference itself (bar 0): allow the summation-order error.
    assert error <= 2 * bar + 1e-5 * exact.abs().max().item(), (error, bar)
    if unused_experts:
        assert int(ids.max()) < num_experts - unused_experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 1), (3, 8, 2), (7, 16, 4), (2, 8, 8)])
def test_fused_experts_matches_reference(num_tokens, num_experts, top_k, dtype):
    _check_against_reference(num_tokens, 32, 24, num_experts, top_k, dtype)


def test_fused_experts_with_experts_that_get_no_token_and_several_tiles():
    """Experts without tokens, hidden and intermediate sizes that are not multiples of the tiles, several tiles
    along each dimension (16-row blocks, 16-column tiles, 16-deep K steps)."""
    config = MoeGemmConfig(16, 16, 16, 4, 1)
    _check_against_reference(20, 40, 36, 8, 2, torch.float32, unused_experts=5, configs=(config, config))


def test_fused_moe_routes_like_hugging_face():
    """moe_routing is HF's router (softmax, torch.topk, optional renormalisation), ties included."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    weights, ids = reference.moe_routing(logits, 2, False)
    probs = torch.softmax(logits, dim=-1)
    expected_weights, expected_ids = torch.topk(probs, 2, dim=-1)
    assert torch.equal(ids.long(), expected_ids) and torch.equal(weights, expected_weights)
    renormalised, _ = reference.moe_routing(logits, 2, True)
    assert torch.allclose(renormalised.sum(-1), torch.ones(2))


def _check_routing(logits, top_k, renormalize):
    weights, ids = moe_routing(logits, top_k, renormalize)
    expected_weights, expected_ids = reference.moe_routing(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (5, 8, 8), (37, 60, 4), (3, 128, 8), (20, 6, 1)])
def test_routing_kernel_matches_hugging_face(num_tokens, num_experts, top_k, renormalize, monkeypatch):
    """The one-launch router (Triton, interpreter here) against HF's operations on logits without ties: same
    experts in the same order, the same weights up to fp32 rounding. Equal logits go to the lower expert id (torch's
    CPU topk orders ties otherwise: checked against the rule itself)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    generator = torch.Generator().manual_seed(num_tokens * num_experts)
    _check_routing(torch.randn(num_tokens, num_experts, generator=generator) * 3, top_k, renormalize)
    distinct = torch.stack([torch.randperm(num_experts, generator=generator) for _ in range(num_tokens)])
    _check_routing(distinct.half() / 16, top_k, renormalize)  # fp16 logits, no two equal in a row
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, -1.0], [0.0] * 6, [2.0, 2.0, 2.0, 2.0, 5.0, 2.0]])
    k = min(top_k, 6)
    weights, ids = moe_routing(ties, k, renormalize)
    expected_ids = torch.tensor([[1, 2, 4, 0, 3, 5], [0, 1, 2, 3, 4, 5], [4, 0, 1, 2, 3, 5]], dtype=torch.int32)
    assert torch.equal(ids, expected_ids[:, :k])
    probs = torch.softmax(ties, dim=-1).gather(1, expected_ids[:, :k].long())
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True) if renormalize else probs)


def test_routing_validation_and_empty():
    logits = torch.randn(4, 8)
    for bad_k in (0, 9, 2.0):
        with pytest.raises(ValueError, match="top_k"):
            moe_routing(logits, bad_k, True)
    with pytest.raises(ValueError, match="router_logits"):
        moe_routing(logits[0], 2, True)
    weights, ids = moe_routing(logits[:0], 2, True)
    assert weights.shape == ids.shape == (0, 2)


def test_fused_moe_end_to_end_and_validation():
    x, w13, w2, logits = _moe_inputs(4, 32, 16, 8, 2, torch.float32, "cpu")
    out = fused_moe(x, w13, w2, logits, 2, False)
    weights, ids = reference.moe_routing(logits, 2, False)
    assert torch.allclose(out, reference.fused_experts(x, w13, w2, weights, ids), atol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        fused_moe(x, w13, w2, logits, 9, False)
    with pytest.raises(ValueError, match="router_logits"):
        fused_moe(x, w13, w2, logits[:, :4], 2, False)
    with pytest.raises(ValueError, match="w2"):
        fused_experts(x, w13, w2[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_experts(x, w13, w2, weights.half(), ids)
    assert fused_experts(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m",
                         [(1, 1, 8, 16), (5, 2, 8, 4), (33, 8, 128, 16), (300, 4, 6, 16), (3, 2, 200, 32),
                          (1100, 4, 256, 16)])
def test_moe_align_block_size(num_tokens, top_k, num_experts, block_m, backend, monkeypatch):
    """Every pair appears once, in its expert's padded run, in pair order; runs are block-aligned; the grid covers
    them; experts without pairs have no blocks. The Triton kernels (the single-launch path for few pairs, several
    chunks for 33 x 8 pairs over 128 experts and 300 x 4 over 6, more chunks than one prefix step takes for
    1100 x 4 over 256, expert counts that are not powers of two) and the reference give the same."""
    if backend == "torch":
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    rng = random.Random(num_tokens)
    ids = torch.tensor([rng.sample(range(num_experts), top_k) for _ in range(num_tokens)], dtype=torch.int32)
    sorted_ids, block_experts, num_padded = moe_align_block_size(ids, block_m, num_experts)
    flat = ids.reshape(-1)
    total = int(num_padded)
    counts = torch.bincount(flat.long(), minlength=num_experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.numel() % block_m == 0 and sorted_ids.numel() >= total
    assert block_experts.numel() == sorted_ids.numel() // block_m
    assert bool((sorted_ids[total:] == -1).all()) and bool((block_experts[total // block_m:] == num_experts).all())
    expected_runs = []
    for expert in range(num_experts):
        pairs = (flat == expert).nonzero().squeeze(1).tolist()
        expected_runs += pairs + [-1] * (-len(pairs) % block_m)
    assert sorted_ids[:total].tolist() == expected_runs
    experts_of_rows = block_experts[: total // block_m].repeat_interleave(block_m)
    real = sorted_ids[:total] >= 0
    assert torch.equal(experts_of_rows[real], flat[sorted_ids[:total][real].long()])


def test_down_gemm_split_k():
    """The down GEMM with K split into 2 and 3 shares (3 does not divide the 4 K steps: one share is short)."""
    up = MoeGemmConfig(16, 16, 16, 4, 1)
    for split_k in (2, 3):
        down = MoeGemmConfig(16, 16, 16, 4, 1, split_k)
        _check_against_reference(9, 40, 64, 8, 2, torch.float32, unused_experts=3, configs=(up, down))
    x, w13, w2, logits = _moe_inputs(2, 32, 16, 4, 2, torch.float32, "cpu")
    weights, ids = reference.moe_routing(logits, 2, True)
    with pytest.raises(ValueError, match="split_k"):
        fused_experts(x, w13, w2, weights, ids, (MoeGemmConfig(16, 16, 16, 4, 1, 2), up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_down_gemm_pair_outputs(dtype):
    """The down GEMM storing each pair's weighted product and a third launch summing each token's k rows (k 2 and
    3, experts without tokens, column tiles that do not divide the hidden size); not with split-K or on gate/up."""
    up = MoeGemmConfig(16, 16, 16, 4, 1)
    _check_against_reference(9, 40, 36, 8, 2, dtype, unused_experts=3,
                             configs=(up, MoeGemmConfig(16, 16, 16, 4, 1, pair_outputs=True)))
    _check_against_reference(5, 40, 36, 8, 3, dtype, configs=(up, MoeGemmConfig(16, 32, 16, 4, 1, pair_outputs=True)))
    x, w13, w2, logits = _moe_inputs(2, 32, 16, 4, 2, torch.float32, "cpu")
    weights, ids = reference.moe_routing(logits, 2, True)
    with pytest.raises(ValueError, match="split K"):
        fused_experts(x, w13, w2, weights, ids, (up, MoeGemmConfig(16, 16, 16, 4, 1, 2, True)))
    with pytest.raises(ValueError, match="gate/up"):
        fused_experts(x, w13, w2, weights, ids, (MoeGemmConfig(16, 16, 16, 4, 1, pair_outputs=True), up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pair_outputs", [False, True])
def test_fused_experts_adds_the_residual(dtype, pair_outputs):
    """``residual``: the result is ``residual + fused_experts(...)`` with the unfused rounding (the experts' sum
    rounded to the dtype, then the add), from the launch that sums (pair rows, or the atomic mode's fp32 rows);
    a residual of the wrong shape, dtype or layout is a ValueError naming it."""
    up = MoeGemmConfig(16, 16, 16, 4, 1)
    configs = (up, MoeGemmConfig(16, 16, 16, 4, 1, pair_outputs=pair_outputs))
    x, w13, w2, logits = _moe_inputs(7, 40, 36, 8, 3, dtype, "cpu")
    residual = torch.randn(7, 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    kept = residual.clone()
    weights, ids = reference.moe_routing(logits, 3, True)
    out = fused_experts(x, w13, w2, weights, ids, configs, residual=residual)
    expected = (fused_experts(x, w13, w2, weights, ids, configs).float() + residual.float()).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(residual, kept)
    routed = fused_moe(x, w13, w2, logits, 3, True, residual=residual)
    torch.testing.assert_close(routed, reference.fused_experts(x.float(), w13.float(), w2.float(), weights, ids,
                                                               residual=residual.float()).to(dtype),
                               atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    for bad in (residual[:3], residual.double(), torch.randn(40, 7).to(dtype).t()):
        with pytest.raises(ValueError, match="residual"):
            fused_experts(x, w13, w2, weights, ids, configs, residual=bad)


def test_launch_configs_table_and_defaults():
    """A table (the --tune file format) is used for its shapes, with its own buckets; other shapes and CPU
    tensors get the defaults: 16-row tiles while few rows reach an expert (narrower gate/up tiles the fewer
    experts are hit), 128-row tiles for long prefills; fp32 gets shallow tiles."""
    config = dict(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)
    table = MoeConfigTable.from_json(dict(device="Some GPU", token_buckets=[100], entries=[dict(
        num_experts=128, hidden_size=2048, intermediate_size=768, top_k=8,
        configs=[[config, dict(config, split_k=2)],
                 [dict(config, block_m=64), dict(config, block_m=64, pair_outputs=True)]])]))
    assert MoeConfigTable.from_json(table.to_json()) == table
    assert moe_configs(13, 128, 2048, 768, 8, table=table)[1].pair_outputs
    up, down = moe_configs(12, 128, 2048, 768, 8, table=table)
    assert up == MoeGemmConfig(32, 64, 64, 4, 3) and down.split_k == 2
    assert moe_configs(13, 128, 2048, 768, 8, table=table)[0].block_m == 64
    assert moe_configs(13, 128, 2048, 384, 8, table=table) == moe_configs(13, 128, 2048, 384, 8)
    with pytest.raises(ValueError, match="pairs"):
        MoeConfigTable.from_json(dict(table.to_json(), token_buckets=[100, 200]))
    decode_1, decode_4 = moe_configs(1, 128, 2048, 768, 8)[0], moe_configs(4, 128, 2048, 768, 8)[0]
    assert decode_1.block_m == decode_4.block_m == 16 and decode_1.block_n < decode_4.block_n <= 64
    assert moe_configs(4096, 8, 4096, 14336, 2)[0].block_m == 128
    assert moe_configs(4096, 128, 2048, 768, 8)[0].block_m == 128
    assert all(config.block_k <= 32 and config.num_stages <= 3 for config in moe_configs(64, 8, 64, 32, 2, 4))
    small_smem = default_configs(4, 8, 4096, 14336, smem=100 * 1024)
    assert all(pipeline_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, gated, 2) <= 100 * 1024
               for c, gated in zip(small_smem, (True, False)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, 4, 17, 64, 300, 4096])
@pytest.mark.parametrize("num_experts,top_k,unused", [(8, 2, 0), (64, 6, 20), (128, 8, 0), (16, 1, 7)])
def test_fused_experts_on_gpu(num_tokens, num_experts, top_k, unused, dtype):
    _check_against_reference(num_tokens, 256, 192, num_experts, top_k, dtype, "cuda", unused_experts=unused)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_fused_experts_on_gpu_tuned_shape(num_tokens):
    """The Qwen3-30B-A3B layer shape through its configs on this GPU (the tuned table's where there is one), in
    bf16."""
    _check_against_reference(num_tokens, 2048, 768, 128, 8, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,up,down", [
    (4, MoeGemmConfig(16, 16, 128, 4, 2), MoeGemmConfig(16, 64, 128, 4, 4, 2)),
    (64, MoeGemmConfig(16, 32, 256, 4, 4), MoeGemmConfig(16, 128, 256, 4, 2, 3)),
    (300, MoeGemmConfig(32, 64, 128, 4, 3), MoeGemmConfig(32, 128, 64, 4, 3)),
    (4096, MoeGemmConfig(128, 128, 64, 8, 4), MoeGemmConfig(128, 256, 64, 8, 4)),
    (4, MoeGemmConfig(16, 32, 128, 4, 3), MoeGemmConfig(16, 64, 128, 4, 2, pair_outputs=True)),
    (4096, MoeGemmConfig(128, 128, 64, 8, 4), MoeGemmConfig(128, 64, 64, 8, 3, pair_outputs=True)),
])
def test_fused_experts_on_gpu_sweep_corners(num_tokens, up, down):
    """Corners of the --tune sweep on the Qwen3-30B-A3B shape in bf16: 16-column gate/up tiles, split-K down
    GEMMs (3 shares of 3 K steps of 256), deep K steps, the 128 x 256 tiles of long prefills, per-pair down
    outputs."""
    _check_against_reference(num_tokens, 2048, 768, 128, 8, torch.bfloat16, "cuda", configs=(up, down))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 128, 8), (64, 128, 8), (4096, 128, 8), (7, 8, 2),
                                                          (300, 60, 4)])
def test_routing_kernel_on_gpu_matches_torch(num_tokens, num_experts, top_k):
    """The one-launch router against HF's operations on the GPU: fp32 logits (no ties), and bf16 logits of a few
    distinct values (ties everywhere, as bf16 router logits have them): the same experts as torch.topk on CUDA."""
    generator = torch.Generator("cuda").manual_seed(num_tokens)
    for logits in (torch.randn(num_tokens, num_experts, device="cuda", generator=generator),
                   (torch.randn(num_tokens, num_experts, device="cuda", generator=generator) * 4).round().bfloat16()):
        for renormalize in (False, True):
            weights, ids = moe_routing(logits, top_k, renormalize)
            expected_weights, expected_ids = reference.moe_routing(logits, top_k, renormalize)
            assert torch.equal(ids.sort(dim=1).values, expected_ids.sort(dim=1).values)
            torch.testing.assert_close(weights.sort(dim=1).values, expected_weights.sort(dim=1).values,
                                       rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_fused_moe_in_a_cuda_graph():
    """No host sync: a captured call replays on new routings (other experts, other counts) correctly."""
    x, w13, w2, logits = _moe_inputs(16, 256, 128, 32, 4, torch.bfloat16, "cuda")
    static_logits = logits.clone()
    fused_moe(x, w13, w2, static_logits, 4, True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(x, w13, w2, static_logits, 4, True)
    for seed in range(3):
        static_logits.copy_(torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        expected = fused_moe(x, w13, w2, static_logits, 4, True)
        assert torch.allclose(static_out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("down", [MoeGemmConfig(16, 64, 128, 4, 2),
                                  MoeGemmConfig(16, 64, 128, 4, 2, pair_outputs=True)])
def test_fused_experts_chain_with_and_without_pdl_gpu(monkeypatch, down):
    """Layers back to back (each reads the previous one's output), replayed in a CUDA graph with programmatic
    dependent launch (sm_90+): the same as without it, for both down output modes (atomic: up to the order of
    the fp32 additions; pair outputs: bit for bit)."""
    from flashserve.kernels import pdl
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability >= 9")
    x, w13, w2, logits = _moe_inputs(4, 256, 192, 32, 4, torch.bfloat16, "cuda")
    weights, ids = reference.moe_routing(logits, 4, True)
    configs = (MoeGemmConfig(16, 32, 128, 4, 3), down)

    def run(value):
        monkeypatch.setenv("FLASHSERVE_PDL", value)
        pdl.refresh()

        def chain():
            y = x
            for _ in range(4):
                y = fused_experts(y, w13, w2, weights, ids, configs)
            return y
        chain()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        graph.replay()
        torch.cuda.synchronize()
        return out.clone()

    with_pdl, without = run("1"), run("0")
    pdl.refresh()
    if down.pair_outputs:
        assert torch.equal(with_pdl, without)
    else:
        torch.testing.assert_close(with_pdl, without, atol=2e-2, rtol=2e-2)
