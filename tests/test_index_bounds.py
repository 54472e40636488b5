"""Out-of-range index values never reach memory.

Every index tensor of the public functions (``block_table``, ``cache_seqlens``, ``cache_batch_idx``,
``cache_leftpad``, ``cu_seqlens_q/k``, ``seqused_k``, ``slot_mapping``) is fed values outside its range:
- with the host checks on, the call raises ValueError naming the tensor (FA2 names ``block_table`` when the lengths
  pass the block table's capacity);
- with the host checks off (as while a CUDA graph is captured) and on the engine's unchecked entry points, the
  kernels clamp or mask the values: every tensor the kernels may touch sits inside a buffer whose guard bands hold
  NaN, and the test asserts that the outputs stay finite (no guard was read) and the guards stay NaN (none was
  written).
``CASES``, ``make_case`` and ``check_guards`` are shared with tests/test_index_bounds_gpu.py (huge values there).
"""
import pytest
import torch

from flashserve.kernels import (
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    index_checks,
    paged_attention,
    reshape_and_cache_flash,
)

HEADS, HEADS_K, HEAD_DIM, PAGE, WIDTH, BLOCKS, BATCH, DENSE_LEN = 2, 1, 16, 4, 3, 6, 2, 12
GUARD = 2


class Guarded:
    """Tensors that live inside bigger NaN-filled buffers (GUARD entries on each side of the guarded dimensions)."""

    def __init__(self, device, dtype=torch.float16):
        self.device, self.dtype, self.buffers = device, dtype, []
        self.gen = torch.Generator().manual_seed(0)

    def tensor(self, shape, dims=(0,), fill=None, dtype=None):
        dtype = dtype or self.dtype
        big_shape = [n + 2 * GUARD if d in dims else n for d, n in enumerate(shape)]
        nan = float("nan") if dtype.is_floating_point else BLOCKS  # index guards point at a NaN guard block
        big = torch.full(big_shape, nan, dtype=dtype, device=self.device)
        inner = big[tuple(slice(GUARD, GUARD + n) if d in dims else slice(None) for d, n in enumerate(shape))]
        if fill is None:
            fill = torch.randn(*shape, generator=self.gen)
        inner.copy_(fill.to(dtype))
        mask = torch.ones(big_shape, dtype=torch.bool, device=self.device)
        mask[tuple(slice(GUARD, GUARD + n) if d in dims else slice(None) for d, n in enumerate(shape))] = False
        self.buffers.append((big, mask, big[mask].clone()))
        return inner

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.dtype).to(self.device)

    def index(self, values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=self.device)

    def paged(self):
        """Paged caches (blocks guarded) and a block table whose guard columns point at guard blocks."""
        shape = (BLOCKS, PAGE, HEADS_K, HEAD_DIM)
        table = torch.randperm(BLOCKS, generator=self.gen)[:BATCH * WIDTH].view(BATCH, WIDTH)
        return (self.tensor(shape), self.tensor(shape),
                self.tensor((BATCH, WIDTH), dims=(1,), fill=table, dtype=torch.int32))

    def dense(self):
        shape = (BATCH + 1, DENSE_LEN, HEADS_K, HEAD_DIM)
        return self.tensor(shape, dims=(0, 1)), self.tensor(shape, dims=(0, 1))


def check_guards(guarded: Guarded, outputs) -> None:
    """No guard was written (still NaN / their index values) and no guard was read (outputs finite)."""
    for big, mask, before in guarded.buffers:
        after = big[mask]
        assert ((after == before) | (after.isnan() & before.isnan())).all(), "a guard was written"
    for out in outputs:
        assert torch.isfinite(out).all(), "a guard was read"


def _kvcache_paged(g: Guarded, seqlens, block, append=True):
    k_cache, v_cache, table = g.paged()
    if block is not None:
        table[1, 0] = block
    args = dict(q=g.randn(BATCH, 1, HEADS, HEAD_DIM), k_cache=k_cache, v_cache=v_cache,
                cache_seqlens=g.index(seqlens), block_table=table, causal=True)
    if append:
        args.update(k=g.randn(BATCH, 1, HEADS_K, HEAD_DIM), v=g.randn(BATCH, 1, HEADS_K, HEAD_DIM))
        rows = WIDTH * PAGE
        args.update(rotary_cos=g.tensor((rows, HEAD_DIM // 2)), rotary_sin=g.tensor((rows, HEAD_DIM // 2)))
    return lambda: [flash_attn_with_kvcache(**args)]


def _kvcache_dense(g: Guarded, seqlens, batch_idx=None, leftpad=None):
    k_cache, v_cache = g.dense()
    args = dict(q=g.randn(BATCH, 2, HEADS, HEAD_DIM), k_cache=k_cache, v_cache=v_cache,
                k=g.randn(BATCH, 2, HEADS_K, HEAD_DIM), v=g.randn(BATCH, 2, HEADS_K, HEAD_DIM),
                cache_seqlens=g.index(seqlens), causal=True,
                cache_batch_idx=None if batch_idx is None else g.index(batch_idx),
                cache_leftpad=None if leftpad is None else g.index(leftpad))
    return lambda: [flash_attn_with_kvcache(**args)]


def _varlen_paged(g: Guarded, seqused, block=None, cu_q=(0, 3, 5)):
    k_cache, v_cache, table = g.paged()
    if block is not None:
        table[0, 1] = block
    q = g.tensor((5, HEADS, HEAD_DIM))
    return lambda: [flash_attn_varlen_func(q, k_cache, v_cache, g.index(cu_q), None, 3, WIDTH * PAGE,
                                           causal=True, block_table=table, seqused_k=g.index(seqused))]


def _varlen_packed(g: Guarded, cu_k, seqused=None):
    q, k, v = g.tensor((5, HEADS, HEAD_DIM)), g.tensor((7, HEADS_K, HEAD_DIM)), g.tensor((7, HEADS_K, HEAD_DIM))
    return lambda: [flash_attn_varlen_func(q, k, v, g.index((0, 3, 5)), g.index(cu_k), 3, 7,
                                           seqused_k=None if seqused is None else g.index(seqused))]


def _cache_write(g: Guarded, slot):
    k_cache, v_cache, _ = g.paged()
    key, value = g.randn(3, HEADS_K, HEAD_DIM), g.randn(3, HEADS_K, HEAD_DIM)
    slots = g.index((0, slot, -1), torch.int64)
    return lambda: reshape_and_cache_flash(key, value, k_cache, v_cache, slots) or []


# name -> (builder(guarded, big) -> call, the argument the ValueError names). ``big`` (GPU) picks values far
# outside the tensors; the CPU variant stays just outside (a wild CPU read would crash the test, not fail it).
CASES = {
    "kvcache-seqlens-past-block-table": (lambda g, big: _kvcache_paged(g, (2, 10 ** 6 if big else WIDTH * PAGE),
                                                                       None), "block_table"),
    "kvcache-seqlens-past-block-table-no-append": (
        lambda g, big: _kvcache_paged(g, (2, 10 ** 6 if big else WIDTH * PAGE + 1), None, False), "block_table"),
    "kvcache-negative-seqlens": (lambda g, big: _kvcache_paged(g, (-(10 ** 6) if big else -3, 2), None),
                                 "cache_seqlens"),
    "kvcache-block-id-past-cache": (lambda g, big: _kvcache_paged(g, (2, 5), 2 ** 30 if big else BLOCKS),
                                    "block_table"),
    "kvcache-negative-block-id": (lambda g, big: _kvcache_paged(g, (2, 5), -(2 ** 30) if big else -1),
                                  "block_table"),
    "kvcache-dense-seqlens-past-cache": (lambda g, big: _kvcache_dense(g, (1, 10 ** 6 if big else DENSE_LEN - 1)),
                                         "cache_seqlens"),
    "kvcache-batch-idx-past-cache": (lambda g, big: _kvcache_dense(g, (1, 3), batch_idx=(0, 10 ** 6 if big else 3)),
                                     "cache_batch_idx"),
    "kvcache-negative-batch-idx": (lambda g, big: _kvcache_dense(g, (1, 3), batch_idx=(-(10 ** 6) if big else -1, 0)),
                                   "cache_batch_idx"),
    "kvcache-leftpad-past-seqlens": (lambda g, big: _kvcache_dense(g, (1, 3), leftpad=(0, 10 ** 6 if big else 5)),
                                     "cache_leftpad"),
    "kvcache-negative-leftpad": (lambda g, big: _kvcache_dense(g, (1, 3), leftpad=(-(10 ** 6) if big else -2, 0)),
                                 "cache_leftpad"),
    "varlen-seqused-past-block-table": (lambda g, big: _varlen_paged(g, (3, 10 ** 6 if big else WIDTH * PAGE + 1)),
                                        "block_table"),
    "varlen-block-id-past-cache": (lambda g, big: _varlen_paged(g, (8, 2), 2 ** 30 if big else BLOCKS),
                                   "block_table"),
    "varlen-cu-seqlens-q-past-q": (lambda g, big: _varlen_paged(g, (3, 2), cu_q=(0, 3, 10 ** 6 if big else 7)),
                                   "cu_seqlens_q"),
    "varlen-cu-seqlens-k-past-k": (lambda g, big: _varlen_packed(g, (0, 4, 10 ** 6 if big else 9)), "cu_seqlens_k"),
    "varlen-seqused-past-keys": (lambda g, big: _varlen_packed(g, (0, 4, 7), seqused=(10 ** 6 if big else 5, 3)),
                                 "seqused_k"),
    "cache-write-slot-past-cache": (lambda g, big: _cache_write(g, 10 ** 9 if big else BLOCKS * PAGE),
                                    "slot_mapping"),
}


def make_case(name: str, device, big: bool):
    guarded = Guarded(device)
    return guarded, CASES[name][0](guarded, big)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_out_of_range_index_raises_value_error(name, backend, monkeypatch):
    if backend == "torch":  # the reference path checks with PyTorch ops, the kernel path in one Triton launch
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    _, call = make_case(name, "cpu", big=False)
    with pytest.raises(ValueError, match=CASES[name][1]):
        call()


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_bound_out_of_range_indices_without_the_host_check(name, monkeypatch):
    monkeypatch.setattr(index_checks, "capturing", lambda: True)
    guarded, call = make_case(name, "cpu", big=False)
    check_guards(guarded, call())


def test_engine_entry_points_bound_out_of_range_indices():
    """paged_attention.decode / prefill / qk_norm_rope_cache never check values: their kernels bound them."""
    g = Guarded("cpu")
    k_cache, v_cache, table = g.paged()
    table[0, 2] = BLOCKS
    table[1, 0] = -1
    seqused = g.index((WIDTH * PAGE + 5, 7))
    decoded = paged_attention.decode(g.randn(BATCH, HEADS, HEAD_DIM), k_cache, v_cache, seqused, table, 0.25)
    prefilled = paged_attention.prefill(g.tensor((5, HEADS, HEAD_DIM)), k_cache, v_cache, g.index((0, 3, 5)),
                                        seqused, table, 3, WIDTH * PAGE, 0.25)
    q, k, v = g.tensor((3, HEADS, HEAD_DIM)), g.tensor((3, HEADS_K, HEAD_DIM)), g.tensor((3, HEADS_K, HEAD_DIM))
    cos_sin = g.tensor((8, HEAD_DIM))
    paged_attention.qk_norm_rope_cache(q, k, v, cos_sin, g.index((0, 8, -1), torch.int64), k_cache, v_cache,
                                       g.index((1, BLOCKS * PAGE, 2), torch.int64), None, None, 1e-6)
    check_guards(g, [decoded, prefilled, q, k])


def test_value_checks_are_skipped_while_capturing(monkeypatch):
    """While a graph is captured no check may synchronise: the builders of the checks are never run."""
    monkeypatch.setattr(index_checks, "capturing", lambda: True)
    monkeypatch.setattr(index_checks, "raise_first", lambda checks: pytest.fail("a check ran during capture"))
    for name in CASES:
        make_case(name, "cpu", big=False)[1]()


def test_unchanged_index_tensors_are_checked_once(monkeypatch):
    """The layers of a decode step share cache_seqlens and block_table: one value check for all of them; an
    in-place change of either brings the check back, and a failed check is never remembered."""
    index_checks.KVCACHE_CHECKED.clear()
    runs = []
    check = index_checks._check_kvcache
    monkeypatch.setattr(index_checks, "_check_kvcache", lambda *args: runs.append(1) or check(*args))
    g = Guarded("cpu")
    k_cache, v_cache, table = g.paged()
    q, seqlens = g.randn(BATCH, 1, HEADS, HEAD_DIM), g.index((2, 5))

    def call():
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, causal=True)
    call()
    call()
    assert len(runs) == 1
    table[1, 0] = BLOCKS  # an in-place write bumps the version counter: checked again, and refused
    for _ in range(2):
        with pytest.raises(ValueError, match="block_table"):
            call()
    assert len(runs) == 3
    table[1, 0] = 0
    call()
    seqlens.add_(WIDTH * PAGE)
    with pytest.raises(ValueError, match="block_table"):
        call()
    assert len(runs) == 5


def test_inference_tensors_are_checked_every_time(monkeypatch):
    """Tensors made under torch.inference_mode have no version counter: no memo, a check per call."""
    index_checks.KVCACHE_CHECKED.clear()
    runs = []
    check = index_checks._check_kvcache
    monkeypatch.setattr(index_checks, "_check_kvcache", lambda *args: runs.append(1) or check(*args))
    with torch.inference_mode():
        g = Guarded("cpu")
        k_cache, v_cache, table = g.paged()
        q, seqlens = g.randn(BATCH, 1, HEADS, HEAD_DIM), g.index((2, 5))
        for _ in range(2):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, causal=True)
        table[1, 0] = BLOCKS
        with pytest.raises(ValueError, match="block_table"):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, causal=True)
    assert len(runs) == 3


VARLEN_BAD_INPUTS = {
    "paged-negative-seqused": lambda g: _varlen_paged(g, (-1, 2)),
    "paged-seqused-past-table": lambda g: _varlen_paged(g, (3, WIDTH * PAGE + 1)),
    "paged-block-id-past-cache": lambda g: _varlen_paged(g, (8, 2), BLOCKS),
    "paged-negative-block-id": lambda g: _varlen_paged(g, (8, 2), -1),
    "paged-cu-q-decreasing": lambda g: _varlen_paged(g, (3, 2), cu_q=(0, 4, 3)),
    "paged-cu-q-not-from-0": lambda g: _varlen_paged(g, (3, 2), cu_q=(1, 3, 5)),
    "paged-cu-q-past-q": lambda g: _varlen_paged(g, (3, 2), cu_q=(0, 3, 6)),
    "packed-cu-k-decreasing": lambda g: _varlen_packed(g, (0, 5, 4)),
    "packed-cu-k-not-from-0": lambda g: _varlen_packed(g, (1, 4, 7)),
    "packed-cu-k-past-k": lambda g: _varlen_packed(g, (0, 4, 8)),
    "packed-negative-seqused": lambda g: _varlen_packed(g, (0, 4, 7), seqused=(-1, 3)),
    "packed-seqused-past-keys": lambda g: _varlen_packed(g, (0, 4, 7), seqused=(2, 4)),
}


@pytest.mark.parametrize("name", sorted(VARLEN_BAD_INPUTS))
def test_varlen_value_checks_of_both_paths_agree(name, monkeypatch):
    """``flash_attn_varlen_func``'s value checks: the one-launch Triton path (under the interpreter on the CPU) and
    the PyTorch ops of the reference path raise the same ValueError for each bad input."""
    messages = []
    for backend in ("torch", None):
        if backend is None:
            monkeypatch.delenv("FLASHSERVE_ATTENTION_BACKEND", raising=False)
        else:
            monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", backend)
        call = VARLEN_BAD_INPUTS[name](Guarded("cpu"))
        with pytest.raises(ValueError) as error:
            call()
        messages.append(str(error.value))
    assert messages[0] == messages[1]
