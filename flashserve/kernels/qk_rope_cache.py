"""Per-head q/k RMSNorm, rotary embedding and the paged KV-cache write of an attention layer, in one launch.

Between its QKV projection and its attention an attention layer does, per token: the optional per-head RMSNorm of
q and of k (Qwen3's ``q_norm``/``k_norm``, Hugging Face's sequence: fp32 statistics, the normalised value rounded
to the input dtype, times the weight, rounded again), the rotary embedding of q and k (as ``rotary.apply_rotary``)
and the write of k and v into the paged cache (as ``cache.reshape_and_cache_flash``). Unfused that is up to four
launches (q norm, k norm, rotary, cache write) and two temporary tensors; here it is one launch, in place.

Each program handles one token and one block of q heads, or one block of k heads together with the same heads
of v (the cache write): the grid is (tokens, q head blocks + k head blocks). With programmatic dependent launch
(``flashserve.kernels.pdl``) every program first waits for the previous kernel. A launch reuses the launch plan
(and, for ``qk_norm_rope_and_cache``, the argument checks) of an input geometry seen before.
"""
import functools

import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate, pdl
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import (CachedLauncher, bounded_put, geometry_key, head_block_sizes,
                                       next_power_of_2)
from flashserve.kernels.pdl import wait_for_previous
from flashserve.kernels.rotary import pair_columns, rotate_pairs
from flashserve.kernels.reference import layers as reference

_MAX_TILE = 1024  # elements of one (heads, pairs) tile: several programs per token even at decode


@triton.jit
def _normed(x, rstd, weight_ptr, cols, mask, dtype: tl.constexpr):
    """HF RMSNorm of the columns ``cols`` of the rows x: (x * rstd) rounded to ``dtype``, times the weight, rounded
    again (returned in fp32)."""
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return ((x * rstd[:, None]).to(dtype).to(tl.float32) * weight[None, :]).to(dtype).to(tl.float32)


@triton.jit
def _norm_rope_heads(x_ptr, stride_t, stride_h, token, heads, num_heads, weight_ptr, eps, cos, sin,
                     HEAD_SIZE: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, INTERLEAVED: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Norm (optional) and rotate ``heads`` of one token in place; returns the new rows as (first, second, tail)
    slices in the tensor's dtype with their column indices and masks (for the cache write)."""
    pairs = tl.arange(0, BLOCK_R)
    tail = 2 * HALF + tl.arange(0, BLOCK_T)
    head_mask = (heads < num_heads)[:, None]
    pair_mask = head_mask & (pairs < HALF)[None, :]
    tail_mask = head_mask & (tail < HEAD_SIZE)[None, :]
    first, second = pair_columns(pairs, HALF, INTERLEAVED)
    row = x_ptr + token * stride_t + heads[:, None] * stride_h
    x1 = tl.load(row + first[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + second[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    xt = tl.load(row + tail[None, :], mask=tail_mask, other=0.0)
    if NORM:
        xt = xt.to(tl.float32)
        sum_sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(xt * xt, axis=1)
        rstd = tl.math.rsqrt(sum_sq / HEAD_SIZE + eps)
        dtype = x_ptr.dtype.element_ty
        x1 = _normed(x1, rstd, weight_ptr, first, pairs < HALF, dtype)
        x2 = _normed(x2, rstd, weight_ptr, second, pairs < HALF, dtype)
        xt = _normed(xt, rstd, weight_ptr, tail, tail < HEAD_SIZE, dtype).to(dtype)
        tl.store(row + tail[None, :], xt, mask=tail_mask)
    out1, out2 = rotate_pairs(x1, x2, cos, sin)
    out1 = out1.to(x_ptr.dtype.element_ty)
    out2 = out2.to(x_ptr.dtype.element_ty)
    tl.store(row + first[None, :], out1, mask=pair_mask)
    tl.store(row + second[None, :], out2, mask=pair_mask)
    return out1, out2, xt, first, second, tail, pair_mask, tail_mask


@triton.jit(do_not_specialize=["num_positions", "num_slots"])
def _qk_norm_rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_sin_ptr, positions_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    q_weight_ptr, k_weight_ptr, eps, num_positions, num_slots,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_cos_sin,
    stride_kc_block, stride_kc_row, stride_kc_head, stride_vc_block, stride_vc_row, stride_vc_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, HALF: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr, Q_BLOCKS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    NORM: tl.constexpr, WRITE_CACHE: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    wait_for_previous(PDL)  # everything below reads what earlier kernels wrote or writes the cache
    position = tl.load(positions_ptr + token).to(tl.int64)
    position = tl.minimum(tl.maximum(position, 0), num_positions - 1)  # never a row outside the table
    pairs = tl.arange(0, BLOCK_R)
    cos_row = cos_sin_ptr + position * stride_cos_sin + pairs
    cos = tl.load(cos_row, mask=pairs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_row + HALF, mask=pairs < HALF, other=0.0).to(tl.float32)
    if head_block < Q_BLOCKS:
        q_heads = head_block * BLOCK_HQ + tl.arange(0, BLOCK_HQ)  # a name of its own: the branches' shapes differ
        _norm_rope_heads(q_ptr, stride_q_t, stride_q_h, token, q_heads, NUM_HEADS, q_weight_ptr, eps, cos, sin,
                         HEAD_SIZE, HALF, NORM, INTERLEAVED, BLOCK_R, BLOCK_T)
    else:
        heads = (head_block - Q_BLOCKS) * BLOCK_HK + tl.arange(0, BLOCK_HK)
        out1, out2, tail_values, first, second, tail, pair_mask, tail_mask = _norm_rope_heads(
            k_ptr, stride_k_t, stride_k_h, token, heads, NUM_KV_HEADS, k_weight_ptr, eps, cos, sin,
            HEAD_SIZE, HALF, NORM, INTERLEAVED, BLOCK_R, BLOCK_T)
        if WRITE_CACHE:
            slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
            if (slot >= 0) & (slot < num_slots):  # negative: padding; past the cache: skipped as well
                block, row = slot // CACHE_BLOCK_SIZE, slot % CACHE_BLOCK_SIZE
                key_dst = (key_cache_ptr + block * stride_kc_block + row * stride_kc_row
                           + heads[:, None] * stride_kc_head)
                tl.store(key_dst + first[None, :], out1, mask=pair_mask)
                tl.store(key_dst + second[None, :], out2, mask=pair_mask)
                tl.store(key_dst + tail[None, :], tail_values.to(key_cache_ptr.dtype.element_ty), mask=tail_mask)
                dims = tl.arange(0, BLOCK_D)
                v_mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_SIZE)[None, :]
                value = tl.load(v_ptr + token * stride_v_t + heads[:, None] * stride_v_h + dims[None, :], mask=v_mask)
                value_dst = value_cache_ptr + block * stride_vc_block + row * stride_vc_row
                tl.store(value_dst + heads[:, None] * stride_vc_head + dims[None, :],
                         value.to(value_cache_ptr.dtype.element_ty), mask=v_mask)


@functools.lru_cache(maxsize=None)
def _tiles(num_heads: int, num_kv_heads: int, head_size: int, rotary_dim: int) -> tuple[int, dict]:
    """(number of head blocks, the shape-dependent constexprs) of one layer shape (the same every layer)."""
    half = rotary_dim // 2
    block_r = next_power_of_2(half)
    block_hq, _, q_blocks = head_block_sizes(num_heads, block_r, _MAX_TILE)
    block_hk, _, k_blocks = head_block_sizes(num_kv_heads, block_r, _MAX_TILE)
    constexprs = dict(NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size, HALF=half,
                      Q_BLOCKS=q_blocks, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r,
                      BLOCK_T=next_power_of_2(head_size - rotary_dim), BLOCK_D=next_power_of_2(head_size))
    return q_blocks + k_blocks, constexprs


QK_NORM_ROPE_CACHE_LAUNCHER = CachedLauncher(_qk_norm_rope_cache_kernel)


def launch_qk_norm_rope_cache(q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping,
                              q_norm_weight, k_norm_weight, eps: float, is_neox: bool) -> None:
    """Launch the fused kernel; no validation (internal: the engine calls it every layer with checked shapes).

    Same arguments as ``qk_norm_rope_and_cache``; the caches (and then slot_mapping) and the norm weights may be
    None. Tokens with a negative slot (or one past the cache) are normed and rotated but not cached; positions are
    clamped into the table's rows.
    """
    tensors = (q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping, q_norm_weight, k_norm_weight)
    key, plan = _plan(tensors, eps, is_neox)
    if plan is None:
        plan = bounded_put(_PLANS, key, _RopePlan(*tensors, eps, is_neox), _MAX_PLANS)
    plan(*tensors)


def _plan(tensors: tuple, eps, is_neox) -> tuple:
    """(cache key or None, the kept ``_RopePlan`` of these inputs' geometry (every tensor's shape, strides, dtype
    and device), eps and layout, or None)."""
    geometry = geometry_key(tensors)
    if geometry is None or not use_triton(tensors[0]):
        return None, None
    key = (geometry, eps, is_neox, pdl.enabled(tensors[0].device))
    return key, _PLANS.get(key)


class _RopePlan:
    """The fused launch for inputs of one geometry: ``plan(q, k, v, cos_sin_cache, positions, key_cache,
    value_cache, slot_mapping, q_norm_weight, k_norm_weight)`` (absent ones None). ``checked``: the public function's
    argument checks passed for this geometry (the engine's launches make plans without them)."""

    def __init__(self, q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping, q_norm_weight,
                 k_norm_weight, eps, is_neox):
        self.checked = False
        num_tokens, num_heads, head_size = q.shape
        head_blocks, constexprs = _tiles(num_heads, k.shape[1], head_size, cos_sin_cache.shape[1])
        write_cache = key_cache is not None
        kc_stride = key_cache.stride() if write_cache else (0, 0, 0)
        vc_stride = value_cache.stride() if write_cache else (0, 0, 0)
        q_stride, k_stride, v_stride = q.stride(), k.stride(), v.stride()
        use_pdl = pdl.enabled(q.device)
        self.launch = None if num_tokens == 0 else QK_NORM_ROPE_CACHE_LAUNCHER.plan((num_tokens, head_blocks), (
            float(eps), cos_sin_cache.shape[0], key_cache.shape[0] * key_cache.shape[1] if write_cache else 0,
            q_stride[0], q_stride[1], k_stride[0], k_stride[1], v_stride[0], v_stride[1], cos_sin_cache.stride(0),
            kc_stride[0], kc_stride[1], kc_stride[2], vc_stride[0], vc_stride[1], vc_stride[2],
        ), dict(
            constexprs, CACHE_BLOCK_SIZE=key_cache.shape[1] if write_cache else 1, NORM=q_norm_weight is not None,
            WRITE_CACHE=write_cache, INTERLEAVED=not is_neox, PDL=use_pdl,
        ), num_warps=4, **pdl.launch_options(use_pdl))

    def __call__(self, q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping, q_norm_weight,
                 k_norm_weight) -> None:
        if self.launch is None:
            return
        if key_cache is None:  # no cache write: the kernel never reads these pointers
            key_cache, value_cache, slot_mapping = k, v, positions
        if q_norm_weight is None:
            q_norm_weight, k_norm_weight = q, k
        self.launch((q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping, q_norm_weight,
                     k_norm_weight))


_MAX_PLANS = 256
_PLANS: dict[tuple, _RopePlan] = {}  # (geometry, eps, is_neox, PDL on) -> plan


def qk_norm_rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
                           positions: torch.Tensor, key_cache: torch.Tensor | None, value_cache: torch.Tensor | None,
                           slot_mapping: torch.Tensor | None, q_norm_weight: torch.Tensor | None = None,
                           k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                           is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (optional) and rotary of q and k in place, then k and v into the paged cache; returns q, k.

    Equivalent to ``q.copy_(rms_norm(q, q_norm_weight, eps))`` and the same for k (when the weights are given),
    ``apply_rotary(q, k, cos_sin_cache, positions, is_neox)`` and
    ``reshape_and_cache_flash(k, v, key_cache, value_cache, slot_mapping)``, in one launch.

    Args:
        q: (T, H, D); k, v: (T, Hk, D); one dtype (fp32/fp16/bf16), last dimension contiguous, other strides free
            (e.g. views of the fused QKV projection's output). q and k are modified in place; v is only read.
        cos_sin_cache: (max_position, rotary_dim) float: cos in the first rotary_dim/2 columns, sin in the rest;
            ``rotary_dim`` even and <= D (features past it are only normed).
        positions: (T,) int32/int64, contiguous (not range-checked on the host; clamped into the table).
        key_cache, value_cache: (num_blocks, block_size, Hk, D) of q's dtype, any strides with the last dimension
            contiguous; or both None: no cache write (then slot_mapping is ignored and may be None).
        slot_mapping: (T,) int64: token ``t`` goes to block ``slot // block_size``, row ``slot % block_size``; a
            negative slot skips the write (the token is still normed and rotated). Not range-checked on the host; a
            slot past the cache is skipped too.
        q_norm_weight, k_norm_weight: (D,) both or neither: Hugging Face RMSNorm over each head (fp32 statistics,
            the normalised value rounded to q's dtype, times the weight, rounded again).
        eps: the norm's epsilon, >= 0. is_neox: True pairs the two halves of the rotary features, False neighbours.
    """
    tensors = (q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping, q_norm_weight, k_norm_weight)
    key, plan = _plan(tensors, eps, is_neox)
    if plan is None or not plan.checked:  # the checks of a geometry run once
        _check(*tensors, eps)
        if not use_triton(q):
            return reference.qk_norm_rope_and_cache(q, k, v, cos_sin_cache, positions, key_cache, value_cache,
                                                    slot_mapping, q_norm_weight, k_norm_weight, eps, is_neox)
        if plan is None:
            plan = bounded_put(_PLANS, key, _RopePlan(*tensors, eps, is_neox), _MAX_PLANS)
        plan.checked = True
    plan(*tensors)
    return q, k


def _check(q, k, v, cos_sin_cache, positions, key_cache, value_cache, slot_mapping, q_norm_weight, k_norm_weight,
           eps) -> None:
    """The argument checks of ``qk_norm_rope_and_cache``: ValueError naming the bad argument."""
    _validate.check_tensor("q", q, 3, _validate.ATTENTION_DTYPES)
    device, dtype = q.device, q.dtype
    num_tokens, _, head_size = q.shape
    _validate.check_tensor("k", k, 3, (dtype,), device)
    if k.shape[0] != num_tokens or k.shape[2] != head_size:
        raise ValueError(f"k must have shape ({num_tokens}, Hk, {head_size}), got {tuple(k.shape)}")
    _validate.check_tensor("v", v, 3, (dtype,), device)
    _validate.check_shape("v", v, k.shape)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _validate.check_last_dim_contiguous(name, tensor)
    _validate.check_tensor("cos_sin_cache", cos_sin_cache, 2, _validate.ATTENTION_DTYPES, device)
    _validate.check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
        raise ValueError(f"cos_sin_cache must have an even rotary_dim <= head size {head_size} columns, "
                         f"got {rotary_dim}")
    _validate.check_tensor("positions", positions, 1, (torch.int32, torch.int64), device)
    _validate.check_shape("positions", positions, (num_tokens,))
    _validate.check_last_dim_contiguous("positions", positions)
    if (key_cache is None) != (value_cache is None):
        raise ValueError("key_cache and value_cache must both be tensors or both be None")
    if key_cache is not None:
        _validate.check_tensor("key_cache", key_cache, 4, (dtype,), device)
        if key_cache.shape[2:] != k.shape[1:]:
            raise ValueError(f"key_cache must have (Hk, D) = {tuple(k.shape[1:])} in its last two dimensions, "
                             f"got shape {tuple(key_cache.shape)}")
        _validate.check_tensor("value_cache", value_cache, 4, (dtype,), device)
        _validate.check_shape("value_cache", value_cache, key_cache.shape)
        _validate.check_last_dim_contiguous("key_cache", key_cache)
        _validate.check_last_dim_contiguous("value_cache", value_cache)
        _validate.check_index_tensor("slot_mapping", slot_mapping, 1, device, torch.int64)
        _validate.check_shape("slot_mapping", slot_mapping, (num_tokens,))
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must both be tensors or both be None")
    if q_norm_weight is not None:
        for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            _validate.check_tensor(name, weight, 1, _validate.ATTENTION_DTYPES, device)
            _validate.check_shape(name, weight, (head_size,))
            _validate.check_last_dim_contiguous(name, weight)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
