"""The append step of ``flash_attn_with_kvcache``: rotary on the new keys (and q), then the new keys and values
written into the cache at positions ``cache_seqlens[b] ..`` with the kernel of ``reshape_and_cache_flash``.

The positions, cache slots and new lengths come from one small Triton launch (``_new_token_slots_kernel``), not
from PyTorch ops: each of those would load its CUDA module lazily on a process's first call (~10 ms apiece on an
H200), which made the first append of a process cost ~90 ms."""
import torch
import triton
import triton.language as tl

from flashserve.kernels._launch import next_power_of_2
from flashserve.kernels.cache import launch_cache_write
from flashserve.kernels.rotary import rotate_in_place


@triton.jit
def _new_token_slots_kernel(seqlens_ptr, block_table_ptr, batch_idx_ptr, positions_ptr, slots_ptr, q_positions_ptr,
                            new_seqlens_ptr, seqlen_new, q_rows, q_step, width, stride_table, block_size,
                            PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, ROTARY: tl.constexpr,
                            BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Sequence ``program_id(0)``: its new tokens' positions (``cache_seqlens[b] + j``) and cache slots, its q rows'
    rotary positions (``cache_seqlens[b] + i * q_step``: ``q_step`` 0 rotates every row at the first new position)
    and its new length. A position outside the block table (or the dense cache's rows) gets slot -1 (not written);
    a block id or row outside the cache gives a slot the write kernel skips."""
    batch = tl.program_id(0)
    start = tl.load(seqlens_ptr + batch)
    tl.store(new_seqlens_ptr + batch, start + seqlen_new)
    offs = tl.arange(0, BLOCK_S)
    in_new = offs < seqlen_new
    positions = start.to(tl.int64) + offs
    if PAGED:
        columns = positions // block_size
        inside = (positions >= 0) & (columns < width)
        blocks = tl.load(block_table_ptr + batch.to(tl.int64) * stride_table + columns, mask=in_new & inside,
                         other=0).to(tl.int64)
        slots = blocks * block_size + positions % block_size
    else:
        row = batch.to(tl.int64)
        if HAS_BATCH_IDX:
            row = tl.load(batch_idx_ptr + batch).to(tl.int64)
        inside = (positions >= 0) & (positions < block_size)
        slots = row * block_size + positions
    out = batch.to(tl.int64) * seqlen_new + offs
    tl.store(slots_ptr + out, tl.where(inside, slots, -1), mask=in_new)
    if ROTARY:
        tl.store(positions_ptr + out, positions, mask=in_new)
        offs_q = tl.arange(0, BLOCK_Q)
        tl.store(q_positions_ptr + batch.to(tl.int64) * q_rows + offs_q, start.to(tl.int64) + offs_q * q_step,
                 mask=offs_q < q_rows)


def append_new_tokens(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, block_table,
                      rotate_q_at_rows: bool, rotary_interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the new keys (and q), write k/v into the cache (the Triton path: the kernels run); returns q (rotated
    copy or the original) and the lengths after the append, (B,) int32. ``seqlens``: (B,) int32 lengths before."""
    batch, seqlen_new, num_heads_k, head_dim = k.shape
    rotary = rotary_cos is not None
    q_rows = q.shape[1]
    device = q.device
    slots = torch.empty(batch * seqlen_new, dtype=torch.int64, device=device)
    positions = torch.empty(batch * seqlen_new if rotary else 1, dtype=torch.int64, device=device)
    q_positions = torch.empty(batch * q_rows if rotary else 1, dtype=torch.int64, device=device)
    new_seqlens = torch.empty(batch, dtype=torch.int32, device=device)
    _new_token_slots_kernel[(batch,)](
        seqlens, block_table if block_table is not None else seqlens,
        cache_batch_idx if cache_batch_idx is not None else seqlens, positions, slots, q_positions, new_seqlens,
        seqlen_new, q_rows, int(rotate_q_at_rows), block_table.shape[1] if block_table is not None else 0,
        block_table.stride(0) if block_table is not None else 0, k_cache.shape[1],
        PAGED=block_table is not None, HAS_BATCH_IDX=cache_batch_idx is not None, ROTARY=rotary,
        BLOCK_S=next_power_of_2(seqlen_new), BLOCK_Q=next_power_of_2(q_rows), num_warps=1)
    if rotary:
        k = k.reshape(-1, num_heads_k, head_dim).clone()
        q = q.reshape(-1, q.shape[2], head_dim).clone()
        if q_rows == seqlen_new and rotate_q_at_rows:
            rotate_in_place(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved, k)
        else:
            rotate_in_place(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
            rotate_in_place(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        q = q.view(batch, -1, q.shape[1], head_dim)
    launch_cache_write(k.reshape(-1, num_heads_k, head_dim), v.reshape(-1, num_heads_k, head_dim), k_cache, v_cache,
                       slots)
    return q, new_seqlens
