"""The Hopper prefill kernel: dense and varlen (unpaged) attention, causal or not, with Q/K/V/O moved by the
tensor-memory accelerator through Triton's tensor descriptors, K/V tiles software-pipelined over ``num_stages``,
and an optional persistent grid. (Triton 3.6 to 3.9 do not warp-specialise this loop on sm_90: a
``tl.range(..., warp_specialize=True)`` compiles to the same PTX, so it is not offered.)

It covers the common prefill case only: fp16/bf16 (fp32 too, for tests), head dim a power of two in [16, 128], no
sliding window, softcap or ALiBi, a positive scale, keys not paged, and no GQA head packing (``prefill.py``'s
kernel packs the heads of short queries). ``use_tma`` decides per call; every other case, and GPUs before
Hopper or a Triton without tensor descriptors, run ``prefill.py``'s portable kernel.

Each (query tile, batch, head) work item builds its own 2D descriptors over the sequence's rows of one head:
shape (seqlen, HEAD_DIM), so loads past the sequence end read zeros and stores past it are clipped by the
hardware (no row of another sequence is ever touched, and no index leaves the tensors: sequence bounds are
clamped as in ``kv_layout.sequence_bounds``). The descriptors live in a global scratch buffer that Triton asks
``triton.set_allocator``'s allocator for at launch (``ensure_allocator``).

Work items are ordered longest first: the last query tiles of a causal mask (most key tiles) of every batch and
head come before the first ones, heads fastest so the query heads of a KV head run side by side and share its
K/V tiles in L2. With ``PERSISTENT`` = n > 0, n programs per SM walk the items round robin (n = 2 for configs
whose registers and shared memory let two programs share an SM); with 0 one program runs one item. Inside a tile
the key range is cut in two: the tiles every row sees in full (no mask), then the masked diagonal / sequence-end
tiles.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from flashserve.kernels._launch import cdiv
from flashserve.kernels.kv_layout import KV_DENSE, KV_VARLEN, sequence_bounds
from flashserve.kernels.online_softmax import online_softmax_step
from flashserve.kernels.prefill_tuning import (
    TMA_CONFIGS,
    default_tma_config,
    length_class,
    prune_tma_configs,
    use_autotune,
)
from flashserve.kernels.tuning_cache import PersistentTuning

# FLASHSERVE_PREFILL_KERNEL: "auto" (the TMA kernel on Hopper where it applies), "tma" (wherever the inputs allow,
# any device, the interpreter included), "portable" (always prefill.py's kernel).
PREFILL_KERNEL_CHOICES = ("auto", "tma", "portable")
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32: forced ("tma") only, e.g. interpreter tests


@triton.jit
def _attend_keys(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, pos, seqlen_k, diag, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax (exp2, scale folded into the exponent's FMA) over key tiles lo, lo + BLOCK_N, ... < hi."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            cols = start_n + offs_n
            visible = cols[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= (pos + diag)[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, True, MASKED, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attend_tile(item, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                 batch_size, num_tiles, total_q, total_k, seqlen_q_dense, seqlen_k_dense, qk_scale,
                 NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN_Q: tl.constexpr,
                 KV_LAYOUT: tl.constexpr, HAS_SEQUSED: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Work item ``item``: query tile, batch and head (heads fastest, longest tiles first), attended and stored."""
    per_tile = batch_size * NUM_HEADS
    tile = num_tiles - 1 - item // per_tile
    rest = item % per_tile
    batch = rest // NUM_HEADS
    head = rest % NUM_HEADS
    kv_head = head // GROUP
    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(
        batch, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, total_q, total_k, 0, seqlen_q_dense,
        seqlen_k_dense, VARLEN_Q, KV_LAYOUT, HAS_SEQUSED, 1)
    row_start = tile * BLOCK_M
    if row_start < seqlen_q:
        batch64 = batch.to(tl.int64)
        q_base = q_ptr + batch64 * stride_qb + q_start * stride_qs + head.to(tl.int64) * stride_qh
        o_base = out_ptr + batch64 * stride_ob + q_start * stride_os + head.to(tl.int64) * stride_oh
        k_base = k_ptr + batch64 * stride_kb + k_start * stride_ks + kv_head.to(tl.int64) * stride_kh
        v_base = v_ptr + batch64 * stride_vb + k_start * stride_vs + kv_head.to(tl.int64) * stride_vh
        q_desc = tl.make_tensor_descriptor(q_base, shape=[seqlen_q, HEAD_DIM], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        o_desc = tl.make_tensor_descriptor(o_base, shape=[seqlen_q, HEAD_DIM], strides=[stride_os, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        # A descriptor dimension must be >= 1; a sequence without keys reads none (hi = 0 below).
        k_rows = tl.maximum(seqlen_k, 1)
        k_desc = tl.make_tensor_descriptor(k_base, shape=[k_rows, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[k_rows, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        pos = row_start + tl.arange(0, BLOCK_M)
        q = q_desc.load([row_start, 0])

        # Keys [0, hi) are visible to some row of the tile, [0, full_hi) to every row.
        diag = seqlen_k - seqlen_q
        hi = seqlen_k
        full_hi = seqlen_k
        if CAUSAL:
            hi = tl.maximum(tl.minimum(tl.minimum(row_start + BLOCK_M, seqlen_q) + diag, seqlen_k), 0)
            full_hi = tl.maximum(tl.minimum(row_start + 1 + diag, seqlen_k), 0)
        mid = tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_desc, v_desc, 0, mid, pos, seqlen_k, diag, qk_scale,
                                     False, CAUSAL, BLOCK_N, DOT_PRECISION)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_desc, v_desc, mid, hi, pos, seqlen_k, diag, qk_scale,
                                     True, CAUSAL, BLOCK_N, DOT_PRECISION)

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        o_desc.store([row_start, 0], out.to(out_ptr.dtype.element_ty))
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        lse_rows = batch64 * stride_lb + head.to(tl.int64) * stride_lh + q_start + pos
        tl.store(lse_ptr + lse_rows, lse, mask=pos < seqlen_q)


# Lengths and counts change with every batch: not specialised (see prefill.py); strides stay specialised.
@triton.jit(do_not_specialize=["batch_size", "max_seqlen_q", "total_q", "total_k", "seqlen_q_dense",
                               "seqlen_k_dense", "tune_seqlen_q", "tune_seqlen_k"])
def _prefill_tma_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    batch_size, max_seqlen_q, total_q, total_k, seqlen_q_dense, seqlen_k_dense, qk_scale,
    tune_seqlen_q, tune_seqlen_k,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN_Q: tl.constexpr,
    KV_LAYOUT: tl.constexpr, HAS_SEQUSED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """``PERSISTENT``: programs per SM of a persistent grid, each walking the work items round robin; 0: one work
    item per program."""
    num_tiles = tl.cdiv(max_seqlen_q, BLOCK_M)
    if PERSISTENT > 0:
        total = num_tiles * batch_size * NUM_HEADS
        for item in range(tl.program_id(0), total, tl.num_programs(0)):
            _attend_tile(item, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
                         seqused_k_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                         batch_size, num_tiles, total_q, total_k, seqlen_q_dense, seqlen_k_dense, qk_scale,
                         NUM_HEADS, GROUP, HEAD_DIM, VARLEN_Q, KV_LAYOUT, HAS_SEQUSED, CAUSAL, DOT_PRECISION,
                         BLOCK_M, BLOCK_N)
    else:
        _attend_tile(tl.program_id(0), q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
                     seqused_k_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                     batch_size, num_tiles, total_q, total_k, seqlen_q_dense, seqlen_k_dense, qk_scale,
                     NUM_HEADS, GROUP, HEAD_DIM, VARLEN_Q, KV_LAYOUT, HAS_SEQUSED, CAUSAL, DOT_PRECISION,
                     BLOCK_M, BLOCK_N)


_prefill_tma_kernel_tuned = triton.autotune(
    configs=TMA_CONFIGS,
    key=["tune_seqlen_q", "tune_seqlen_k", "NUM_HEADS", "GROUP", "HEAD_DIM", "VARLEN_Q", "KV_LAYOUT", "HAS_SEQUSED",
         "CAUSAL"],
    prune_configs_by={"early_config_prune": prune_tma_configs},
)(_prefill_tma_kernel)
PREFILL_TMA_TUNING = PersistentTuning("prefill_tma", _prefill_tma_kernel_tuned, depends=[prune_tma_configs])


def tma_prefill_attention(q, k, v, out, lse, strides, qk_scale, causal, batch, max_seqlen_q, max_seqlen_k,
                          cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None):
    """Launch the TMA kernel (inputs validated, ``tma_applies`` true). Layouts as ``prefill.prefill_attention``'s
    dense and unpaged varlen cases; ``strides``: the 14 strides of q, k, v, out (batch, token, head; batch 0 for
    varlen) and lse (batch, head); ``qk_scale`` = softmax scale * log2(e)."""
    varlen = q.dim() == 3
    nheads, head_dim = q.shape[-2], q.shape[-1]
    dummy = cu_seqlens_q if cu_seqlens_q is not None else lse
    args = (q, k, v, out, lse, cu_seqlens_q if cu_seqlens_q is not None else dummy,
            cu_seqlens_k if cu_seqlens_k is not None else dummy, seqused_k if seqused_k is not None else dummy,
            *strides, batch, max_seqlen_q, q.shape[0], k.shape[0], 0 if varlen else q.shape[1],
            0 if varlen else k.shape[1], qk_scale, length_class(max_seqlen_q), length_class(max_seqlen_k))
    meta = dict(NUM_HEADS=nheads, GROUP=nheads // k.shape[-2], HEAD_DIM=head_dim, VARLEN_Q=varlen,
                KV_LAYOUT=KV_VARLEN if varlen else KV_DENSE, HAS_SEQUSED=seqused_k is not None, CAUSAL=causal,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    items = nheads * batch
    programs = sm_count(q.device.index) if q.is_cuda else 4

    def grid(config):
        work = items * cdiv(max_seqlen_q, config["BLOCK_M"])
        return (min(work, programs * config["PERSISTENT"]) if config["PERSISTENT"] else work,)

    if q.is_cuda:
        ensure_allocator()
    if use_autotune(q.device):
        PREFILL_TMA_TUNING.launch(q.device, grid, *args, **meta)
    else:
        config = default_tma_config(q.device, q.element_size())
        _prefill_tma_kernel[grid(config)](*args, **meta, **config)


def _scratch(size: int, alignment: int, stream):
    """Triton's global scratch (the on-device tensor descriptors, 128 bytes each) from PyTorch's caching allocator
    on the current device (its blocks are 512-byte aligned, more than any ``alignment`` Triton asks for)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Install ``_scratch`` as Triton's allocator unless one is set. Triton keeps it in a ContextVar, so every
    thread (the engine thread, the server's) needs its own: cheap to check at each launch."""
    from triton.runtime import _allocation
    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


@functools.lru_cache(maxsize=None)
def _device_is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Number of SMs of a CUDA device (the persistent grid's size), read once per device."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def prefill_kernel_choice() -> str:
    """``FLASHSERVE_PREFILL_KERNEL`` (default "auto"); ValueError naming it for any other value."""
    choice = os.environ.get("FLASHSERVE_PREFILL_KERNEL", "auto").lower()
    if choice not in PREFILL_KERNEL_CHOICES:
        raise ValueError(f"FLASHSERVE_PREFILL_KERNEL must be one of {PREFILL_KERNEL_CHOICES}, got {choice!r}")
    return choice


def _tma_strides_ok(tensor: torch.Tensor) -> bool:
    """TMA's rules: a 16-byte aligned base and 16-byte multiples for every stride but the last (which is 1)."""
    size = tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in tensor.stride()[:-1])


def tma_applies(q, k, v, out, softmax_scale, window_size, softcap, alibi_slopes, block_table, max_seqlen_q,
                heads_per_tile) -> bool:
    """Whether the TMA kernel computes this call: no window except causal's (``window_size`` (-1, 0) with causal
    folded in, or (-1, -1)), the dtypes, head dims and TMA alignment it handles, no GQA head packing."""
    if not HAS_TENSOR_DESCRIPTORS or block_table is not None or alibi_slopes is not None or softcap > 0.0:
        return False
    if window_size[0] >= 0 or window_size[1] > 0 or heads_per_tile > 1:
        return False
    if softmax_scale is not None and softmax_scale <= 0:  # the kernel scales the row max: needs a positive scale
        return False
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1) or q.dtype not in TMA_DTYPES:
        return False
    return all(_tma_strides_ok(t) for t in (q, k, v, out)) and max_seqlen_q > 0


def use_tma(q, k, v, out, softmax_scale, window_size, softcap, alibi_slopes, block_table, max_seqlen_q,
            heads_per_tile) -> bool:
    """The kernel choice for one call: "auto" takes the TMA kernel for fp16/bf16 on a Hopper GPU, "tma" wherever
    ``tma_applies``, "portable" never."""
    choice = prefill_kernel_choice()
    if choice == "portable":
        return False
    if choice == "auto":
        if not q.is_cuda or q.dtype == torch.float32:
            return False
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        if not _device_is_hopper(index):
            return False
    return tma_applies(q, k, v, out, softmax_scale, window_size, softcap, alibi_slopes, block_table,
                       max_seqlen_q, heads_per_tile)
