"""Merging two attention states by their log-sum-exp (split-KV decode, chunked prefill, cascade attention).

``lse_weights`` and ``weighted`` are the one combine code path of the library: ``merge_attn_states`` uses them
with two states per (token, head), the split-KV decode combine kernel (``decode.py``) with one state per split.
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.reference import decode as reference

_MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def lse_weights(lse):
    """Weights of N attention states from their LSEs ``lse`` [R, N] fp32 (states along the last axis).

    Returns (weights [R, N], merged_lse [R]): the merged output is ``sum_n weights[:, n] * out_n``. An infinite
    LSE (+inf or -inf) means "empty" and gets weight 0; a row whose states are all empty gets all-zero weights and
    merged LSE -inf, so it merges to zeros, never NaN.
    """
    lse = tl.where(lse == float("inf"), float("-inf"), lse)
    lse_max = tl.max(lse, axis=1)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lse - lse_max[:, None])
    total = tl.sum(weights, axis=1)
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    return weights / total[:, None], tl.where(empty, float("-inf"), lse_max + tl.log(total))


@triton.jit
def weighted(out, weight):
    """``out * weight``, exactly 0 where the weight is 0 (an empty state's output is never read into a sum)."""
    return tl.where(weight > 0.0, out * weight, 0.0)


@triton.jit
def _merge_kernel(
    out_ptr, out_lse_ptr, prefix_ptr, prefix_lse_ptr, suffix_ptr, suffix_lse_ptr,
    num_heads, head_size,
    stride_out_t, stride_out_h, stride_prefix_t, stride_prefix_h, stride_suffix_t, stride_suffix_h,
    stride_plse_h, stride_plse_t, stride_slse_h, stride_slse_t, stride_olse_h, stride_olse_t,
    HAS_OUT_LSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_mask = heads < num_heads
    mask = head_mask[:, None] & (dims < head_size)[None, :]
    prefix_lse = tl.load(prefix_lse_ptr + heads * stride_plse_h + token * stride_plse_t, mask=head_mask, other=0.0)
    suffix_lse = tl.load(suffix_lse_ptr + heads * stride_slse_h + token * stride_slse_t, mask=head_mask, other=0.0)
    prefix = tl.load(prefix_ptr + token * stride_prefix_t + heads[:, None] * stride_prefix_h + dims[None, :],
                     mask=mask, other=0.0).to(tl.float32)
    suffix = tl.load(suffix_ptr + token * stride_suffix_t + heads[:, None] * stride_suffix_h + dims[None, :],
                     mask=mask, other=0.0).to(tl.float32)
    weights, lse = lse_weights(tl.join(prefix_lse, suffix_lse))
    prefix_weight, suffix_weight = tl.split(weights)
    out = weighted(prefix, prefix_weight[:, None]) + weighted(suffix, suffix_weight[:, None])
    tl.store(out_ptr + token * stride_out_t + heads[:, None] * stride_out_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT_LSE:
        tl.store(out_lse_ptr + heads * stride_olse_h + token * stride_olse_t, lse, mask=head_mask)


def _check_merge(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse) -> None:
    _validate.check_tensor("prefix_output", prefix_output, 3, _MERGE_DTYPES)
    device = prefix_output.device
    shape = tuple(prefix_output.shape)
    for name, tensor in (("output", output), ("suffix_output", suffix_output)):
        _validate.check_tensor(name, tensor, 3, (prefix_output.dtype,), device)
        _validate.check_shape(name, tensor, shape)
    for name, tensor in (("output", output), ("prefix_output", prefix_output), ("suffix_output", suffix_output)):
        _validate.check_last_dim_contiguous(name, tensor)
    lse_shape = (shape[1], shape[0])
    lses = [("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)]
    if output_lse is not None:
        lses.append(("output_lse", output_lse))
    for name, tensor in lses:
        _validate.check_tensor(name, tensor, 2, (torch.float32,), device)
        _validate.check_shape(name, tensor, lse_shape)


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
    _check_merge(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)
    if not use_triton(prefix_output):
        reference.merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)
        return
    num_tokens, num_heads, head_size = prefix_output.shape
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d))
    lse_out = output_lse if output_lse is not None else prefix_lse
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _merge_kernel[grid](
        output, lse_out, prefix_output, prefix_lse, suffix_output, suffix_lse,
        num_heads, head_size,
        output.stride(0), output.stride(1), prefix_output.stride(0), prefix_output.stride(1),
        suffix_output.stride(0), suffix_output.stride(1),
        prefix_lse.stride(0), prefix_lse.stride(1), suffix_lse.stride(0), suffix_lse.stride(1),
        lse_out.stride(0), lse_out.stride(1),
        HAS_OUT_LSE=output_lse is not None, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
