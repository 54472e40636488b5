"""Writing new keys and values into a paged KV cache: ``reshape_and_cache_flash`` (vLLM's signature)."""

import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import CachedLauncher, head_block_sizes
from flashserve.kernels.index_checks import check_slots
from flashserve.kernels.reference import decode as reference


@triton.jit(do_not_specialize=["num_slots"])
def _cache_write_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, num_slots,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_kc_block, stride_kc_row, stride_kc_head, stride_vc_block, stride_vc_row, stride_vc_head,
    NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (slot >= 0) & (slot < num_slots):  # a slot past the cache is skipped like padding
        block = slot // BLOCK_SIZE
        row = slot % BLOCK_SIZE
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < NUM_HEADS)[:, None] & (dims < HEAD_SIZE)[None, :]
        key = tl.load(key_ptr + token * stride_key_t + heads[:, None] * stride_key_h + dims[None, :], mask=mask)
        value = tl.load(value_ptr + token * stride_value_t + heads[:, None] * stride_value_h + dims[None, :],
                        mask=mask)
        key_dst = key_cache_ptr + block * stride_kc_block + row * stride_kc_row
        value_dst = value_cache_ptr + block * stride_vc_block + row * stride_vc_row
        tl.store(key_dst + heads[:, None] * stride_kc_head + dims[None, :],
                 key.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_dst + heads[:, None] * stride_vc_head + dims[None, :],
                 value.to(value_cache_ptr.dtype.element_ty), mask=mask)


CACHE_WRITE_LAUNCHER = CachedLauncher(_cache_write_kernel)  # (no Triton argument binding per launch)


def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token ``t``'s key and value into the caches at ``slot_mapping[t]``, in place.

    Args:
        key, value: (T, Hk, D), last dimension contiguous.
        key_cache, value_cache: (num_blocks, block_size, Hk, D), same dtype as key; any strides with the last
            dimension contiguous (views of a bigger buffer are fine).
        slot_mapping: (T,) int64; token ``t`` goes to block ``slot // block_size``, row ``slot % block_size``.
            A negative slot is padding: that token is skipped. A slot >= num_blocks * block_size raises
            ValueError (a host check: one synchronisation, skipped while a CUDA graph is being captured; the kernel
            skips such a slot anyway, so nothing is written outside the caches).
    """
    _validate.check_tensor("key", key, 3, _validate.ATTENTION_DTYPES)
    device, dtype, shape = key.device, key.dtype, key.shape
    _validate.check_tensor("value", value, 3, (dtype,), device)
    _validate.check_shape("value", value, shape)
    _validate.check_tensor("key_cache", key_cache, 4, (dtype,), device)
    cache_shape = key_cache.shape
    if cache_shape[2:] != shape[1:]:
        raise ValueError(f"key_cache must have (Hk, D) = {tuple(shape[1:])} in its last two dimensions, "
                         f"got shape {tuple(cache_shape)}")
    _validate.check_tensor("value_cache", value_cache, 4, (dtype,), device)
    _validate.check_shape("value_cache", value_cache, cache_shape)
    _validate.check_index_tensor("slot_mapping", slot_mapping, 1, device, torch.int64)
    num_tokens, num_heads, head_size = shape
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must have {num_tokens} entries (one per token), got {slot_mapping.shape[0]}")
    _validate.check_last_dim_contiguous("key", key)
    _validate.check_last_dim_contiguous("value", value)
    _validate.check_last_dim_contiguous("key_cache", key_cache)
    _validate.check_last_dim_contiguous("value_cache", value_cache)
    check_slots(slot_mapping, cache_shape[0] * cache_shape[1])
    if not use_triton(key):
        reference.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping)
        return
    launch_cache_write(key, value, key_cache, value_cache, slot_mapping)


def launch_cache_write(key, value, key_cache, value_cache, slot_mapping) -> None:
    """The kernel launch of ``reshape_and_cache_flash`` on validated arguments (no checks, no synchronisation;
    slots outside [0, num_blocks * block_size) are skipped)."""
    num_tokens, num_heads, head_size = key.shape
    cache_shape = key_cache.shape
    if num_tokens == 0:
        return
    block_h, block_d, head_blocks = head_block_sizes(num_heads, head_size, 4096)
    key_stride, value_stride = key.stride(), value.stride()
    kc_stride, vc_stride = key_cache.stride(), value_cache.stride()
    CACHE_WRITE_LAUNCHER((num_tokens, head_blocks), (
        key, value, key_cache, value_cache, slot_mapping, cache_shape[0] * cache_shape[1],
        key_stride[0], key_stride[1], value_stride[0], value_stride[1],
        kc_stride[0], kc_stride[1], kc_stride[2], vc_stride[0], vc_stride[1], vc_stride[2],
    ), dict(NUM_HEADS=num_heads, HEAD_SIZE=head_size, BLOCK_SIZE=cache_shape[1], BLOCK_H=block_h, BLOCK_D=block_d),
        num_warps=4)
