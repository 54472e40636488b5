"""Per-geometry launch plans of the layer kernels on the CPU (Triton's interpreter): ``linear`` /
``linear_silu_and_mul``, ``rms_norm`` / ``fused_add_rms_norm`` and ``qk_norm_rope_and_cache`` check a geometry once,
keep its plan (the skinny GEMM's only while ``skinny_gemm_plans.generation`` holds), and with the launchers' fast
path on (as on a GPU) launch the compiled kernel with the PDL launch option and the constexprs in signature order."""
import pytest
import torch
from triton.runtime.jit import JITFunction

from flashserve.kernels import (_launch, fused_add_rms_norm, linear, linear_silu_and_mul, norm, pdl,
                                qk_norm_rope_and_cache, qk_rope_cache, reference, rms_norm, skinny_gemm,
                                skinny_gemm_plans)
from flashserve.kernels.reference import layers as reference_layers
from test_launch_plans import _Recording, fake_driver  # noqa: F401 (a fixture)


def _counting(monkeypatch, module, name) -> list:
    """Replace ``module.name`` by a wrapper that records each call; returns the record."""
    calls, function = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(1) or function(*args))
    return calls


def test_linear_checks_and_plans_a_geometry_once_while_the_plans_hold(monkeypatch):
    checked = _counting(monkeypatch, skinny_gemm, "check_product")
    skinny_gemm_plans.reset()
    w = torch.randn(40, 32)
    for seed in range(2):
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(linear(x, w), x @ w.T, atol=1e-4, rtol=1e-4)
    assert len(checked) == 1
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(linear_silu_and_mul(x, w), reference.linear_silu_and_mul(x, w), atol=1e-4, rtol=1e-4)
    strided = torch.randn(3, 64)[:, ::2]  # a new geometry: checked (and refused)
    with pytest.raises(ValueError, match="x must be contiguous"):
        linear(strided, w)
    assert len(checked) == 3
    skinny_gemm_plans.reset()  # the plans changed: checked and planned again
    linear(torch.randn(3, 32), w)
    with skinny_gemm_plans.tuning():
        linear(torch.randn(3, 32), w)
    assert len(checked) == 5
    skinny_gemm_plans.reset()


def test_norms_check_a_geometry_once(monkeypatch):
    checked = _counting(monkeypatch, norm, "_check")
    weight = torch.randn(48)
    for _ in range(2):
        x, residual = torch.randn(2, 3, 48), torch.randn(2, 3, 48)
        torch.testing.assert_close(rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
        expected_residual = residual.clone()
        expected = reference.fused_add_rms_norm(x, expected_residual, weight, 1e-6)
        torch.testing.assert_close(fused_add_rms_norm(x, residual, weight, 1e-6), expected)
        torch.testing.assert_close(residual, expected_residual)
    assert len(checked) == 2
    with pytest.raises(ValueError, match="eps must be >= 0"):  # eps is part of the key
        rms_norm(x, weight, -1.0)
    with pytest.raises(ValueError, match="residual must have shape"):
        fused_add_rms_norm(x, residual[:1], weight, 1e-6)
    assert rms_norm(x[:0], weight, 1e-6).shape == (0, 3, 48)


def _rope_args(seed=0, tokens=3, heads=4, kv_heads=2, head_size=32):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=generator)
    q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    caches = [torch.zeros(4, 8, kv_heads, head_size) for _ in range(2)]
    return [q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size),
            v.view(tokens, kv_heads, head_size), torch.randn(64, head_size, generator=generator),
            torch.tensor([5, 0, 63][:tokens]), *caches, torch.tensor([3, -1, 17][:tokens]),
            torch.randn(head_size, generator=generator), torch.randn(head_size, generator=generator)]


def test_qk_norm_rope_checks_once_even_after_the_engine_planned_the_geometry(monkeypatch):
    checked = _counting(monkeypatch, qk_rope_cache, "_check")
    monkeypatch.setattr(qk_rope_cache, "_PLANS", {})
    engine = _rope_args()
    qk_rope_cache.launch_qk_norm_rope_cache(*engine, 1e-6, True)  # the engine's launch: no checks
    assert not checked
    for seed in range(2):
        args, expected = _rope_args(seed), _rope_args(seed)
        reference_layers.qk_norm_rope_and_cache(*expected, 1e-6, True)
        qk_norm_rope_and_cache(*args, 1e-6)
        for got, want in zip(args, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(checked) == 1
    args = _rope_args()
    with pytest.raises(ValueError, match="slot_mapping"):  # a new geometry (int32 slots): checked
        qk_norm_rope_and_cache(*args[:7], args[7].int(), *args[8:], 1e-6)


@pytest.fixture
def recorded_gemm(fake_driver, monkeypatch):  # noqa: F811 (the imported fixture)
    """The skinny GEMM's launcher with its fast path on over a recording stand-in of the kernel, PDL on."""
    launcher = _launch.CachedLauncher(JITFunction(skinny_gemm._skinny_gemm_kernel.fn))
    if not launcher._enabled:
        pytest.skip("this Triton release takes its own launch path")
    launcher.kernel = recording = _Recording()
    monkeypatch.setattr(skinny_gemm, "GEMM_LAUNCHER", launcher)
    monkeypatch.setattr(skinny_gemm, "_CALLS", {})
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    skinny_gemm_plans.reset()
    yield launcher, recording
    skinny_gemm_plans.reset()


def test_repeated_linear_launches_the_compiled_kernel_with_its_pdl_option(recorded_gemm):
    launcher, recording = recorded_gemm
    w = torch.randn(40, 32)
    for _ in range(3):
        linear(torch.randn(1, 32), w)
    [(args, meta)] = recording.calls  # Triton's path once, then the compiled kernel
    assert meta["launch_pdl"] is True and meta["PDL"] is True
    constexprs = [value for name, value in meta.items() if name in launcher._constexpr_names]
    assert len(recording.compiled.runs) == 2
    for _, run_args in recording.compiled.runs:
        assert list(run_args[len(args):]) == constexprs  # in the kernel's signature order
