"""CPU tests of the prefill attention API: the Triton kernel under TRITON_INTERPRET=1 against the PyTorch reference.

Acceptance rule (FlashAttention's): ``max|out - out_ref| <= 2 * max|out_pt - out_ref| + 1e-5`` where out_ref is
the fp32 reference and out_pt the same math in the input precision. The interpreter gets bf16 wrong, so fp16 and
fp32 only. Shapes are tiny because the interpreter is slow; the GPU file runs the same sweeps at real sizes.
"""
import math

import pytest
import torch

from flashserve.kernels import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.reference import attention_batch, attention_varlen

DTYPES = [torch.float16, torch.float32]
HEADS = [(4, 4), (4, 2), (6, 1)]  # MHA, GQA, MQA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_fa_close(out, out_ref, out_pt, factor=2.0):
    """FlashAttention's acceptance rule; -inf entries (LSE of rows without keys) must match exactly."""
    out, out_ref, out_pt = out.float(), out_ref.float(), out_pt.float()
    inf_ref = torch.isinf(out_ref)
    assert torch.equal(torch.isinf(out), inf_ref), "infinite entries differ from the reference"
    assert not torch.isnan(out).any(), "NaN in the output"
    finite = ~inf_ref
    err = (out - out_ref)[finite].abs().max().item() if finite.any() else 0.0
    base = (out_pt - out_ref)[finite].abs().max().item() if finite.any() else 0.0
    assert err <= factor * base + 1e-5, f"max error {err} > {factor} * {base} + 1e-5"


def check_dense(q, k, v, **options):
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, **options)
    assert probs is None and lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    out_ref, lse_ref = attention_batch(q, k, v, upcast=True, **options)
    out_pt, lse_pt = attention_batch(q, k, v, upcast=False, **options)
    assert_fa_close(out, out_ref, out_pt)
    assert_fa_close(lse, lse_ref, lse_pt)
    return out


def test_interpreter_runs_triton():
    assert use_triton(torch.empty(1)), "run this suite with TRITON_INTERPRET=1"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 40, 59, 64, 111, 128])
@pytest.mark.parametrize("seqlens", [(1, 37), (23, 61), (61, 23), (80, 113)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense(dtype, head_dim, seqlens, causal):
    seqlen_q, seqlen_k = seqlens
    nheads, nheads_k = HEADS[head_dim % 3]
    q = torch.randn(1, seqlen_q, nheads, head_dim, dtype=dtype)
    k = torch.randn(1, seqlen_k, nheads_k, head_dim, dtype=dtype)
    v = torch.randn(1, seqlen_k, nheads_k, head_dim, dtype=dtype)
    check_dense(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [160, 256])
def test_dense_large_head_dim(head_dim):
    q = torch.randn(1, 9, 2, head_dim, dtype=torch.float16)
    k = torch.randn(1, 21, 1, head_dim, dtype=torch.float16)
    v = torch.randn(1, 21, 1, head_dim, dtype=torch.float16)
    check_dense(q, k, v, causal=True)


OPTIONS = {
    "window": dict(window_size=(7, 3)),
    "window_left": dict(window_size=(5, -1)),
    "window_right": dict(window_size=(-1, 2)),
    "window_causal": dict(window_size=(6, -1), causal=True),
    "softcap": dict(softcap=1.5),
    "softcap_causal": dict(softcap=2.0, causal=True),
    "alibi_h": dict(alibi_slopes="h"),
    "alibi_bh": dict(alibi_slopes="bh", causal=True),
    "scale": dict(softmax_scale=0.3),
    "everything": dict(window_size=(9, 0), softcap=3.0, alibi_slopes="bh", softmax_scale=0.2),
}


def _resolve(options, batch, nheads):
    options = dict(options)
    if options.get("alibi_slopes") == "h":
        options["alibi_slopes"] = torch.rand(nheads) * 0.5
    elif options.get("alibi_slopes") == "bh":
        options["alibi_slopes"] = torch.rand(batch, nheads) * 0.5
    return options


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("seqlens", [(19, 45), (45, 19), (70, 70)])
def test_dense_options(dtype, name, seqlens):
    seqlen_q, seqlen_k = seqlens
    q = torch.randn(2, seqlen_q, 4, 32, dtype=dtype)
    k = torch.randn(2, seqlen_k, 2, 32, dtype=dtype)
    v = torch.randn(2, seqlen_k, 2, 32, dtype=dtype)
    check_dense(q, k, v, **_resolve(OPTIONS[name], 2, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_strided_views(dtype, causal):
    """q, k, v as slices of wider tensors (odd sequence and head strides) give the same result as copies."""
    wide_q = torch.randn(2, 33, 4, 48 + 5, dtype=dtype)
    kv = torch.randn(2, 41, 2, 2, 48, dtype=dtype)
    q, k, v = wide_q[..., 5:], kv[:, :, :, 0], kv[:, :, :, 1]
    assert not q.is_contiguous() and not k.is_contiguous()
    out = check_dense(q, k, v, causal=causal)
    assert torch.equal(out, flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked(dtype, causal):
    qkv = torch.randn(2, 37, 3, 4, 64, dtype=dtype)
    out, lse, _ = flash_attn_qkvpacked_func(qkv, causal=causal, return_attn_probs=True)
    q, k, v = qkv.unbind(2)
    out_ref, lse_ref = attention_batch(q, k, v, causal=causal)
    out_pt, _ = attention_batch(q, k, v, causal=causal, upcast=False)
    assert_fa_close(out, out_ref, out_pt)
    assert torch.equal(out, flash_attn_func(q, k, v, causal=causal))


def cu_seqlens(lengths, device="cpu"):
    """(B + 1,) int32 cumulative lengths."""
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, factor=2.0, **options):
    seqlens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    if options.get("seqused_k") is not None:
        max_seqlen_k = max(options["seqused_k"].tolist())
    else:
        max_seqlen_k = max((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist())
    out, lse = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max(seqlens_q), max_seqlen_k,
                                      return_softmax_lse=True, **options)
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    ref_options = {name: value for name, value in options.items() if name != "out"}
    out_ref, lse_ref = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, upcast=True, **ref_options)
    out_pt, lse_pt = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, upcast=False, **ref_options)
    assert_fa_close(out, out_ref, out_pt, factor)
    assert_fa_close(lse, lse_ref, lse_pt, factor)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["plain", "causal", "window", "alibi_bh", "softcap"])
def test_varlen(dtype, name):
    """Mixed lengths incl. empty query and empty key sequences, and sq > sk rows that see nothing."""
    lengths_q, lengths_k = [5, 0, 17, 1, 40, 9], [9, 3, 0, 30, 66, 4]
    nheads, nheads_k, head_dim = 4, 2, 40
    q = torch.randn(sum(lengths_q), nheads, head_dim, dtype=dtype)
    k = torch.randn(sum(lengths_k), nheads_k, head_dim, dtype=dtype)
    v = torch.randn(sum(lengths_k), nheads_k, head_dim, dtype=dtype)
    options = _resolve({"plain": {}, "causal": dict(causal=True), **OPTIONS}[name], len(lengths_q), nheads)
    check_varlen(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_seqused_k_unpaged(dtype):
    lengths_q, lengths_k, used_k = [3, 8], [20, 12], [15, 12]
    q = torch.randn(sum(lengths_q), 2, 64, dtype=dtype)
    k = torch.randn(sum(lengths_k), 2, 64, dtype=dtype)
    v = torch.randn(sum(lengths_k), 2, 64, dtype=dtype)
    check_varlen(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), causal=True,
                 seqused_k=torch.tensor(used_k, dtype=torch.int32))


def make_paged(lengths_k, page_size, nheads_k, head_dim, dtype, spare_blocks=3, device="cpu"):
    """Strided paged caches k = buf[:, 0], v = buf[:, 1] of one (num_blocks, 2, page, Hk, D) buffer, filled with
    each sequence's tokens through a random (permuted) block table; returns (k_cache, v_cache, block_table)."""
    pages = [-(-length // page_size) for length in lengths_k]
    max_pages = max(pages + [1]) + 1
    num_blocks = sum(pages) + spare_blocks
    buf = torch.randn(num_blocks, 2, page_size, nheads_k, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = buf[:, 0], buf[:, 1]
    ids = torch.randperm(num_blocks).to(torch.int32)
    block_table = torch.full((len(lengths_k), max_pages), num_blocks - 1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = ids[start:start + n]
        start += n
    return k_cache, v_cache, block_table.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("kv_lengths", ["cu_seqlens_k", "seqused_k"])
@pytest.mark.parametrize("causal", [False, True])
def test_paged(dtype, page_size, kv_lengths, causal):
    lengths_q, lengths_k = [6, 0, 1, 33], [6, 5, 50, 70]
    nheads, nheads_k, head_dim = 4, 2, 59
    k_cache, v_cache, block_table = make_paged(lengths_k, page_size, nheads_k, head_dim, dtype)
    assert not k_cache.is_contiguous()
    q = torch.randn(sum(lengths_q), nheads, head_dim, dtype=dtype)
    if kv_lengths == "seqused_k":
        cu_seqlens_k, seqused_k = None, torch.tensor(lengths_k, dtype=torch.int32)
    else:
        cu_seqlens_k, seqused_k = cu_seqlens(lengths_k), None
    check_varlen(q, k_cache, v_cache, cu_seqlens(lengths_q), cu_seqlens_k, factor=3.0, causal=causal,
                 block_table=block_table, seqused_k=seqused_k)


def test_paged_reference_matches_unpaged():
    """The oracle's gather: a paged cache holds exactly the tokens of the packed sequences."""
    lengths_q, lengths_k = [4, 7], [21, 13]
    k_cache, v_cache, block_table = make_paged(lengths_k, 4, 2, 16, torch.float32)
    k = torch.cat([k_cache[block_table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lengths_k)])
    v = torch.cat([v_cache[block_table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lengths_k)])
    q = torch.randn(sum(lengths_q), 2, 16)
    out_paged, lse_paged = attention_varlen(q, k_cache, v_cache, cu_seqlens(lengths_q), cu_seqlens(lengths_k),
                                            causal=True, block_table=block_table)
    out, lse = attention_varlen(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), causal=True)
    assert torch.equal(out_paged, out) and torch.equal(lse_paged, lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_prefilled_with_nan(dtype):
    lengths_q, lengths_k = [3, 0, 12], [3, 4, 40]
    k_cache, v_cache, block_table = make_paged(lengths_k, 16, 1, 32, dtype)
    q = torch.randn(sum(lengths_q), 4, 32, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    result = check_varlen(q, k_cache, v_cache, cu_seqlens(lengths_q), None, causal=True, block_table=block_table,
                          seqused_k=torch.tensor(lengths_k, dtype=torch.int32), out=out)
    assert result.data_ptr() == out.data_ptr() and not torch.isnan(out).any()


def test_rows_without_keys_are_zero():
    q = torch.randn(1, 5, 2, 16, dtype=torch.float16)
    k = torch.randn(1, 2, 2, 16, dtype=torch.float16)
    out, lse, _ = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isneginf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()


def test_repeated_runs_bit_identical():
    lengths_q, lengths_k = [17, 2], [40, 33]
    k_cache, v_cache, block_table = make_paged(lengths_k, 16, 2, 64, torch.float16)
    q = torch.randn(sum(lengths_q), 4, 64, dtype=torch.float16)
    args = (q, k_cache, v_cache, cu_seqlens(lengths_q), cu_seqlens(lengths_k), 17, 40)
    first = flash_attn_varlen_func(*args, causal=True, block_table=block_table, return_softmax_lse=True)
    second = flash_attn_varlen_func(*args, causal=True, block_table=block_table, return_softmax_lse=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_reference_backend(monkeypatch):
    """FLASHSERVE_ATTENTION_BACKEND=torch runs the reference, with the same return conventions."""
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    q = torch.randn(2, 9, 4, 32)
    k = torch.randn(2, 12, 2, 32)
    out, lse, none = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    out_ref, lse_ref = attention_batch(q, k, k, causal=True)
    assert none is None and torch.equal(out, out_ref) and torch.equal(lse, lse_ref)
    qv, kv = q.flatten(0, 1), k.flatten(0, 1)
    cu_q, cu_k = cu_seqlens([9, 9]), cu_seqlens([12, 12])
    out_v = torch.full_like(qv, float("nan"))
    result, lse_v = flash_attn_varlen_func(qv, kv, kv, cu_q, cu_k, 9, 12, causal=True, out=out_v,
                                           return_softmax_lse=True)
    assert result is out_v and torch.equal(out_v.view_as(q), out_ref)
    assert torch.equal(lse_v, lse_ref.transpose(0, 1).flatten(1))


def _validation_cases():
    q, k = torch.randn(1, 4, 4, 16, dtype=torch.float16), torch.randn(1, 6, 2, 16, dtype=torch.float16)
    qv, kv = q[0], k[0]
    k3 = torch.randn(1, 6, 3, 16, dtype=torch.float16)
    cu_q, cu_k = cu_seqlens([4]), cu_seqlens([6])
    k_cache, v_cache, table = make_paged([6], 4, 2, 16, torch.float16)
    used = torch.tensor([6], dtype=torch.int32)
    varlen = flash_attn_varlen_func
    return {
        "q rank": ("q", lambda: flash_attn_func(qv, k, k)),
        "q dtype": ("q", lambda: flash_attn_func(q.to(torch.int32), k, k)),
        "k dtype": ("k", lambda: flash_attn_func(q, k.float(), k.float())),
        "k device": ("k", lambda: flash_attn_func(q, k.to("meta"), k.to("meta"))),
        "k not a tensor": ("k", lambda: flash_attn_func(q, None, k)),
        "head count": ("head count", lambda: flash_attn_func(q, k3, k3)),
        "k head dim": ("k head dim", lambda: flash_attn_func(q, k[..., :8], k[..., :8])),
        "v shape": ("v", lambda: flash_attn_func(q, k, k[:, :5])),
        "head dim too large": ("q head dim", lambda: flash_attn_func(torch.randn(1, 2, 1, 264), torch.randn(
            1, 2, 1, 264), torch.randn(1, 2, 1, 264))),
        "last dim strided": ("q", lambda: flash_attn_func(q.transpose(1, 3), k, k)),
        "k batch": ("k", lambda: flash_attn_func(q, torch.cat([k, k]), torch.cat([k, k]))),
        "dropout": ("dropout_p", lambda: flash_attn_func(q, k, k, dropout_p=0.1)),
        "window": ("window_size", lambda: flash_attn_func(q, k, k, window_size=(-2, 0))),
        "window type": ("window_size", lambda: flash_attn_func(q, k, k, window_size=3)),
        "softcap": ("softcap", lambda: flash_attn_func(q, k, k, softcap=-1.0)),
        "alibi shape": ("alibi_slopes", lambda: flash_attn_func(q, k, k, alibi_slopes=torch.rand(3))),
        "alibi dtype": ("alibi_slopes", lambda: flash_attn_func(q, k, k, alibi_slopes=torch.rand(4).half())),
        "qkv shape": ("qkv", lambda: flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 4, 16))),
        "cu_seqlens_q dtype": ("cu_seqlens_q", lambda: varlen(qv, kv, kv, cu_q.long(), cu_k, 4, 6)),
        "cu_seqlens_k dtype": ("cu_seqlens_k", lambda: varlen(qv, kv, kv, cu_q, cu_k.long(), 4, 6)),
        "cu_seqlens_k shape": ("cu_seqlens_k", lambda: varlen(qv, kv, kv, cu_q, cu_seqlens([3, 3]), 4, 6)),
        "cu_seqlens_k missing": ("cu_seqlens_k", lambda: varlen(qv, kv, kv, cu_q, None, 4, 6)),
        "max_seqlen_q": ("max_seqlen_q", lambda: varlen(qv, kv, kv, cu_q, cu_k, 4.0, 6)),
        "max_seqlen_k": ("max_seqlen_k", lambda: varlen(qv, kv, kv, cu_q, cu_k, 4, -1)),
        "varlen k rank": ("k", lambda: varlen(qv, k, k, cu_q, cu_k, 4, 6)),
        "block_table dtype": ("block_table", lambda: varlen(qv, k_cache, v_cache, cu_q, None, 4, 6,
                                                            block_table=table.long(), seqused_k=used)),
        "block_table too short": ("block_table", lambda: varlen(qv, k_cache, v_cache, cu_q, None, 4, 9,
                                                                block_table=table[:, :2], seqused_k=used)),
        "block_table rows": ("block_table", lambda: varlen(qv, k_cache, v_cache, cu_q, None, 4, 6,
                                                           block_table=torch.cat([table, table]), seqused_k=used)),
        "paged k rank": ("k", lambda: varlen(qv, kv, kv, cu_q, None, 4, 6, block_table=table, seqused_k=used)),
        "seqused_k dtype": ("seqused_k", lambda: varlen(qv, k_cache, v_cache, cu_q, None, 4, 6,
                                                        block_table=table, seqused_k=used.long())),
        "out shape": ("out", lambda: varlen(qv, kv, kv, cu_q, cu_k, 4, 6, out=torch.empty(3, 4, 16).half())),
        "out dtype": ("out", lambda: varlen(qv, kv, kv, cu_q, cu_k, 4, 6, out=torch.empty(4, 4, 16))),
        "varlen dropout": ("dropout_p", lambda: varlen(qv, kv, kv, cu_q, cu_k, 4, 6, dropout_p=0.5)),
        "dense k rank 3": ("k", lambda: flash_attn_func(q, kv, kv)),
        "dense k rank 5": ("k", lambda: flash_attn_func(q, k[None], k[None])),
        "window not integral": ("window_size", lambda: flash_attn_func(q, k, k, window_size=(1.5, 0))),
        "max_seqlen_k tensor": ("max_seqlen_k", lambda: varlen(qv, kv, kv, cu_q, cu_k, 4, torch.tensor(6))),
        "block_table strided": ("block_table", lambda: varlen(qv, k_cache, v_cache, cu_q, None, 4, 6,
                                                              block_table=table.repeat_interleave(2, 1)[:, ::2],
                                                              seqused_k=used)),
        "cu_seqlens_q strided": ("cu_seqlens_q", lambda: varlen(qv, kv, kv, cu_q.repeat_interleave(2)[::2], cu_k,
                                                                4, 6)),
        "seqused_k strided": ("seqused_k", lambda: varlen(qv, k_cache, v_cache, cu_seqlens([2, 2]), None, 2, 6,
                                                          block_table=torch.cat([table, table]),
                                                          seqused_k=torch.tensor([6, 0, 5, 0],
                                                                                 dtype=torch.int32)[::2])),
    }


@pytest.mark.parametrize("case", list(_validation_cases()))
def test_validation_errors(case):
    name, call = _validation_cases()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_default_scale_is_inverse_sqrt_head_dim():
    q = torch.randn(1, 6, 2, 24, dtype=torch.float16)
    k = torch.randn(1, 6, 2, 24, dtype=torch.float16)
    assert torch.equal(flash_attn_func(q, k, k), flash_attn_func(q, k, k, softmax_scale=1 / math.sqrt(24)))


def test_max_seqlen_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    q, k = torch.randn(5, 2, 16), torch.randn(7, 1, 16)
    cu_q, cu_k = cu_seqlens([5]), cu_seqlens([7])
    out = flash_attn_varlen_func(q, k, k, cu_q, cu_k, np.int64(5), np.int32(7), causal=True)
    assert torch.equal(out, flash_attn_varlen_func(q, k, k, cu_q, cu_k, 5, 7, causal=True))
