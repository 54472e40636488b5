"""Plain-PyTorch references of the decode-side kernels: attention over a (paged or dense) KV cache with in-place
append (``flash_attn_with_kvcache``), ``merge_attn_states`` and ``reshape_and_cache_flash``.

The attention itself is ``attention_batch`` (one call per sequence, since cache lengths differ); this file only
handles the cache: appending new tokens, rotary, and gathering each sequence's keys and values.
"""
import torch

from flashserve.kernels.reference.attention import attention_batch
from flashserve.kernels.reference.layers import rotary_in_place


def _seqlens_list(cache_seqlens, batch: int) -> list[int]:
    if isinstance(cache_seqlens, torch.Tensor):
        return [int(n) for n in cache_seqlens.tolist()]
    return [int(cache_seqlens)] * batch


def _token_rows(cache: torch.Tensor, b: int, positions: torch.Tensor, block_table, cache_batch_idx):
    """(block index, row index) in ``cache`` of sequence b's tokens at ``positions`` (1-D long tensor)."""
    if block_table is not None:
        page_size = cache.shape[1]
        return block_table[b].long()[positions // page_size], positions % page_size
    batch_row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
    return torch.full_like(positions, batch_row), positions


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, upcast=True, cache_leftpad=None):
    """Reference of ``flashserve.kernels.flash_attn_with_kvcache`` (same arguments but ``num_splits``;
    ``cache_leftpad`` last). Appends k/v into the caches in place. Returns out (B, Sq, H, D) in q's dtype and
    lse (B, H, Sq) fp32. ``upcast=False`` runs the attention in the input precision (FlashAttention's baseline).
    With ``cache_leftpad`` sequence b's keys are the dense cache rows ``cache_leftpad[b] .. cache_seqlens[b] + Snew
    - 1``; rotary positions stay the cache rows."""
    batch, seqlen_q = q.shape[0], q.shape[1]
    if cache_seqlens is None:
        capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
        cache_seqlens = capacity
    seqlens = _seqlens_list(cache_seqlens, batch)
    seqlen_new = k.shape[1] if k is not None else 0
    q = q.clone()
    for b in range(batch):
        new_positions = torch.arange(seqlen_new, device=q.device) + seqlens[b]
        if rotary_cos is not None:
            k_b = k[b].clone()
            rotary_in_place(k_b, rotary_cos, rotary_sin, new_positions, rotary_interleaved)
            moving = causal or window_size != (-1, -1)
            q_positions = torch.arange(seqlen_q, device=q.device) * int(moving) + seqlens[b]
            rotary_in_place(q[b], rotary_cos, rotary_sin, q_positions, rotary_interleaved)
        else:
            k_b = k[b] if k is not None else None
        if k is not None:
            blocks, rows = _token_rows(k_cache, b, new_positions, block_table, cache_batch_idx)
            k_cache[blocks, rows] = k_b
            v_cache[blocks, rows] = v[b]
    num_heads, head_dim = q.shape[2], q.shape[3]
    outs = [q.new_empty((0, seqlen_q, num_heads, head_dim))]
    lses = [torch.empty((0, num_heads, seqlen_q), dtype=torch.float32, device=q.device)]
    pads = _seqlens_list(cache_leftpad if cache_leftpad is not None else 0, batch)
    for b in range(batch):
        positions = torch.arange(pads[b], seqlens[b] + seqlen_new, device=q.device)
        blocks, rows = _token_rows(k_cache, b, positions, block_table, cache_batch_idx)
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = attention_batch(q[b:b + 1], k_cache[blocks, rows][None], v_cache[blocks, rows][None],
                                   softmax_scale, causal, window_size, softcap, slopes, upcast)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None) -> None:
    """Reference of ``flashserve.kernels.merge.merge_attn_states``: writes ``output`` (and ``output_lse``)."""
    p_lse = prefix_lse.float().masked_fill(torch.isinf(prefix_lse), float("-inf")).t()  # (T, H)
    s_lse = suffix_lse.float().masked_fill(torch.isinf(suffix_lse), float("-inf")).t()
    lse_max = torch.maximum(p_lse, s_lse)
    lse_max = lse_max.masked_fill(lse_max == float("-inf"), 0.0)
    p_weight, s_weight = torch.exp(p_lse - lse_max), torch.exp(s_lse - lse_max)
    total = p_weight + s_weight
    empty = total == 0
    total = total.masked_fill(empty, 1.0)
    p_weight, s_weight = (p_weight / total).unsqueeze(-1), (s_weight / total).unsqueeze(-1)
    merged = torch.where(p_weight > 0, prefix_output.float() * p_weight, 0.0)
    merged = merged + torch.where(s_weight > 0, suffix_output.float() * s_weight, 0.0)
    output.copy_(merged.to(output.dtype))
    if output_lse is not None:
        output_lse.copy_((lse_max + torch.log(total)).masked_fill(empty, float("-inf")).t())


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Reference of ``flashserve.kernels.cache.reshape_and_cache_flash``: token t to slot ``slot_mapping[t]``."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = key_cache.shape[1]
    blocks, rows = slots // block_size, slots % block_size
    key_cache[blocks, rows] = key[keep].to(key_cache.dtype)
    value_cache[blocks, rows] = value[keep].to(value_cache.dtype)
