"""Merging two attention states by their log-sum-exp (split-KV decode, chunked prefill, cascade attention).

``lse_weights`` and ``weighted`` are the combine code of the library: ``merge_attn_states`` uses them with two
states per (token, head), the split-KV decode combine kernel (``decode.py``) with one state per split.
``merge_split_rows`` (the decode kernel's in-kernel combine) weighs its states with the same normaliser
(``_lse_normaliser``, from all of a row's LSEs first), chunk by chunk, and sums them with ``weighted``.
"""

import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate, merge_tuning
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import CachedLauncher, LaunchPlan, bounded_put, cdiv, geometry_key
from flashserve.kernels.reference import decode as reference

_MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def lse_weights(lse):
    """Weights of N attention states from their LSEs ``lse`` [R, N] fp32 (states along the last axis).

    Returns (weights [R, N], merged_lse [R]): the merged output is ``sum_n weights[:, n] * out_n``. An infinite
    LSE (+inf or -inf) means "empty" and gets weight 0; a row whose states are all empty gets all-zero weights and
    merged LSE -inf, so it merges to zeros, never NaN.
    """
    unnormalised, _, total, merged_lse = _lse_normaliser(lse)
    return unnormalised / total[:, None], merged_lse


@triton.jit
def _empty_as_minus_inf(lse):
    """LSEs with +inf (an empty state, as -inf) mapped to -inf."""
    return tl.where(lse == float("inf"), float("-inf"), lse)


@triton.jit
def _lse_normaliser(lse):
    """``lse_weights``' normaliser of [R, N] LSEs: (exp(lse - maximum) with an empty state's 0, each row's maximum
    (0 where all are empty), the row's sum of the former (1 where all are empty), the merged LSE (-inf where all
    are empty)); the weight of state n is ``exp(lse[:, n] - maximum) / sum``."""
    lse = _empty_as_minus_inf(lse)
    lse_max = tl.max(lse, axis=1)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    unnormalised = tl.exp(lse - lse_max[:, None])
    total = tl.sum(unnormalised, axis=1)
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    return unnormalised, lse_max, total, tl.where(empty, float("-inf"), lse_max + tl.log(total))


@triton.jit
def weighted(out, weight):
    """``out * weight``, exactly 0 where the weight is 0 (an empty state's output is never read into a sum)."""
    return tl.where(weight > 0.0, out * weight, 0.0)


@triton.jit
def merge_split_rows(part_out_ptr, part_lse_ptr, out_rows, lse_rows, rows_valid, stride_out_split, stride_lse_split,
                     num_states, dims, dim_valid, BLOCK_S: tl.constexpr, S_CHUNK: tl.constexpr):
    """Merge the first ``num_states`` partial states of R rows at once (the decode kernel's in-kernel combine).

    Row r's state s lies at ``part_out_ptr + out_rows[r] + s * stride_out_split`` (fp32 output, [BLOCK_D] wide) and
    ``part_lse_ptr + lse_rows[r] + s * stride_lse_split`` (LSE); ``rows_valid`` [R] masks padding rows, and every
    state below ``num_states`` (<= BLOCK_S) was written. The LSEs are read whole first for each row's maximum and
    sum; the outputs then in [R, S_CHUNK, BLOCK_D] tiles whose loads (with their LSEs again) depend on nothing but
    the pointers, so every chunk's loads can be in flight at once. Loads bypass L1 (``.cg``): other programs of the
    launch wrote the states. Returns (merged output [R, BLOCK_D] fp32, merged LSE [R]) as ``lse_weights`` weighs
    them (an empty state weighs 0; all empty: zeros and -inf).
    """
    splits = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse_ptr + lse_rows[:, None] + splits[None, :] * stride_lse_split,
                  mask=rows_valid[:, None] & (splits < num_states)[None, :], other=float("-inf"),
                  cache_modifier=".cg")
    _, lse_max, total, merged_lse = _lse_normaliser(lse)
    merged = tl.zeros([out_rows.shape[0], dims.shape[0]], tl.float32)
    for first in tl.static_range(0, BLOCK_S, S_CHUNK):
        chunk = first + tl.arange(0, S_CHUNK)
        valid = rows_valid[:, None] & (chunk < num_states)[None, :]
        chunk_lse = tl.load(part_lse_ptr + lse_rows[:, None] + chunk[None, :] * stride_lse_split, mask=valid,
                            other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + out_rows[:, None, None] + chunk[None, :, None] * stride_out_split
                       + dims[None, None, :], mask=valid[:, :, None] & dim_valid[None, None, :], other=0.0,
                       cache_modifier=".cg")
        weights = tl.exp(_empty_as_minus_inf(chunk_lse) - lse_max[:, None]) / total[:, None]
        merged += tl.sum(weighted(part, weights[:, :, None]), axis=1)
    return merged, merged_lse


@triton.jit
def _load_state(ptr, mask, EVICT_FIRST: tl.constexpr):
    """A tile of one input state as fp32 (0 where masked); ``EVICT_FIRST``: the bytes are read once, hint L2."""
    if EVICT_FIRST:
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, value, mask, EVICT_FIRST: tl.constexpr):
    if EVICT_FIRST:
        tl.store(ptr, value, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(ptr, value, mask=mask)


# The token count only bounds the mask: not specialised (no recompile per count).
@triton.jit(do_not_specialize=["num_tokens"])
def _merge_kernel(
    out_ptr, out_lse_ptr, prefix_ptr, prefix_lse_ptr, suffix_ptr, suffix_lse_ptr, num_tokens,
    stride_out_t, stride_out_h, stride_prefix_t, stride_prefix_h, stride_suffix_t, stride_suffix_h,
    stride_plse_h, stride_plse_t, stride_slse_h, stride_slse_t, stride_olse_h, stride_olse_t,
    NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, HAS_OUT_LSE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, EVICT_FIRST: tl.constexpr,
):
    """Program (i, j) merges tokens ``i * BLOCK_T ..`` x heads ``j * BLOCK_H ..``: rows of the tile are
    (token, head) pairs, token-major (a token's heads are adjacent in memory)."""
    rows = tl.arange(0, BLOCK_T * BLOCK_H)
    token = tl.program_id(0) * BLOCK_T + rows // BLOCK_H
    heads = tl.program_id(1) * BLOCK_H + rows % BLOCK_H
    row_valid = (token < num_tokens) & (heads < NUM_HEADS)
    token = token.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    if HEAD_SIZE == BLOCK_D:  # no dimension mask: constant along the row, so the loads stay 16-byte vectors
        mask = tl.broadcast_to(row_valid[:, None], [BLOCK_T * BLOCK_H, BLOCK_D])
    else:
        mask = row_valid[:, None] & (dims < HEAD_SIZE)[None, :]
    prefix_lse = tl.load(prefix_lse_ptr + heads * stride_plse_h + token * stride_plse_t, mask=row_valid, other=0.0)
    suffix_lse = tl.load(suffix_lse_ptr + heads * stride_slse_h + token * stride_slse_t, mask=row_valid, other=0.0)
    prefix = _load_state(prefix_ptr + (token * stride_prefix_t + heads * stride_prefix_h)[:, None] + dims[None, :],
                         mask, EVICT_FIRST)
    suffix = _load_state(suffix_ptr + (token * stride_suffix_t + heads * stride_suffix_h)[:, None] + dims[None, :],
                         mask, EVICT_FIRST)
    weights, lse = lse_weights(tl.join(prefix_lse, suffix_lse))
    prefix_weight, suffix_weight = tl.split(weights)
    out = weighted(prefix, prefix_weight[:, None]) + weighted(suffix, suffix_weight[:, None])
    _store_state(out_ptr + (token * stride_out_t + heads * stride_out_h)[:, None] + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask, EVICT_FIRST)
    if HAS_OUT_LSE:
        tl.store(out_lse_ptr + heads * stride_olse_h + token * stride_olse_t, lse, mask=row_valid)


MERGE_LAUNCHER = CachedLauncher(_merge_kernel)


def _check_merge(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse) -> None:
    _validate.check_tensor("prefix_output", prefix_output, 3, _MERGE_DTYPES)
    device, dtype, shape = prefix_output.device, prefix_output.dtype, prefix_output.shape
    _validate.check_tensor("output", output, 3, (dtype,), device)
    _validate.check_shape("output", output, shape)
    _validate.check_tensor("suffix_output", suffix_output, 3, (dtype,), device)
    _validate.check_shape("suffix_output", suffix_output, shape)
    _validate.check_last_dim_contiguous("output", output)
    _validate.check_last_dim_contiguous("prefix_output", prefix_output)
    _validate.check_last_dim_contiguous("suffix_output", suffix_output)
    lse_shape = (shape[1], shape[0])
    _validate.check_tensor("prefix_lse", prefix_lse, 2, (torch.float32,), device)
    _validate.check_shape("prefix_lse", prefix_lse, lse_shape)
    _validate.check_tensor("suffix_lse", suffix_lse, 2, (torch.float32,), device)
    _validate.check_shape("suffix_lse", suffix_lse, lse_shape)
    if output_lse is not None:
        _validate.check_tensor("output_lse", output_lse, 2, (torch.float32,), device)
        _validate.check_shape("output_lse", output_lse, lse_shape)


def merge_attn_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: torch.Tensor | None = None,
) -> None:
    """Merge two partial attention results over disjoint key sets into ``output`` (and ``output_lse``), in place.

    vLLM's signature and layout. With ``m = max(p, s)``, ``a = exp(p - m)``, ``b = exp(s - m)``:
    ``output = prefix_output * a / (a + b) + suffix_output * b / (a + b)`` and ``output_lse = m + log(a + b)``.

    Args:
        output, prefix_output, suffix_output: (T, H, D), one dtype among fp32/fp16/bf16; any strides with the last
            dimension contiguous; any D.
        prefix_lse, suffix_lse: (H, T) fp32 natural-log LSEs, any strides. +inf and -inf both mean "empty" (that
            side contributes nothing); both sides empty gives zeros and LSE -inf.
        output_lse: optional (H, T) fp32, written with the merged LSE.
    """
    key = geometry_key((output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse))
    plan = _MERGE_PLANS.get(key) if key is not None else None
    if plan is not None and use_triton(prefix_output):  # these checks passed for this geometry before
        plan(_plan_tensors(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse))
        return
    _check_merge(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)
    if not use_triton(prefix_output):
        reference.merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)
        return
    num_tokens, num_heads, head_size = prefix_output.shape
    if num_tokens == 0:
        return
    config = merge_tuning.choose_config(num_tokens, num_heads, head_size, prefix_output.element_size())
    plan = bounded_put(_MERGE_PLANS, key, merge_plan(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                                     output_lse, config), _MAX_MERGE_PLANS)
    plan(_plan_tensors(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse))


# Eager fast path: the launch plan of each geometry (every tensor's shape, strides, dtype, device) whose argument
# checks passed; the config is the one merge_tuning chose when the geometry was first seen.
_MAX_MERGE_PLANS = 256
_MERGE_PLANS: dict[tuple, LaunchPlan] = {}


def launch_merge(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse,
                 config: merge_tuning.MergeConfig) -> None:
    """Launch the merge kernel with ``config`` on validated arguments (``bench_merge.py`` sweeps the configs)."""
    if prefix_output.shape[0] == 0:
        return
    merge_plan(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse, config)(
        _plan_tensors(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse))


def _plan_tensors(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse) -> tuple:
    """The tensors a ``merge_plan`` is called with, in the kernel's order (``prefix_lse`` stands in for a missing
    ``output_lse``: never written then)."""
    lse_out = prefix_lse if output_lse is None else output_lse
    return output, lse_out, prefix_output, prefix_lse, suffix_output, suffix_lse


def merge_plan(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse,
               config: merge_tuning.MergeConfig) -> LaunchPlan:
    """The merge launch for tensors of this geometry (at least one token) with ``config``; called with
    ``_plan_tensors(...)`` of them."""
    num_tokens, num_heads, head_size = prefix_output.shape
    block_t, block_h, block_d, head_blocks = merge_tuning.tile_shape(config, num_heads, head_size)
    lse_out = prefix_lse if output_lse is None else output_lse
    out_stride, prefix_stride, suffix_stride = output.stride(), prefix_output.stride(), suffix_output.stride()
    prefix_lse_stride, suffix_lse_stride, out_lse_stride = prefix_lse.stride(), suffix_lse.stride(), lse_out.stride()
    return MERGE_LAUNCHER.plan((cdiv(num_tokens, block_t), head_blocks), (
        num_tokens, out_stride[0], out_stride[1], prefix_stride[0], prefix_stride[1], suffix_stride[0],
        suffix_stride[1], prefix_lse_stride[0], prefix_lse_stride[1], suffix_lse_stride[0], suffix_lse_stride[1],
        out_lse_stride[0], out_lse_stride[1],
    ), dict(
        NUM_HEADS=num_heads, HEAD_SIZE=head_size, HAS_OUT_LSE=output_lse is not None, BLOCK_T=block_t,
        BLOCK_H=block_h, BLOCK_D=block_d, EVICT_FIRST=config.evict_first,
    ), num_warps=config.num_warps)
