"""Argument checks of ``flash_attn_with_kvcache`` (ValueError naming the argument). Kept apart from the kernels so
that ``decode.py`` stays about the kernels and their launch."""
import torch

from flashserve.kernels import _validate
from flashserve.kernels.index_checks import check_kvcache_values


_NO_WINDOW = (-1, -1)


def check_kvcache_args(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                       cache_leftpad, block_table, window_size, softcap, alibi_slopes, num_splits):
    """Validate flash_attn_with_kvcache's arguments; returns ``(window_left, window_right, capacity)``, the
    capacity being the most tokens a sequence of the cache can hold.

    Then the value checks of ``index_checks`` (one synchronisation, none while a CUDA graph is being captured or
    for index tensors already checked unchanged). A plain call repeated with the same geometry skips these checks
    (``kvcache_plain_calls``) but not the value checks.
    """
    _validate.check_tensor("q", q, 4, _validate.ATTENTION_DTYPES)
    device, dtype = q.device, q.dtype
    batch, seqlen_q, num_heads, head_dim = q.shape
    if head_dim > 256:
        raise ValueError(f"q head dimension must be <= 256, got {head_dim}")
    _validate.check_tensor("k_cache", k_cache, 4, (dtype,), device)
    _validate.check_tensor("v_cache", v_cache, 4, (dtype,), device)
    _validate.check_shape("v_cache", v_cache, k_cache.shape)
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head dimension must equal q's ({head_dim}), got shape {tuple(k_cache.shape)}")
    if num_heads % k_cache.shape[2]:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of k_cache heads ({k_cache.shape[2]})")
    _validate.check_last_dim_contiguous("q", q)
    _validate.check_last_dim_contiguous("k_cache", k_cache)
    _validate.check_last_dim_contiguous("v_cache", v_cache)
    if cache_leftpad is not None:
        if block_table is not None:
            raise ValueError("cache_leftpad must be None with a paged cache (block_table given), as FlashAttention 2")
        _validate.check_index_tensor("cache_leftpad", cache_leftpad, 1, device)
        _validate.check_shape("cache_leftpad", cache_leftpad, (batch,))
    if block_table is not None:
        _validate.check_index_tensor("block_table", block_table, 2, device)
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows, got shape {tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx must be None with a paged cache (block_table given)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        if cache_batch_idx is not None:
            _validate.check_index_tensor("cache_batch_idx", cache_batch_idx, 1, device)
            _validate.check_shape("cache_batch_idx", cache_batch_idx, (batch,))
        elif k_cache.shape[0] < batch:  # FA2: the cache's batch is its own, sequence b uses row b
            raise ValueError(f"k_cache must have at least {batch} rows (dense cache without cache_batch_idx), "
                             f"got shape {tuple(k_cache.shape)}")
        capacity = k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    seqlen_new = 0
    if k is not None:
        expected = (batch, k.shape[1] if k.dim() == 4 else -1, k_cache.shape[2], head_dim)
        for name, tensor in (("k", k), ("v", v)):
            _validate.check_tensor(name, tensor, 4, (dtype,), device)
            _validate.check_shape(name, tensor, expected)
            _validate.check_last_dim_contiguous(name, tensor)
        if cache_seqlens is None:
            raise ValueError("cache_seqlens must be given when k and v are appended")
        seqlen_new = k.shape[1]
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos needs k and v (rotary is applied to the appended keys)")
        _validate.check_tensor("rotary_cos", rotary_cos, 2, _validate.ATTENTION_DTYPES, device)
        _validate.check_tensor("rotary_sin", rotary_sin, 2, (rotary_cos.dtype,), device)
        _validate.check_shape("rotary_sin", rotary_sin, rotary_cos.shape)
        _validate.check_last_dim_contiguous("rotary_cos", rotary_cos)
        _validate.check_last_dim_contiguous("rotary_sin", rotary_sin)
        if not 0 < 2 * rotary_cos.shape[1] <= head_dim:
            raise ValueError(f"rotary_cos must have rotary_dim / 2 columns with rotary_dim <= {head_dim}, "
                             f"got shape {tuple(rotary_cos.shape)}")
        if rotary_cos.shape[0] < capacity:  # FlashAttention's rule: a row for every position the cache can hold
            raise ValueError(f"rotary_cos must have at least {capacity} rows (the cache capacity), "
                             f"got shape {tuple(rotary_cos.shape)}")
    if isinstance(cache_seqlens, torch.Tensor):
        _validate.check_index_tensor("cache_seqlens", cache_seqlens, 1, device)
        _validate.check_shape("cache_seqlens", cache_seqlens, (batch,))
    elif cache_seqlens is not None:
        if type(cache_seqlens) is not int or not 0 <= cache_seqlens <= capacity - seqlen_new:
            raise ValueError(f"cache_seqlens must be an int in [0, {capacity - seqlen_new}] or a (B,) int32 "
                             f"tensor, got {cache_seqlens!r}")
    _validate.check_alibi_slopes(alibi_slopes, batch, num_heads, device)
    if type(num_splits) is not int or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    _validate.check_softcap(softcap)
    if type(window_size) is tuple and window_size == _NO_WINDOW:
        window = (-1, -1)
    else:
        window = _validate.check_window_size(window_size)
    check_kvcache_values(batch, capacity if cache_seqlens is None else cache_seqlens, seqlen_new, capacity, k_cache,
                         block_table, cache_batch_idx, cache_leftpad)
    return (*window, capacity)
