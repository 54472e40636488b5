"""qk_norm_rope_and_cache: the fused per-head q/k RMSNorm + rotary + paged KV-cache write against its reference.

Acceptance rule (FlashAttention's, 2x): ``max|out - out_ref| <= 2 * max|out_pt - out_ref| + 1e-5`` where out_ref is
the reference on the inputs upcast to fp32 and out_pt the reference in the input precision (HF's roundings). The
caches must hold exactly the returned k and the given v at the kept slots and be untouched everywhere else.
"""
import dataclasses
import math

import pytest
import torch

from flashserve.kernels import qk_norm_rope_and_cache, reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int = 7
    heads: int = 4
    heads_k: int = 2
    head_dim: int = 32
    rotary_dim: int | None = None  # None: head_dim
    norm: bool = True
    is_neox: bool = True
    block_size: int = 4
    num_blocks: int = 5
    cache: bool = True
    positions_dtype: torch.dtype = torch.int64
    dtype: torch.dtype = torch.float32


def make_inputs(case: Case, device="cpu", upcast=False, seed=0) -> dict:
    """The arguments, deterministic in ``seed``: q/k/v views of one fused qkv buffer, the caches views of one
    (layers, 2, blocks, block_size, Hk, D) buffer, a quarter of the slots negative. ``upcast``: values rounded to
    the case's dtype, then held in fp32."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if upcast else case.dtype

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(case.dtype).to(dtype).to(device)

    tokens, heads, heads_k, head_dim = case.tokens, case.heads, case.heads_k, case.head_dim
    rotary_dim = case.rotary_dim or head_dim
    qkv = randn(tokens, (heads + 2 * heads_k) * head_dim, scale=2.0)
    angles = torch.rand(64, rotary_dim // 2, generator=gen) * 2 * math.pi
    slots = torch.randperm(case.num_blocks * case.block_size, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.25] = -1
    caches = randn(2, 2, case.num_blocks, case.block_size, heads_k, head_dim)
    weights = [randn(head_dim, scale=0.3, shift=1.0) for _ in range(2)] if case.norm else [None, None]
    return dict(
        q=qkv[:, : heads * head_dim].view(tokens, heads, head_dim),
        k=qkv[:, heads * head_dim: (heads + heads_k) * head_dim].view(tokens, heads_k, head_dim),
        v=qkv[:, (heads + heads_k) * head_dim:].view(tokens, heads_k, head_dim),
        cos_sin_cache=torch.cat((angles.cos(), angles.sin()), dim=-1).to(device),
        positions=torch.randint(0, 64, (tokens,), generator=gen).to(case.positions_dtype).to(device),
        key_cache=caches[1, 0] if case.cache else None, value_cache=caches[1, 1] if case.cache else None,
        slot_mapping=slots.to(device) if case.cache else None, q_norm_weight=weights[0], k_norm_weight=weights[1],
        eps=1e-6, is_neox=case.is_neox, qkv=qkv, caches=caches,
    )


def _call(fn, args):
    return fn(**{name: value for name, value in args.items() if name not in ("qkv", "caches")})


def run_case(case: Case, device="cpu"):
    args, pt_args, ref_args = make_inputs(case, device), make_inputs(case, device), make_inputs(case, device, True)
    before = make_inputs(case, device)
    q, k = _call(qk_norm_rope_and_cache, args)
    assert q is args["q"] and k is args["k"], "q and k are returned, modified in place"
    _call(reference.layers.qk_norm_rope_and_cache, pt_args)
    _call(reference.layers.qk_norm_rope_and_cache, ref_args)
    for name in ("q", "k"):
        out, out_pt, out_ref = args[name], pt_args[name], ref_args[name]
        err = (out.float() - out_ref).abs().max().item() if out.numel() else 0.0
        err_pt = (out_pt.float() - out_ref).abs().max().item() if out.numel() else 0.0
        assert err <= 2 * err_pt + 1e-5, f"{name}: max error {err} vs PyTorch in input precision {err_pt}"
        assert torch.allclose(out.float(), out_pt.float(), atol=TOL[case.dtype], rtol=TOL[case.dtype])
        if case.dtype != torch.float32:  # HF's roundings too: only the fp32 sum order differs, rarely flipping one
            assert (out != out_pt).sum().item() <= 0.01 * out.numel(), f"{name} differs from HF's roundings"
        if not case.norm:  # features past rotary_dim are untouched
            rotary_dim = args["cos_sin_cache"].shape[1]
            assert torch.equal(out[..., rotary_dim:], before[name][..., rotary_dim:])
    assert torch.equal(args["v"], before["v"]), "v must not be modified"
    expected = before["caches"]
    if case.cache:
        kept = args["slot_mapping"] >= 0
        slots = args["slot_mapping"][kept]
        expected[1, 0].view(-1, case.heads_k, case.head_dim)[slots] = k[kept]
        expected[1, 1].view(-1, case.heads_k, case.head_dim)[slots] = args["v"][kept]
    assert torch.equal(args["caches"], expected), "the caches hold k and v at the kept slots, nothing else changes"


CASES = {
    "base": Case(),
    "partial-rotary-d48": Case(head_dim=48, rotary_dim=32),
    "mqa-int32-positions": Case(heads=3, heads_k=1, positions_dtype=torch.int32),
    "block-size-1": Case(block_size=1, num_blocks=20),
    "no-cache": Case(cache=False),
    "head-blocks-d128": Case(tokens=3, heads=40, heads_k=20, head_dim=128, rotary_dim=96, num_blocks=1),
    "zero-tokens": Case(tokens=0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_qk_norm_rope_and_cache(name, norm, is_neox, dtype):
    run_case(dataclasses.replace(CASES[name], norm=norm, is_neox=is_neox, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shape", [dict(heads=32, heads_k=8, head_dim=128), dict(heads=64, heads_k=4, head_dim=128),
                                   dict(heads=16, heads_k=1, head_dim=80, rotary_dim=64),
                                   dict(heads=8, heads_k=8, head_dim=256)])
def test_qk_norm_rope_and_cache_gpu(shape, norm, is_neox, dtype):
    run_case(Case(tokens=37, block_size=16, num_blocks=8, norm=norm, is_neox=is_neox, dtype=dtype, **shape), "cuda")


def _valid_args():
    return dict(q=torch.randn(3, 4, 8), k=torch.randn(3, 2, 8), v=torch.randn(3, 2, 8),
                cos_sin_cache=torch.randn(10, 8), positions=torch.arange(3), key_cache=torch.zeros(2, 4, 2, 8),
                value_cache=torch.zeros(2, 4, 2, 8), slot_mapping=torch.arange(3), q_norm_weight=torch.ones(8),
                k_norm_weight=torch.ones(8))


@pytest.mark.parametrize("name, change", [
    ("q", dict(q=torch.ones(3, 4, 8, dtype=torch.int32))),
    ("q", dict(q=torch.randn(3, 8, 4).transpose(1, 2))),
    ("k", dict(k=torch.randn(3, 2, 4))),
    ("k", dict(k=torch.randn(3, 2, 8).half())),
    ("v", dict(v=torch.randn(3, 1, 8))),
    ("v", dict(v=torch.randn(3, 2, 8).half())),
    ("cos_sin_cache", dict(cos_sin_cache=torch.randn(10, 10))),
    ("cos_sin_cache", dict(cos_sin_cache=torch.randn(10, 5))),
    ("positions", dict(positions=torch.arange(4))),
    ("positions", dict(positions=torch.arange(3.0))),
    ("positions", dict(positions=torch.arange(6)[::2])),
    ("key_cache", dict(key_cache=torch.zeros(2, 4, 1, 8))),
    ("value_cache", dict(value_cache=torch.zeros(2, 3, 2, 8))),
    ("value_cache", dict(value_cache=None)),
    ("slot_mapping", dict(slot_mapping=torch.arange(3).int())),
    ("slot_mapping", dict(slot_mapping=torch.arange(2))),
    ("slot_mapping", dict(slot_mapping=None)),
    ("q_norm_weight", dict(q_norm_weight=torch.ones(7))),
    ("k_norm_weight", dict(k_norm_weight=None)),
    ("k_norm_weight", dict(k_norm_weight=torch.ones(8).half().int())),
    ("eps", dict(eps=-1.0)),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_invalid_arguments(name, change, backend, monkeypatch):
    """The same ValueError on both backends."""
    if backend == "torch":
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    with pytest.raises(ValueError, match=name):
        qk_norm_rope_and_cache(**{**_valid_args(), **change})


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_tokens_and_no_cache(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    args = {**_valid_args(), "q": torch.randn(0, 4, 8), "k": torch.randn(0, 2, 8), "v": torch.randn(0, 2, 8),
            "positions": torch.zeros(0).long(), "key_cache": None, "value_cache": None, "slot_mapping": None}
    q, k = qk_norm_rope_and_cache(**args)
    assert q.shape == (0, 4, 8) and k.shape == (0, 2, 8)
