"""Rotary position embedding applied in place, from cos/sin tables and per-token positions.

Two pairings of the first ``rotary_dim`` features: GPT-NeoX halves (``x[j]`` with ``x[j + rotary_dim/2]``) and
interleaved pairs (``x[2j]`` with ``x[2j+1]``). For each pair ``(x1, x2)`` at position ``p``:
``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin`` with ``cos = cos_table[p, j]``, ``sin = sin_table[p, j]``.
Features past ``rotary_dim`` are untouched. Math in fp32, stored in the tensor's dtype.
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import next_power_of_2
from flashserve.kernels.reference import layers as reference


@triton.jit
def pair_columns(pairs, half, INTERLEAVED: tl.constexpr):
    """The columns (first, second) of rotary pairs ``pairs``: (2j, 2j+1) interleaved, else (j, j + half)."""
    if INTERLEAVED:
        return 2 * pairs, 2 * pairs + 1
    return pairs, pairs + half


@triton.jit
def rotate_pairs(x1, x2, cos, sin):
    """The rotated pair halves [R, P] (fp32) at angles with cosines/sines [P]."""
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, num_heads, token, cos, sin, half,
                  INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_R)
    mask = (heads < num_heads)[:, None] & (pairs < half)[None, :]
    first, second = pair_columns(pairs, half, INTERLEAVED)
    row = x_ptr + token * stride_t + heads[:, None] * stride_h
    x1 = tl.load(row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    out1, out2 = rotate_pairs(x1, x2, cos, sin)
    tl.store(row + first[None, :], out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(row + second[None, :], out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_positions"])
def _rotary_kernel(
    x_ptr, y_ptr, cos_ptr, sin_ptr, positions_ptr, num_positions,
    x_heads, y_heads, half, stride_x_t, stride_x_h, stride_y_t, stride_y_h, stride_cos, stride_sin,
    INTERLEAVED: tl.constexpr, BLOCK_HX: tl.constexpr, BLOCK_HY: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    position = tl.minimum(tl.maximum(position, 0), num_positions - 1)  # never a row outside the tables
    pairs = tl.arange(0, BLOCK_R)
    cos = tl.load(cos_ptr + position * stride_cos + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_sin + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _rotate_heads(x_ptr, stride_x_t, stride_x_h, x_heads, token, cos, sin, half, INTERLEAVED, BLOCK_HX, BLOCK_R)
    else:
        _rotate_heads(y_ptr, stride_y_t, stride_y_h, y_heads, token, cos, sin, half, INTERLEAVED, BLOCK_HY, BLOCK_R)


def rotate_in_place(x, cos, sin, positions, interleaved: bool, y=None) -> None:
    """Launch the rotary kernel on ``x`` (T, H, D) and optionally ``y`` (T, Hy, D); no validation (internal).

    ``cos``/``sin``: (P, rotary_dim / 2) views (row stride free, last dimension contiguous); ``positions``: (T,).
    """
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return
    half = cos.shape[1]
    y_arg = y if y is not None else x
    grid = (num_tokens, 2 if y is not None else 1)
    _rotary_kernel[grid](
        x, y_arg, cos, sin, positions, cos.shape[0],
        x.shape[1], y_arg.shape[1], half, x.stride(0), x.stride(1), y_arg.stride(0), y_arg.stride(1),
        cos.stride(0), sin.stride(0),
        INTERLEAVED=interleaved, BLOCK_HX=next_power_of_2(x.shape[1]),
        BLOCK_HY=next_power_of_2(y_arg.shape[1]), BLOCK_R=next_power_of_2(half), num_warps=4,
    )


def apply_rotary(q: torch.Tensor, k: torch.Tensor | None, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                 is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k in place (vLLM's ``rotary_embedding`` convention) and return them.

    Args:
        q: (T, H, D); k: (T, Hk, D) or None; fp32/fp16/bf16, last dimension contiguous, other strides free.
        cos_sin_cache: (max_position, rotary_dim) float: cos in the first rotary_dim/2 columns, sin in the rest;
            ``rotary_dim`` even and <= D.
        positions: (T,) int32/int64 position of each token, contiguous; not range-checked on the host (no
            synchronisation): the kernel clamps a position into the table's rows.
        is_neox: True pairs the two halves of the rotary features (GPT-NeoX, Llama/Qwen in HF), False pairs
            neighbours (GPT-J).
    """
    _validate.check_tensor("q", q, 3, _validate.ATTENTION_DTYPES)
    device = q.device
    _validate.check_last_dim_contiguous("q", q)
    if k is not None:
        _validate.check_tensor("k", k, 3, (q.dtype,), device)
        _validate.check_last_dim_contiguous("k", k)
        if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
            raise ValueError(f"k must have shape ({q.shape[0]}, Hk, {q.shape[2]}), got {tuple(k.shape)}")
    _validate.check_tensor("cos_sin_cache", cos_sin_cache, 2, _validate.ATTENTION_DTYPES, device)
    _validate.check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or not 0 < rotary_dim <= q.shape[2]:
        raise ValueError(f"cos_sin_cache must have an even rotary_dim <= head size {q.shape[2]} columns, "
                         f"got {rotary_dim}")
    _validate.check_tensor("positions", positions, 1, (torch.int32, torch.int64), device)
    _validate.check_last_dim_contiguous("positions", positions)
    if positions.shape[0] != q.shape[0]:
        raise ValueError(f"positions must have {q.shape[0]} entries (one per token), got {positions.shape[0]}")
    cos, sin = cos_sin_cache[:, : rotary_dim // 2], cos_sin_cache[:, rotary_dim // 2:]
    if not use_triton(q):
        reference.rotary_in_place(q, cos, sin, positions, not is_neox)
        if k is not None:
            reference.rotary_in_place(k, cos, sin, positions, not is_neox)
        return q, k
    rotate_in_place(q, cos, sin, positions, not is_neox, k)
    return q, k
