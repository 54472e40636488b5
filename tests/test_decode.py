"""flash_attn_with_kvcache against the fp32 reference, with FlashAttention's acceptance rule (3x for kv-cache).

Run the kernels on CPU with TRITON_INTERPRET=1 (fp16/fp32 only: the interpreter's bf16 arithmetic is wrong).
``run_case`` is shared with tests/test_decode_gpu.py.
"""
import math
from dataclasses import dataclass

import pytest
import torch

from flashserve.kernels import flash_attn_with_kvcache
from flashserve.kernels import counters, decode, reference


@dataclass
class Case:
    batch: int = 2
    seqlen_q: int = 1
    seqlen_new: int = 1
    heads: int = 4
    heads_k: int = 2
    head_dim: int = 32
    page_size: int | None = 16  # None: dense cache
    cache_len: int = 200  # largest cache_seqlens value
    causal: bool = True
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "h" or "bh"
    rotary: str | None = None  # None, "interleaved" or "neox"
    rotary_dim: int | None = None
    num_splits: int = 0
    strided: bool = False
    batch_idx: bool = False
    int_seqlens: bool = False
    leftpad: bool = False  # dense caches: cache_leftpad, rows before the pad hold NaN
    dtype: torch.dtype = torch.float16


def _cache_buffers(case: Case, capacity: int, device):
    """Random K/V caches (paged or dense, maybe strided views of a bigger buffer) filled with NaN."""
    if case.page_size is not None:
        blocks_per_seq = math.ceil(capacity / case.page_size)
        shape = (case.batch * blocks_per_seq + 3, case.page_size, case.heads_k, case.head_dim)
    else:
        blocks_per_seq = 0
        shape = (case.batch + 2 if case.batch_idx else case.batch, capacity, case.heads_k, case.head_dim)
    caches = []
    for _ in range(2):
        if case.strided:
            big = torch.full((shape[0], shape[1] + 1, shape[2] + 1, shape[3] + 8), float("nan"), dtype=case.dtype,
                             device=device)
            caches.append(big[:, 1:, 1:, : shape[3]])
        else:
            caches.append(torch.full(shape, float("nan"), dtype=case.dtype, device=device))
    return caches[0], caches[1], blocks_per_seq


def make_inputs(case: Case, device="cpu", seed=0):
    """All arguments of a call. Cache slots outside the visible tokens hold NaN, so any stray read shows."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(case.dtype).to(device)

    lengths = torch.randint(0, case.cache_len + 1, (case.batch,), generator=gen)
    lengths[0] = case.cache_len
    if case.batch > 2:
        lengths[-1] = 0
    if case.int_seqlens:
        lengths[:] = case.cache_len
    capacity = case.cache_len + case.seqlen_new + 7
    k_cache, v_cache, blocks_per_seq = _cache_buffers(case, capacity, device)
    block_table = cache_batch_idx = None
    if case.page_size is not None:
        block_table = torch.randperm(k_cache.shape[0], generator=gen)[: case.batch * blocks_per_seq]
        block_table = block_table.view(case.batch, blocks_per_seq).int().to(device)
    elif case.batch_idx:
        cache_batch_idx = torch.randperm(k_cache.shape[0], generator=gen)[: case.batch].int().to(device)
    pads = torch.zeros(case.batch, dtype=torch.int64)
    if case.leftpad:  # FlashAttention 2: keys are the rows [pad, cache_seqlens), the pad anywhere up to the end
        pads = (torch.rand(case.batch, generator=gen) * (lengths + 1)).long().clamp(max=lengths)
        pads[0] = min(3, int(lengths[0]))
    for b in range(case.batch):  # real data in the rows pads[b] .. lengths[b] - 1 of every sequence
        n = int(lengths[b]) - int(pads[b])
        positions = torch.arange(n) + int(pads[b])
        if block_table is not None:
            blocks, rows = block_table[b].long().cpu()[positions // case.page_size], positions % case.page_size
        else:
            row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
            blocks, rows = torch.full_like(positions, row), positions
        k_cache[blocks.to(device), rows.to(device)] = randn(n, case.heads_k, case.head_dim)
        v_cache[blocks.to(device), rows.to(device)] = randn(n, case.heads_k, case.head_dim)
    args = dict(q=randn(case.batch, case.seqlen_q, case.heads, case.head_dim), k_cache=k_cache, v_cache=v_cache,
                cache_seqlens=case.cache_len if case.int_seqlens else lengths.int().to(device),
                cache_batch_idx=cache_batch_idx, block_table=block_table, causal=case.causal,
                window_size=case.window, softcap=case.softcap)
    if case.leftpad:
        args["cache_leftpad"] = pads.int().to(device)
    if case.seqlen_new:
        args["k"] = randn(case.batch, case.seqlen_new, case.heads_k, case.head_dim)
        args["v"] = randn(case.batch, case.seqlen_new, case.heads_k, case.head_dim)
    if case.rotary:
        rotary_dim = case.rotary_dim or case.head_dim
        rotary_rows = blocks_per_seq * case.page_size if case.page_size is not None else capacity
        angles = torch.rand(rotary_rows, rotary_dim // 2, generator=gen) * 2 * math.pi
        args["rotary_cos"] = angles.cos().to(case.dtype).to(device)
        args["rotary_sin"] = angles.sin().to(case.dtype).to(device)
        args["rotary_interleaved"] = case.rotary == "interleaved"
    if case.alibi:
        shape = (case.heads,) if case.alibi == "h" else (case.batch, case.heads)
        args["alibi_slopes"] = (torch.rand(*shape, generator=gen) * 0.3).to(device)
    return args


# LSE and rotated-key tolerances: one or two units in the last place of the input dtype
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _upcast(args):
    return {name: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point()
            and name != "alibi_slopes" else value for name, value in args.items()}


def _clone_caches(args):
    copy = dict(args)
    copy["k_cache"], copy["v_cache"] = args["k_cache"].clone(), args["v_cache"].clone()
    return copy


def run_case(case: Case, device="cpu", seed=0):
    """Run the kernel and the references; assert FlashAttention's rule (3x) and the appended cache contents."""
    args = make_inputs(case, device, seed)
    ours_args = _clone_caches(args)
    out, lse = flash_attn_with_kvcache(**ours_args, num_splits=case.num_splits, return_softmax_lse=True)
    ref_args = _upcast(_clone_caches(args))
    out_ref, lse_ref = reference.flash_attn_with_kvcache(**ref_args, upcast=True)
    pt_args = _clone_caches(args)
    out_pt, _ = reference.flash_attn_with_kvcache(**pt_args, upcast=False)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert lse.shape == (case.batch, case.heads, case.seqlen_q) and lse.dtype == torch.float32
    assert not out.isnan().any()
    err = (out.float() - out_ref).abs().max().item()
    err_pt = (out_pt.float() - out_ref).abs().max().item()
    assert err <= 3 * err_pt + 1e-5, f"max error {err} vs PyTorch in input precision {err_pt}"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse)), "rows without visible keys must have LSE -inf"
    assert (lse[~finite] == float("-inf")).all() and (out.float().transpose(1, 2)[~finite] == 0).all()
    tol = TOL[case.dtype]
    assert torch.allclose(lse[finite], lse_ref[finite], atol=tol, rtol=tol)
    if case.seqlen_new:  # the appended tokens: V bit-exact, K equal up to the rotary rounding
        written = ~pt_args["v_cache"].isnan()
        assert torch.equal(ours_args["v_cache"].isnan(), ~written)
        assert torch.equal(ours_args["v_cache"][written], pt_args["v_cache"][written])
        k_ours, k_pt = ours_args["k_cache"][written], pt_args["k_cache"][written]
        if case.rotary:
            assert torch.allclose(k_ours.float(), k_pt.float(), atol=tol, rtol=tol)
        else:
            assert torch.equal(k_ours, k_pt)
    return out, lse


CASES = {
    "paged16-decode": Case(),
    "paged5-split3": Case(page_size=5, num_splits=3),
    "paged1-nosplit": Case(page_size=1, cache_len=40, num_splits=1),
    "dense-batchidx": Case(page_size=None, batch_idx=True, num_splits=3),
    "dense-int-seqlens": Case(page_size=None, int_seqlens=True, seqlen_new=0),
    "strided-paged": Case(strided=True, num_splits=3, batch=3),
    "strided-dense": Case(page_size=None, strided=True, batch=3),
    "empty-seqlens": Case(batch=3, seqlen_new=0, cache_len=0, num_splits=3),
    "mostly-empty-splits": Case(batch=3, cache_len=40, num_splits=16),  # a split layout for a longer capacity
    "rotary-interleaved": Case(rotary="interleaved", seqlen_new=2, seqlen_q=2),
    "rotary-neox-partial": Case(rotary="neox", rotary_dim=16, seqlen_new=2, seqlen_q=2, causal=False),
    "sq3-causal-split3": Case(seqlen_q=3, seqlen_new=3, num_splits=3),
    "sq5-noncausal": Case(seqlen_q=5, seqlen_new=0, causal=False, page_size=5),
    "mqa-heuristic-splits": Case(heads=4, heads_k=1, cache_len=300),  # num_splits=0 picks 2 here
    "mha-d40": Case(heads=2, heads_k=2, head_dim=40),
    "gqa8-sq4": Case(heads=8, heads_k=1, seqlen_q=4, seqlen_new=4, head_dim=16),
    "window": Case(window=(50, 0), causal=False, seqlen_q=2, seqlen_new=2, num_splits=3),
    "window-both-sides": Case(window=(20, 3), causal=False, seqlen_q=4, seqlen_new=1, page_size=5),
    "softcap": Case(softcap=2.0, num_splits=3),
    "alibi-h": Case(alibi="h", seqlen_q=2, seqlen_new=2),
    "alibi-bh": Case(alibi="bh", causal=False, num_splits=3),
    "fp32": Case(dtype=torch.float32, num_splits=3, seqlen_q=2, seqlen_new=2),
    "fp32-rotary-window": Case(dtype=torch.float32, rotary="neox", window=(30, 0), seqlen_q=2, seqlen_new=2),
    "leftpad-causal-rotary": Case(page_size=None, leftpad=True, rotary="interleaved", seqlen_q=2, seqlen_new=2),
    "leftpad-batchidx-split3": Case(page_size=None, leftpad=True, batch_idx=True, batch=3, num_splits=3),
    "leftpad-window-alibi": Case(page_size=None, leftpad=True, window=(20, 0), causal=False, alibi="h",
                                 seqlen_q=3, seqlen_new=1),
    "leftpad-noncausal-noappend": Case(page_size=None, leftpad=True, causal=False, seqlen_new=0, seqlen_q=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kvcache_matches_reference(name):
    run_case(CASES[name])


def test_repeated_runs_are_bit_identical():
    case = Case(num_splits=3, seqlen_new=0)
    args = make_inputs(case)
    first = flash_attn_with_kvcache(**args, num_splits=3)
    assert torch.equal(first, flash_attn_with_kvcache(**args, num_splits=3))


def _valid_args():
    return make_inputs(Case(cache_len=20, seqlen_new=1))


@pytest.mark.parametrize("name, change", [
    ("q", lambda a: a.update(q=a["q"][..., None])),
    ("k_cache", lambda a: a.update(k_cache=a["k_cache"].float())),
    ("v_cache", lambda a: a.update(v_cache=a["v_cache"][:, :, :1])),
    ("block_table", lambda a: a.update(block_table=a["block_table"].long())),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long())),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=10 ** 6)),
    ("cache_batch_idx", lambda a: a.update(cache_batch_idx=torch.zeros(2, dtype=torch.int32))),
    ("k and v", lambda a: a.update(v=None)),
    ("k", lambda a: a.update(k=a["k"][:, :, :1])),
    ("rotary_cos", lambda a: a.update(rotary_cos=torch.ones(30, 40), rotary_sin=torch.ones(30, 40))),
    ("alibi_slopes", lambda a: a.update(alibi_slopes=torch.ones(3))),
    ("num_splits", lambda a: a.update(num_splits=-1)),
    ("window_size", lambda a: a.update(window_size=(-2, 0))),
    ("softcap", lambda a: a.update(softcap=-1.0)),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=True)),
    ("cache_seqlens", lambda a: a.update(cache_seqlens=a["cache_seqlens"].repeat_interleave(2)[::2])),
    ("block_table", lambda a: a.update(block_table=a["block_table"].repeat_interleave(2, 1)[:, ::2])),
    ("rotary_cos", lambda a: a.update(rotary_cos=torch.ones(20, 16).half(), rotary_sin=torch.ones(20, 16).half())),
])
def test_invalid_arguments_raise_value_error(name, change):
    args = _valid_args()
    change(args)
    with pytest.raises(ValueError, match=name):
        flash_attn_with_kvcache(**args)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dense_cache_with_more_rows_than_the_batch(backend, monkeypatch):
    """FA2 accepts a dense cache whose batch is larger than q's: sequence b reads (and appends to) row b."""
    if backend == "torch":
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 1, 4, 32, generator=generator).half()
    k_cache = torch.randn(5, 24, 2, 32, generator=generator).half()
    v_cache = torch.randn(5, 24, 2, 32, generator=generator).half()
    k_new = torch.randn(2, 1, 2, 32, generator=generator).half()
    v_new = torch.randn(2, 1, 2, 32, generator=generator).half()
    seqlens = torch.tensor([7, 13], dtype=torch.int32)
    caches = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, *caches, k=k_new, v=v_new, cache_seqlens=seqlens, causal=True)
    expected = flash_attn_with_kvcache(q, k_cache[:2].clone(), v_cache[:2].clone(), k=k_new, v=v_new,
                                       cache_seqlens=seqlens, causal=True)
    assert torch.equal(out, expected)
    assert torch.equal(caches[0][1, 13], k_new[1, 0]) and torch.equal(caches[0][2:], k_cache[2:])
    with pytest.raises(ValueError, match="k_cache"):
        flash_attn_with_kvcache(torch.randn(6, 1, 4, 32).half(), k_cache, v_cache, cache_seqlens=3)


@pytest.mark.parametrize("change", [
    lambda a: None,  # a paged cache
    lambda a: a.update(block_table=None, k_cache=a["k_cache"][:2], v_cache=a["v_cache"][:2],
                       cache_leftpad=a["cache_leftpad"].long()),
    lambda a: a.update(block_table=None, k_cache=a["k_cache"][:2], v_cache=a["v_cache"][:2],
                       cache_leftpad=a["cache_leftpad"][:1]),
])
def test_cache_leftpad_arguments(change):
    args = {**_valid_args(), "cache_leftpad": torch.zeros(2, dtype=torch.int32)}
    change(args)
    with pytest.raises(ValueError, match="cache_leftpad"):
        flash_attn_with_kvcache(**args)


def test_cache_leftpad_hides_the_pad():
    """A left-padded cache gives what the same keys at rows 0.. give, with rotary at the padded cache rows."""
    case = Case(page_size=None, seqlen_new=2, seqlen_q=2, cache_len=30, leftpad=True, rotary="neox")
    args = make_inputs(case)
    pads, ends = args["cache_leftpad"].long(), args["cache_seqlens"].long()
    out = flash_attn_with_kvcache(**_clone_caches(args))
    for b in range(case.batch):
        shifted = {**args, "q": args["q"][b:b + 1], "k": args["k"][b:b + 1], "v": args["v"][b:b + 1]}
        shifted.update(cache_leftpad=None, cache_seqlens=args["cache_seqlens"][b:b + 1] - int(pads[b]),
                       k_cache=args["k_cache"][b:b + 1, int(pads[b]):].clone(),
                       v_cache=args["v_cache"][b:b + 1, int(pads[b]):].clone(),
                       rotary_cos=args["rotary_cos"][int(pads[b]):], rotary_sin=args["rotary_sin"][int(pads[b]):])
        assert int(ends[b]) >= int(pads[b])
        assert torch.allclose(out[b:b + 1].float(), flash_attn_with_kvcache(**shifted).float(), atol=2e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("empty", ["batch", "queries"])
def test_empty_batch_or_queries(backend, empty, monkeypatch):
    """B = 0 or Sq = 0 give empty results (no division by zero in the split heuristic) on both backends."""
    if backend == "torch":
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    args = make_inputs(Case(seqlen_new=0))
    if empty == "batch":
        args.update(q=args["q"][:0], cache_seqlens=args["cache_seqlens"][:0], block_table=args["block_table"][:0])
    else:
        args.update(q=args["q"][:, :0])
    out, lse = flash_attn_with_kvcache(**args, return_softmax_lse=True)
    batch, seqlen_q, heads = args["q"].shape[:3]
    assert out.shape == args["q"].shape and lse.shape == (batch, heads, seqlen_q)
    assert flash_attn_with_kvcache(**args).shape == args["q"].shape  # (no LSE asked: none allocated)


SPLIT_CASES = ["paged5-split3", "alibi-bh", "sq3-causal-split3", "mostly-empty-splits", "dense-batchidx", "fp32"]


@pytest.mark.parametrize("fused", [True, False])
def test_split_combine_in_kernel_or_in_a_second_launch(fused, monkeypatch):
    """Both combine paths of split-KV decode: the last program of each group merges (one launch; a sequence whose
    keys fit one split writes its result from that split), or the combine kernel does (the default)."""
    monkeypatch.setattr(decode, "FUSED_COMBINE_MAX_GROUPS", 10 ** 6 if fused else 0)
    for name in SPLIT_CASES:
        run_case(CASES[name])
        run_case(CASES[name])  # a second launch finds the persistent counters reset by the first
    for (_, owner), buffer in counters._buffers.items():
        if owner == "decode":
            assert not buffer.any()
