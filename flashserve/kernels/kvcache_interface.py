"""``flash_attn_with_kvcache`` (FlashAttention 2's signature): validate, append the new keys/values, then run the
decode kernels of ``decode.py`` (or the PyTorch reference, see ``_dispatch``).

Eager fast path: a plain call (a (B,) length tensor or an int, maybe a block table, nothing appended, no rotary,
leftpad, batch index, ALiBi, window or softcap) of a signature (q's geometry, the scalar arguments) and tensor
geometries that passed every argument check before skips those checks and reuses its launch plan
(``kvcache_plain_calls``): only the index-value checks (``index_checks``, memoised) and the launch remain.
"""
import torch

from flashserve.kernels import decode, pdl
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.decode_checks import check_kvcache_args
from flashserve.kernels.decode_launch import decode_plan
from flashserve.kernels.kvcache_append import append_new_tokens
from flashserve.kernels.kvcache_plain_calls import PLAIN_CALLS, remember
from flashserve.kernels.scratch import SCRATCH
from flashserve.kernels.reference import decode as reference


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q over a KV cache, after appending new keys/values into it in place (FlashAttention's API).

    Args:
        q: (B, Sq, H, D) fp16/bf16/fp32 (fp32 runs with IEEE fp32 dots), last dimension contiguous; D <= 256.
        k_cache, v_cache: paged (num_blocks, page_size, Hk, D) with ``block_table``, any page_size >= 1; or dense
            (B_cache, max_seqlen, Hk, D), sequence b in row ``cache_batch_idx[b]`` or, without it, row b
            (B_cache >= B). Any strides with the last dimension contiguous. ``H % Hk == 0``.
        k, v: optional (B, Snew, Hk, D) new tokens, written into the caches in place at positions
            ``cache_seqlens[b] .. cache_seqlens[b] + Snew - 1`` before attention (requires ``cache_seqlens``).
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2), rotary_dim <= D, seqlen_ro >= the cache
            capacity (max_blocks * page_size, or the dense cache's length) (requires k). New keys are
            rotated at their positions; q at ``cache_seqlens[b] + i`` when causal or windowed, else all of q at
            ``cache_seqlens[b]``. ``rotary_interleaved``: pairs (2j, 2j+1), else GPT-NeoX halves.
        cache_seqlens: int or (B,) int32: tokens already in the cache (None: the whole cache capacity); with
            ``cache_leftpad``, the row where the sequence ends (the pad included), as FlashAttention 2.
        cache_batch_idx: optional (B,) int32 rows of a dense cache (not with block_table).
        cache_leftpad: optional (B,) int32, dense caches only (FlashAttention 2): sequence b's keys are the rows
            ``cache_leftpad[b] .. cache_seqlens[b] - 1`` and the new k/v go to rows ``cache_seqlens[b] ..``. The
            causal / window alignment and ALiBi count keys from the pad (the pad is invisible); rotary positions
            are the cache rows (k and q rotated at ``cache_seqlens[b] ..``), as FlashAttention 2 does.
        block_table: (B, max_blocks) int32: token t of sequence b is at block ``block_table[b, t // page_size]``,
            row ``t % page_size``.
        softmax_scale: default D ** -0.5. causal: bottom-right aligned (Sq >= 1). window_size: (left, right).
        softcap: > 0 applies ``softcap * tanh(score / softcap)``. alibi_slopes: (H,) or (B, H) fp32.
        num_splits: 0 picks a split count, 1 disables splitting, n > 1 forces n splits (at most 64).
        return_softmax_lse: also return the fp32 natural-log LSE (B, H, Sq).

    Index values (``cache_seqlens`` (+ Snew) within the capacity — the error names ``block_table`` when paged —,
    block ids within ``k_cache``'s blocks, ``cache_batch_idx`` within its rows, ``0 <= cache_leftpad <=
    cache_seqlens``) are checked: an int ``cache_seqlens`` on the host for free; index tensors by one check launch
    and one synchronisation (as FlashAttention 2), except while a CUDA graph is being captured and except when the
    same index tensor objects, unchanged since (PyTorch's version counters), passed the same check before (the
    layers of one decode step pay one check; not for inference tensors; see ``checked_indices``). The kernels
    clamp or mask every index anyway, so no value makes them read or write outside the tensors.

    Returns:
        out (B, Sq, H, D) in q's dtype, and the LSE when asked. A row with no visible key gives zeros and LSE -inf.
    """
    plain_key = None  # a plain call of a plain q and a length tensor or int: its key (see kvcache_plain_calls)
    lengths_type = type(cache_seqlens)
    if (k is None and v is None and rotary_cos is None and rotary_sin is None and cache_batch_idx is None
            and cache_leftpad is None and alibi_slopes is None and softcap == 0.0 and type(num_splits) is int
            and num_splits >= 0 and type(window_size) is tuple and window_size == _NO_WINDOW
            and type(q) is torch.Tensor and (lengths_type is torch.Tensor or lengths_type is int)):
        plain_key = (q.shape, q.stride(), q.dtype, q.device, cache_seqlens if lengths_type is int else None,
                     block_table is None, type(softmax_scale), softmax_scale, not causal, num_splits,
                     not return_softmax_lse, decode.FUSED_COMBINE_MAX_GROUPS, pdl.generation)  # (not x: bool(x))
        known = PLAIN_CALLS.get(plain_key)
        if known is not None and use_triton(q):
            result = known.launch(q, k_cache, v_cache, cache_seqlens, block_table)
            if result is not None:
                return result if return_softmax_lse else result[0]
    window_left, window_right, capacity = check_kvcache_args(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
        block_table, window_size, softcap, alibi_slopes, num_splits)
    if not use_triton(q):
        out, lse = reference.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, block_table,
            softmax_scale, causal, (window_left, window_right), softcap, rotary_interleaved, alibi_slopes,
            cache_leftpad=cache_leftpad)
        return (out, lse) if return_softmax_lse else out
    lengths = capacity if cache_seqlens is None else cache_seqlens
    if type(lengths) is int:
        lengths = SCRATCH.constant(q.device, q.shape[0], lengths)
    seqlens_k = lengths
    if k is not None:
        q, seqlens_k = append_new_tokens(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, lengths,
                                         cache_batch_idx, block_table,
                                         causal or (window_left, window_right) != (-1, -1), rotary_interleaved)
    if causal:
        window_right = 0
    plan = decode_plan(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, softmax_scale,
                       softcap, window_left, window_right, capacity, num_splits, return_softmax_lse, cache_leftpad)
    if plain_key is not None:  # the checks passed: later calls of this signature take the fast path
        remember(plain_key, k_cache, v_cache, cache_seqlens, block_table, capacity, plan)
    out, lse = plan(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, cache_leftpad, None)
    return (out, lse) if return_softmax_lse else out


_NO_WINDOW = (-1, -1)
