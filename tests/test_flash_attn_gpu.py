"""GPU tests of the prefill attention kernels at real sizes, bf16 and fp16 (FlashAttention's acceptance rule).

The sweeps run the single default config (``FLASHSERVE_AUTOTUNE=0``) so that the suite does not pay an
autotuning compile per variant; ``test_autotuned_path`` checks the autotuned kernel at a benchmark shape.
"""
import pytest
import torch

from flashserve.kernels import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
from flashserve.kernels.reference import attention_batch
from test_flash_attn import assert_fa_close, check_dense, check_varlen, cu_seqlens, make_paged

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _default_config(monkeypatch):
    monkeypatch.setenv("FLASHSERVE_AUTOTUNE", "0")
    torch.manual_seed(0)


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [59, 64, 128, 256])
@pytest.mark.parametrize("seqlens", [(1, 239), (113, 203), (1024, 1023), (2048, 2048)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense(dtype, head_dim, seqlens, causal):
    seqlen_q, seqlen_k = seqlens
    nheads, nheads_k = {59: (8, 8), 64: (8, 2), 128: (8, 2), 256: (4, 1)}[head_dim]
    q = _randn(2, seqlen_q, nheads, head_dim, dtype=dtype)
    k = _randn(2, seqlen_k, nheads_k, head_dim, dtype=dtype)
    v = _randn(2, seqlen_k, nheads_k, head_dim, dtype=dtype)
    check_dense(q, k, v, causal=causal)


@pytest.mark.parametrize("options", [dict(window_size=(256, 0)), dict(window_size=(100, 37)),
                                     dict(softcap=20.0, causal=True), dict(alibi_slopes="h", causal=True),
                                     dict(alibi_slopes="bh"), dict(softmax_scale=0.05, causal=True)])
def test_dense_options(options):
    options = dict(options)
    if options.get("alibi_slopes") == "h":
        options["alibi_slopes"] = torch.rand(8, device="cuda")
    elif options.get("alibi_slopes") == "bh":
        options["alibi_slopes"] = torch.rand(2, 8, device="cuda")
    q = _randn(2, 777, 8, 128, dtype=torch.bfloat16)
    k = _randn(2, 1000, 2, 128, dtype=torch.bfloat16)
    v = _randn(2, 1000, 2, 128, dtype=torch.bfloat16)
    check_dense(q, k, v, **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkvpacked_strided(dtype):
    qkv = _randn(2, 1500, 3, 8, 128, dtype=dtype)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    out_ref, _ = attention_batch(q, k, v, causal=True)
    out_pt, _ = attention_batch(q, k, v, causal=True, upcast=False)
    assert_fa_close(out, out_ref, out_pt)
    assert torch.equal(out, flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(causal):
    lengths_q, lengths_k = [300, 0, 1, 2048, 77], [300, 64, 1000, 2048, 0]
    q = _randn(sum(lengths_q), 16, 128, dtype=torch.bfloat16)
    k = _randn(sum(lengths_k), 4, 128, dtype=torch.bfloat16)
    v = _randn(sum(lengths_k), 4, 128, dtype=torch.bfloat16)
    check_varlen(q, k, v, cu_seqlens(lengths_q, "cuda"), cu_seqlens(lengths_k, "cuda"), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("kv_lengths", ["cu_seqlens_k", "seqused_k"])
def test_paged_strided_cache(dtype, page_size, kv_lengths):
    lengths_q, lengths_k = [512, 1, 0, 1500], [2000, 700, 33, 1500]
    k_cache, v_cache, block_table = make_paged(lengths_k, page_size, 4, 128, dtype, device="cuda")
    q = _randn(sum(lengths_q), 16, 128, dtype=dtype)
    if kv_lengths == "seqused_k":
        cu_seqlens_k, seqused_k = None, torch.tensor(lengths_k, dtype=torch.int32, device="cuda")
    else:
        cu_seqlens_k, seqused_k = cu_seqlens(lengths_k, "cuda"), None
    out = torch.full_like(q, float("nan"))
    check_varlen(q, k_cache, v_cache, cu_seqlens(lengths_q, "cuda"), cu_seqlens_k, factor=3.0, causal=True,
                 block_table=block_table, seqused_k=seqused_k, out=out)
    assert not torch.isnan(out).any()


def test_paged_matches_contiguous_cache_bitwise():
    """A strided cache (buf[:, 0]) and a contiguous copy of it give bit-identical results."""
    lengths_q, lengths_k = [1000, 3], [4000, 2500]
    k_cache, v_cache, block_table = make_paged(lengths_k, 16, 8, 128, torch.bfloat16, device="cuda")
    q = _randn(sum(lengths_q), 32, 128, dtype=torch.bfloat16)
    args = (cu_seqlens(lengths_q, "cuda"), None, 1000, 4000)
    used = torch.tensor(lengths_k, dtype=torch.int32, device="cuda")
    strided = flash_attn_varlen_func(q, k_cache, v_cache, *args, causal=True, block_table=block_table,
                                     seqused_k=used)
    contiguous = flash_attn_varlen_func(q, k_cache.contiguous(), v_cache.contiguous(), *args, causal=True,
                                        block_table=block_table, seqused_k=used)
    assert torch.equal(strided, contiguous)


def test_repeated_runs_bit_identical():
    q = _randn(2, 2048, 32, 128, dtype=torch.bfloat16)
    k = _randn(2, 2048, 8, 128, dtype=torch.bfloat16)
    first = flash_attn_func(q, k, k, causal=True)
    assert all(torch.equal(first, flash_attn_func(q, k, k, causal=True)) for _ in range(3))


def test_autotuned_path(monkeypatch):
    monkeypatch.setenv("FLASHSERVE_AUTOTUNE", "1")
    q = _randn(2, 2048, 32, 128, dtype=torch.bfloat16)
    k = _randn(2, 2048, 8, 128, dtype=torch.bfloat16)
    v = _randn(2, 2048, 8, 128, dtype=torch.bfloat16)
    check_dense(q, k, v, causal=True)
    lengths_q, lengths_k = [2048, 1], [4096, 4096]
    k_cache, v_cache, block_table = make_paged(lengths_k, 16, 8, 128, torch.bfloat16, device="cuda")
    q = _randn(sum(lengths_q), 32, 128, dtype=torch.bfloat16)
    check_varlen(q, k_cache, v_cache, cu_seqlens(lengths_q, "cuda"), None, factor=3.0, causal=True,
                 block_table=block_table, seqused_k=torch.tensor(lengths_k, dtype=torch.int32, device="cuda"))


def test_fp32_without_tf32():
    """fp32 inputs are computed in full fp32 (no TF32): within 1e-5 of the fp32 reference."""
    q = _randn(1, 300, 4, 64, dtype=torch.float32)
    k = _randn(1, 400, 4, 64, dtype=torch.float32)
    out = flash_attn_func(q, k, k, causal=True)
    out_ref, _ = attention_batch(q, k, k, causal=True)
    assert (out - out_ref).abs().max().item() < 1e-4
