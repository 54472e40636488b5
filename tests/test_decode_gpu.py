"""The decode-issue kernels at real sizes in bf16/fp16 on a CUDA GPU (skipped without one)."""
import dataclasses

import pytest
import torch

from flashserve.kernels import decode, flash_attn_with_kvcache, merge_tuning, paged_attention, reference, silu_and_mul
from test_cache_write import check_cache_write
from test_decode import Case, make_inputs, run_case
from test_layers import check_fused_add_rms_norm, check_rms_norm, check_rotary
from test_merge import check_merge

pytestmark = pytest.mark.gpu

REAL = dict(batch=4, heads=32, heads_k=8, head_dim=128, cache_len=3000)
GPU_CASES = {
    "decode-paged16": Case(**REAL),
    "decode-paged16-nosplit": Case(**REAL, num_splits=1),
    "decode-paged16-split5": Case(**REAL, num_splits=5),
    "decode-paged1": Case(**{**REAL, "cache_len": 700}, page_size=1),
    "decode-paged5-strided": Case(**REAL, page_size=5, strided=True),
    "decode-dense-batchidx": Case(**REAL, page_size=None, batch_idx=True),
    "decode-dense-strided": Case(**REAL, page_size=None, strided=True, num_splits=3),
    "spec-verify-sq4": Case(**REAL, seqlen_q=4, seqlen_new=4, rotary="neox"),
    "chunk-sq64": Case(**REAL, seqlen_q=64, seqlen_new=64, rotary="interleaved", num_splits=2),
    "window-softcap": Case(**REAL, window=(500, 0), causal=False, softcap=30.0, seqlen_q=2, seqlen_new=2),
    "alibi": Case(**REAL, alibi="bh", causal=False),
    "mqa-d64": Case(batch=8, heads=16, heads_k=1, head_dim=64, cache_len=1000),
    "mha-d256": Case(batch=2, heads=8, heads_k=8, head_dim=256, cache_len=1500, num_splits=3),
    "d80-rotary-partial": Case(batch=3, heads=12, heads_k=4, head_dim=80, rotary="neox", rotary_dim=64),
    "empty": Case(**{**REAL, "cache_len": 0}, seqlen_new=0),
    "leftpad-rotary": Case(**REAL, page_size=None, leftpad=True, rotary="neox", seqlen_q=2, seqlen_new=2),
    "leftpad-batchidx-window": Case(**REAL, page_size=None, leftpad=True, batch_idx=True, window=(700, 0),
                                    causal=False, num_splits=4),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kvcache_gpu(name, dtype):
    run_case(dataclasses.replace(GPU_CASES[name], dtype=dtype), device="cuda")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape", [dict(batch=1, cache_len=4096), dict(batch=4, cache_len=3000, num_splits=7),
                                   dict(batch=16, cache_len=2000, seqlen_q=2, seqlen_new=2),
                                   dict(batch=2, cache_len=30000, rotary="neox"), dict(batch=1, cache_len=150),
                                   dict(batch=8, cache_len=600)])
def test_split_combine_in_kernel_or_in_a_second_launch_gpu(fused, shape, monkeypatch):
    """The one-launch combine (atomic counter, last program merges; a short context's one split writes its result
    itself) against the two-launch one, at real sizes, repeated (a race would show as a wrong or differing
    result)."""
    monkeypatch.setattr(decode, "FUSED_COMBINE_MAX_GROUPS", 10 ** 6 if fused else 0)
    case = Case(**{**REAL, **shape}, dtype=torch.bfloat16)
    first, _ = run_case(case, device="cuda")
    for _ in range(3):
        again, _ = run_case(case, device="cuda")
        assert torch.equal(first, again)


def test_engine_entry_points_never_synchronise():
    """paged_attention.decode / prefill (the engine's unchecked paths) launch without a host synchronisation (the
    public flash_attn_with_kvcache checks its index values: one synchronisation, as FlashAttention 2)."""
    args = make_inputs(Case(**REAL, seqlen_new=0, dtype=torch.bfloat16), device="cuda")
    q, k_cache, v_cache, seqlens, table = (args[name] for name in ("q", "k_cache", "v_cache", "cache_seqlens",
                                                                  "block_table"))
    cu_seqlens_q = torch.arange(0, 2 * q.shape[0] + 1, 2, dtype=torch.int32, device="cuda")
    prefill_q = q.repeat_interleave(2, 0).reshape(-1, *q.shape[2:])
    calls = [lambda: paged_attention.decode(q[:, 0], k_cache, v_cache, seqlens + 1, table, 0.1),
             lambda: paged_attention.prefill(prefill_q, k_cache, v_cache, cu_seqlens_q, seqlens + 2, table, 2,
                                             table.shape[1] * k_cache.shape[1], 0.1)]
    for call in calls:
        call()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_repeated_public_call_with_unchanged_index_tensors_never_synchronises():
    """flash_attn_with_kvcache checks its index values once (one synchronisation); a second call with the same,
    unchanged cache_seqlens and block_table (the next layer of the step) launches without one."""
    args = make_inputs(Case(**REAL, seqlen_new=0, dtype=torch.bfloat16), device="cuda")
    first = flash_attn_with_kvcache(**args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = flash_attn_with_kvcache(**args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, again)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens, heads", [(613, 48), (4096, 32)])
def test_merge_gpu(tokens, heads, dtype):
    check_merge(tokens, heads, 128, dtype, device="cuda")
    check_merge(tokens, heads, 96, dtype, strided=True, device="cuda", seed=1)


@pytest.mark.parametrize("config", merge_tuning.CANDIDATES)
def test_every_merge_launch_config_gpu(config):
    """Every candidate of bench_merge.py's sweep compiles and merges right (odd token and head counts, d 96)."""
    for dtype in (torch.bfloat16, torch.float16):
        check_merge(613, 48, 128, dtype, device="cuda", config=config)
        check_merge(77, 20, 96, dtype, strided=True, device="cuda", seed=1, config=config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cache_write_gpu(dtype):
    check_cache_write(4000, 8, 128, 600, 16, dtype, device="cuda")
    check_cache_write(300, 8, 128, 100, 5, dtype, strided=True, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layers_gpu(dtype):
    check_rms_norm((300, 4096), dtype, device="cuda")
    check_rms_norm((7, 1000), dtype, device="cuda")
    check_fused_add_rms_norm((300, 4096), dtype, device="cuda")
    for is_neox in (True, False):
        check_rotary(is_neox, 128, dtype, device="cuda", tokens=300, heads=32, heads_k=8, head_dim=128)
        check_rotary(is_neox, 64, dtype, device="cuda", tokens=33, heads=16, heads_k=2, head_dim=128)
    x = torch.randn(257, 2 * 14336, device="cuda").to(dtype)
    assert torch.allclose(silu_and_mul(x).float(), reference.silu_and_mul(x).float(), atol=2e-2, rtol=2e-2)
