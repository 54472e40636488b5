"""GPU tests of the TMA prefill kernel (Hopper and newer), bf16/fp16 at real sizes, against the fp32 reference
(FlashAttention's acceptance rule) and against the portable kernel. The default config (``FLASHSERVE_AUTOTUNE=0``)
except ``test_autotuned``, which tunes the candidate set once at a benchmark shape."""
import pytest
import torch

from flashserve.kernels import flash_attn_func, prefill_tma
from test_flash_attn import check_dense, check_varlen, cu_seqlens
from test_prefill_tma import force_tma_kernel

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def tma_calls(monkeypatch):
    """The TMA kernel forced on, launches counted; skipped before Hopper or without tensor descriptors."""
    if not prefill_tma.HAS_TENSOR_DESCRIPTORS or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs Hopper or newer and a Triton with tensor descriptors")
    monkeypatch.setenv("FLASHSERVE_AUTOTUNE", "0")
    return force_tma_kernel(monkeypatch)


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 8, 2, 128), (2, 777, 1000, 8, 2, 128), (2, 1000, 777, 8, 8, 128),
                                   (2, 1100, 1100, 16, 8, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense(tma_calls, monkeypatch, dtype, shape, causal):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim = shape
    q = _randn(batch, seqlen_q, nheads, head_dim, dtype=dtype)
    k = _randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype)
    v = _randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype)
    out = check_dense(q, k, v, causal=causal)
    assert len(tma_calls) == 1
    if dtype == torch.bfloat16:  # and the portable kernel agrees (bf16 only: fewer compiles)
        monkeypatch.setenv("FLASHSERVE_PREFILL_KERNEL", "portable")
        portable = flash_attn_func(q, k, v, causal=causal)
        assert len(tma_calls) == 1 and (out.float() - portable.float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(tma_calls, causal):
    lengths_q, lengths_k = [300, 0, 1, 2048, 77], [300, 64, 1000, 2048, 0]
    q = _randn(sum(lengths_q), 16, 128)
    k = _randn(sum(lengths_k), 4, 128)
    v = _randn(sum(lengths_k), 4, 128)
    out = torch.full_like(q, float("nan"))
    check_varlen(q, k, v, cu_seqlens(lengths_q, "cuda"), cu_seqlens(lengths_k, "cuda"), causal=causal, out=out)
    assert len(tma_calls) == 1 and not torch.isnan(out).any()


def test_persistent_grid(tma_calls, monkeypatch):
    q = _randn(16, 512, 32, 128)
    k = _randn(16, 512, 8, 128)
    expected = check_dense(q, k, k, causal=True)
    default = prefill_tma.default_tma_config
    monkeypatch.setattr(prefill_tma, "default_tma_config", lambda *a: {**default(*a), "PERSISTENT": 1})
    assert torch.equal(flash_attn_func(q, k, k, causal=True), expected)
    assert len(tma_calls) == 2


def test_auto_choice_on_hopper(tma_calls, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_PREFILL_KERNEL", "auto")
    q = _randn(1, 256, 8, 128)
    flash_attn_func(q, q[:, :, :2], q[:, :, :2], causal=True)
    assert len(tma_calls) == (1 if torch.cuda.get_device_capability()[0] == 9 else 0)


def test_autotuned(tma_calls, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHSERVE_AUTOTUNE", "1")
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path))
    q = _randn(2, 2048, 32, 128)
    k = _randn(2, 2048, 8, 128)
    v = _randn(2, 2048, 8, 128)
    check_dense(q, k, v, causal=True)
    assert len(tma_calls) == 1
