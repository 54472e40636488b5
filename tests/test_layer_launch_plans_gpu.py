"""The layer kernels' per-geometry launch plans on a CUDA GPU: a decode-step-like chain (fused add + RMSNorm, split-K
products whose partials share the stream's scratch buffer with a split-KV decode, the q/k-norm + rotary + cache
write, the gated product) gives bit for bit the same results on its first call (Triton's launch path), on repeated
eager calls (the compiled kernels launched directly, with PDL where the GPU has it) and replayed from a CUDA graph."""
import pytest
import torch

from flashserve.kernels import (fused_add_rms_norm, linear, linear_silu_and_mul, paged_attention, rms_norm,
                                skinny_gemm_plans)
from flashserve.kernels.skinny_gemm_plans import GemmConfig
from test_launch_plans_gpu import _decode_args, _engine_call

pytestmark = pytest.mark.gpu
EPS = 1e-6


@pytest.fixture
def split_k_plans(monkeypatch, tmp_path):
    """Every product planned as a split-K grid kernel (no tuned plans read from disk)."""
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(skinny_gemm_plans, "default_config", lambda *args: GemmConfig(64, 128, 4, 4, 4))
    skinny_gemm_plans.reset()
    yield
    skinny_gemm_plans.reset()


def test_decode_step_chain_repeats_and_replays_bit_for_bit(split_k_plans):
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=generator).mul_(scale).bfloat16()

    hidden, residual = randn(1, 1024), randn(1, 1024)
    norm_weight, head_norm = randn(1024), randn(128)
    qkv_w, o_w = randn(4096, 1024, scale=1 / 32), randn(1024, 4096, scale=1 / 64)
    gate_up_w, down_w = randn(6144, 1024, scale=1 / 32), randn(1024, 3072, scale=1 / 55)
    cos_sin = torch.randn(256, 128, device="cuda", generator=generator)
    positions = torch.tensor([7], device="cuda")
    slots = torch.tensor([21], device="cuda")
    caches = [torch.zeros(8, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    decode_call = _engine_call(_decode_args(0))  # split-KV partial states in the stream's scratch buffer

    def step():
        stream = residual.clone()
        x = fused_add_rms_norm(hidden, stream, norm_weight, EPS)
        qkv = linear(rms_norm(x, norm_weight, EPS), qkv_w)
        q, k, v = qkv.split([2048, 1024, 1024], dim=-1)
        q, k, v = q.view(1, 16, 128), k.view(1, 8, 128), v.view(1, 8, 128)
        paged_attention.qk_norm_rope_cache(q, k, v, cos_sin, positions, *caches, slots, head_norm, head_norm, EPS)
        attn = decode_call()
        out = linear(attn.reshape(1, -1), o_w)
        down = linear(linear_silu_and_mul(out, gate_up_w), down_w)
        return [stream, x, qkv, attn, out, down, caches[0].clone(), caches[1].clone()]

    first = step()
    for _ in range(3):
        again = step()
        assert all(torch.equal(a, b) for a, b in zip(again, first))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for cache in caches:
        cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, first))
