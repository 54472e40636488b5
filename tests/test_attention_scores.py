"""attention_scores_from_lse against the softmax of the full score matrix in fp32 (FlashAttention's rule, 2x).

The LSE comes from our own forward call with the same options; the oracle ignores it (softmax of the whole
matrix, fp32), the baseline does the same in the input precision. ``check_dense`` / ``check_varlen`` are shared
with tests/test_attention_scores_gpu.py.
"""
import pytest
import torch

from flashserve.kernels import attention_scores_from_lse, flash_attn_func, flash_attn_varlen_func
from flashserve.kernels.reference import attention_scores_batch, attention_scores_varlen
from test_flash_attn import cu_seqlens, make_paged


def assert_scores_close(scores, oracle, baseline):
    """2x the input-precision baseline's error, plus 1e-5 relative to the largest score (sums of many fp32 terms)."""
    assert scores.dtype == torch.float32 and scores.shape == oracle.shape
    assert torch.isfinite(scores).all()
    err = (scores - oracle).abs().max().item() if scores.numel() else 0.0
    base = (baseline.float() - oracle).abs().max().item() if scores.numel() else 0.0
    scale = max(1.0, oracle.abs().max().item()) if scores.numel() else 1.0
    assert err <= 2 * base + 1e-5 * scale, f"max error {err} > 2 * {base} + 1e-5 * {scale}"


def check_dense(q, k, reduce, **options):
    v = torch.randn_like(k)
    _, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **options)
    scores = attention_scores_from_lse(q, k, lse, reduce=reduce, **options)
    oracle = attention_scores_batch(q, k, None, reduce=reduce, upcast=True, **options)
    baseline = attention_scores_batch(q, k, None, reduce=reduce, upcast=False, **options)
    assert_scores_close(scores, oracle, baseline)
    if reduce == "sum":  # every query row that sees a key spreads a mass of exactly 1 over the keys
        rows_with_keys = torch.isfinite(lse).sum(dim=(1, 2)).float()
        assert torch.allclose(scores.sum(dim=(1, 2)), rows_with_keys, rtol=1e-3)
    return scores


def check_varlen(q, k, cu_q, cu_k, max_seqlen_k, reduce, block_table=None, seqused_k=None, **options):
    v = torch.randn_like(k)
    max_seqlen_q = int(cu_q.diff().max())
    _, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, block_table=block_table,
                                    seqused_k=seqused_k, return_softmax_lse=True, **options)
    args = (cu_q, cu_k, max_seqlen_k)
    scores = attention_scores_from_lse(q, k, lse, *args, block_table=block_table, seqused_k=seqused_k,
                                       reduce=reduce, **options)
    refs = [attention_scores_varlen(q, k, None, *args, block_table=block_table, seqused_k=seqused_k,
                                    reduce=reduce, upcast=upcast, **options) for upcast in (True, False)]
    assert_scores_close(scores, *refs)
    return scores


DENSE_CASES = {
    "causal-gqa": (dict(causal=True), (37, 61), (4, 2)),
    "noncausal-mqa": (dict(), (23, 45), (3, 1)),
    "causal-more-queries-than-keys": (dict(causal=True), (50, 20), (2, 2)),
    "window": (dict(window_size=(11, 3)), (40, 40), (4, 2)),
    "softcap-scale": (dict(softcap=5.0, softmax_scale=0.3, causal=True), (33, 70), (2, 1)),
    "alibi": (dict(alibi_slopes="bh", causal=True), (20, 41), (4, 2)),
}


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("name", list(DENSE_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dense(name, reduce, dtype):
    options, (seqlen_q, seqlen_k), (heads, heads_k) = DENSE_CASES[name]
    options = dict(options)
    gen = torch.Generator().manual_seed(0)
    if options.get("alibi_slopes") == "bh":
        options["alibi_slopes"] = torch.rand(2, heads, generator=gen) * 0.3
    head_dim = 40 if dtype == torch.float16 else 32
    q = torch.randn(2, seqlen_q, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(2, seqlen_k, heads_k, head_dim, generator=gen).to(dtype)
    check_dense(q, k, reduce, **options)


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packed(reduce, causal):
    gen = torch.Generator().manual_seed(1)
    lengths_q, lengths_k = [5, 0, 17, 9], [30, 4, 17, 40]
    q = torch.randn(sum(lengths_q), 4, 32, generator=gen).half()
    k = torch.randn(sum(lengths_k), 2, 32, generator=gen).half()
    check_varlen(q, k, cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_k), reduce, causal=causal)


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("page_size", [5, 16])
def test_paged(reduce, page_size):
    lengths_q, lengths_k = [3, 1, 20], [45, 1, 33]
    k_cache, _, block_table = make_paged(lengths_k, page_size, 2, 32, torch.float16)
    q = torch.randn(sum(lengths_q), 4, 32).half()
    seqused_k = torch.tensor(lengths_k, dtype=torch.int32)
    scores = check_varlen(q, k_cache, cu_seqlens(lengths_q), None, 48, reduce, block_table=block_table,
                          seqused_k=seqused_k, causal=True, window_size=(25, 0))
    assert scores.shape == (3, 2, 48) and (scores[1, :, 1:] == 0).all()


def test_backends_agree(monkeypatch):
    """The reference path (CPU without the interpreter) computes the same scores from the same LSE."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 9, 4, 16, generator=gen), torch.randn(1, 13, 2, 16, generator=gen)
    _, lse, _ = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    triton_scores = attention_scores_from_lse(q, k, lse, causal=True, reduce="max")
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    assert torch.allclose(attention_scores_from_lse(q, k, lse, causal=True, reduce="max"), triton_scores,
                          atol=1e-5)


@pytest.mark.parametrize("change, name", [
    (dict(reduce="mean"), "reduce"),
    (dict(lse=torch.zeros(1, 4, 9, dtype=torch.float16)), "lse"),
    (dict(lse=torch.zeros(1, 4, 8)), "lse"),
    (dict(k=torch.zeros(2, 13, 2, 16)), "k"),
    (dict(k=torch.zeros(1, 13, 3, 16)), "head count"),
    (dict(window_size=(-3, 0)), "window_size"),
    (dict(alibi_slopes=torch.zeros(3)), "alibi_slopes"),
])
def test_invalid_arguments(change, name):
    args = dict(q=torch.zeros(1, 9, 4, 16), k=torch.zeros(1, 13, 2, 16), lse=torch.zeros(1, 4, 9))
    args.update(change)
    with pytest.raises(ValueError, match=name):
        attention_scores_from_lse(**args)


def test_varlen_needs_its_index_tensors():
    q, k, lse = torch.zeros(9, 4, 16), torch.zeros(13, 2, 16), torch.zeros(4, 9)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention_scores_from_lse(q, k, lse)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        attention_scores_from_lse(q, k, lse, cu_seqlens([9]), cu_seqlens([14]), 14)
