"""The layer helpers against their references and Hugging Face's modules: rms_norm, fused_add_rms_norm,
apply_rotary (NeoX and interleaved), silu_and_mul."""
import pytest
import torch

from flashserve.kernels import apply_rotary, fused_add_rms_norm, reference, rms_norm, silu_and_mul

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def check_rms_norm(shape, dtype, device="cpu"):
    x = _randn(*shape, dtype=dtype, device=device)
    weight = _randn(shape[-1], dtype=dtype, seed=1, device=device)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.allclose(out.float(), reference.rms_norm(x, weight, 1e-6).float(), atol=TOL[dtype], rtol=TOL[dtype])


def check_fused_add_rms_norm(shape, dtype, device="cpu"):
    x = _randn(*shape, dtype=dtype, device=device)
    residual_buffer = _randn(shape[0], shape[1] + 8, dtype=dtype, seed=2, device=device)
    residual = residual_buffer[:, 4:-4]  # strided rows
    weight = _randn(shape[-1], dtype=dtype, seed=1, device=device)
    x_before, ref_residual = x.clone(), residual.clone()
    out = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out = reference.fused_add_rms_norm(x, ref_residual, weight, 1e-5)
    assert torch.equal(x, x_before), "x must not be modified"
    assert torch.equal(residual, ref_residual), "residual must become x + residual"
    assert torch.allclose(out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 100)])
def test_rms_norm(shape, dtype):
    check_rms_norm(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rms_norm(dtype):
    check_fused_add_rms_norm((6, 72), dtype)


def test_rms_norm_matches_hf_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(_randn(96, seed=3))
        for dtype in (torch.float32, torch.float16):
            x = _randn(4, 96, dtype=dtype)
            expected = norm.to(dtype)(x)
            assert torch.allclose(rms_norm(x, norm.weight, 1e-6), expected, atol=TOL[dtype] / 10, rtol=TOL[dtype])


def check_rotary(is_neox, rotary_dim, dtype, device="cpu", tokens=7, heads=4, heads_k=2, head_dim=32):
    qkv = _randn(tokens, (heads + 2 * heads_k) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # strided views, as in a fused QKV projection
    k = qkv[:, heads * head_dim: (heads + heads_k) * head_dim].view(tokens, heads_k, head_dim)
    cos_sin_cache = _randn(50, rotary_dim, seed=4, device=device)
    positions = torch.randint(0, 50, (tokens,), generator=torch.Generator().manual_seed(5)).to(device)
    ref_q, ref_k = q.clone(), k.clone()
    apply_rotary(q, k, cos_sin_cache, positions, is_neox)
    reference.apply_rotary(ref_q, ref_k, cos_sin_cache, positions, is_neox)
    assert torch.allclose(q.float(), ref_q.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.allclose(k.float(), ref_k.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary(is_neox, rotary_dim, dtype):
    check_rotary(is_neox, rotary_dim, dtype)


def test_rotary_neox_matches_hf_and_k_is_optional():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = _randn(5, 4, 16), _randn(5, 2, 16, seed=1)
    angles = _randn(20, 8, seed=2)
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.tensor([0, 3, 19, 7, 7])
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[positions][None]  # HF: (1, T, D), heads on dim 2
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[positions][None]
    hf_q, hf_k = llama.apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
    ours_q, ours_k = apply_rotary(q.clone(), k.clone(), cos_sin_cache, positions, True)
    assert torch.allclose(ours_q, hf_q[0], atol=1e-6) and torch.allclose(ours_k, hf_k[0], atol=1e-6)
    only_q, none_k = apply_rotary(q.clone(), None, cos_sin_cache, positions, True)
    assert none_k is None and torch.equal(only_q, ours_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 2 * 48), (2, 3, 2 * 1100)])
def test_silu_and_mul(shape, dtype):
    x = _randn(*shape, dtype=dtype)
    out = silu_and_mul(x)
    gate, up = x.float().chunk(2, dim=-1)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert torch.allclose(out.float(), torch.nn.functional.silu(gate) * up, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.allclose(out.float(), reference.silu_and_mul(x).float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("call, name", [
    (lambda: rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6), "weight"),
    (lambda: rms_norm(torch.randn(2, 8).t(), torch.randn(2), 1e-6), "x"),
    (lambda: rms_norm(torch.randn(2, 8), torch.randn(8), -1.0), "eps"),
    (lambda: fused_add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-6), "residual"),
    (lambda: apply_rotary(torch.randn(3, 2, 8), None, torch.randn(10, 10), torch.arange(3), True), "cos_sin_cache"),
    (lambda: apply_rotary(torch.randn(3, 2, 8), None, torch.randn(10, 8), torch.arange(4), True), "positions"),
    (lambda: apply_rotary(torch.randn(3, 2, 8), torch.randn(3, 2, 4), torch.randn(10, 8), torch.arange(3), True),
     "k"),
    (lambda: silu_and_mul(torch.randn(3, 7)), "x"),
    (lambda: apply_rotary(torch.randn(3, 2, 8), None, torch.randn(10, 8), torch.arange(6)[::2], True), "positions"),
    (lambda: rms_norm(_not_row_viewable(), torch.randn(8), 1e-6), "x"),
    (lambda: fused_add_rms_norm(_not_row_viewable(), torch.randn(3, 2, 8), torch.randn(8), 1e-6), "x"),
    (lambda: fused_add_rms_norm(torch.randn(3, 2, 8), _not_row_viewable(), torch.randn(8), 1e-6), "residual"),
    (lambda: silu_and_mul(_not_row_viewable()), "x"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_invalid_arguments(call, name, backend, monkeypatch):
    """The same ValueError on both backends (a layout the kernel cannot walk is refused, never copied)."""
    if backend == "torch":
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    with pytest.raises(ValueError, match=name):
        call()


def _not_row_viewable():
    """(3, 2, 8) with padded rows in a transposed buffer: last dim contiguous, but no (rows, 8) view exists."""
    return torch.randn(2, 3, 12).transpose(0, 1)[..., :8]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_helpers_with_zero_tokens(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    x, weight = torch.randn(0, 16), torch.randn(16)
    assert rms_norm(x, weight, 1e-6).shape == (0, 16)
    assert fused_add_rms_norm(x, torch.randn(0, 16), weight, 1e-6).shape == (0, 16)
    assert silu_and_mul(x).shape == (0, 8)
    q, k = apply_rotary(torch.randn(0, 2, 16), torch.randn(0, 1, 16), torch.randn(4, 16), torch.zeros(0).long())
    assert q.shape == (0, 2, 16) and k.shape == (0, 1, 16)


def test_fused_add_rms_norm_residual_of_another_dtype():
    """An fp32 residual stream with fp16 activations: the kernel and the reference normalise the fp32 sum."""
    x, weight = _randn(4, 64, dtype=torch.float16), _randn(64, dtype=torch.float16, seed=1)
    residual, ref_residual = _randn(4, 64, seed=2), _randn(4, 64, seed=2)
    out = fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_out = reference.fused_add_rms_norm(x, ref_residual, weight, 1e-6)
    assert out.dtype == torch.float16 and torch.equal(residual, ref_residual)
    assert torch.equal(out, ref_out)  # rounding the residual to fp16 before normalising is off by one ulp here
