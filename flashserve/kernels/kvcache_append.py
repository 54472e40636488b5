"""The append step of ``flash_attn_with_kvcache``: rotary on the new keys (and q), then the new keys and values
written into the cache at positions ``cache_seqlens[b] ..`` with the kernel of ``reshape_and_cache_flash``."""
import torch

from flashserve.kernels.cache import launch_cache_write
from flashserve.kernels.rotary import rotate_in_place


def append_new_tokens(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, block_table,
                      rotate_q_at_rows: bool, rotary_interleaved: bool):
    """Rotate the new keys (and q), write k/v into the cache; returns q (rotated copy or the original)."""
    batch, seqlen_new, num_heads_k, head_dim = k.shape
    new_positions = seqlens.long()[:, None] + torch.arange(seqlen_new, device=q.device)  # (B, Snew)
    if rotary_cos is not None:
        k = k.reshape(-1, num_heads_k, head_dim).clone()
        q = q.reshape(-1, q.shape[2], head_dim).clone()
        q_offsets = torch.arange(q.shape[0] // batch, device=q.device) * int(rotate_q_at_rows)
        q_positions = (seqlens.long()[:, None] + q_offsets).reshape(-1)
        if q_positions.shape == new_positions.reshape(-1).shape and rotate_q_at_rows:
            rotate_in_place(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved, k)
        else:
            rotate_in_place(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
            rotate_in_place(k, rotary_cos, rotary_sin, new_positions.reshape(-1), rotary_interleaved)
        q = q.view(batch, -1, q.shape[1], head_dim)
    launch_cache_write(k.reshape(-1, num_heads_k, head_dim), v.reshape(-1, num_heads_k, head_dim), k_cache, v_cache,
                       new_token_slots(new_positions, k_cache, block_table, cache_batch_idx).reshape(-1))
    return q


def new_token_slots(new_positions, k_cache, block_table, cache_batch_idx):
    """(B, Snew) int64 cache slots of the new tokens (a dense cache counts as blocks of its length). A position
    outside the block table (or the dense cache's length) gives slot -1 (not written) and never reaches ``gather``
    out of range; a block id or row outside the cache gives a slot the write kernel skips."""
    block_size = k_cache.shape[1]
    if block_table is not None:
        width = block_table.shape[1]
        columns = new_positions // block_size
        blocks = block_table.long().gather(1, columns.clamp(0, width - 1))
        slots = blocks * block_size + new_positions % block_size
        inside = (columns >= 0) & (columns < width)
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else \
            torch.arange(new_positions.shape[0], device=new_positions.device)
        slots = rows[:, None] * block_size + new_positions
        inside = (new_positions >= 0) & (new_positions < block_size)
    return torch.where(inside, slots, -1)
