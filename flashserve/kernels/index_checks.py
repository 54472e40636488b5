"""Range checks of the values inside index tensors (block ids, lengths, slots, rows), for the public kernel functions.

Shapes and dtypes are checked without touching the device (``_validate``); values live on the GPU, so checking them
costs one host synchronisation per call (FlashAttention 2 pays the same for its ``block_table`` bound). Each check
builds a 0-dim bool tensor "this is wrong" on the device; ``raise_first`` copies them all to the host at once and
raises ValueError with the message of the first that holds. The checks are skipped while a CUDA graph is being
captured (a synchronisation would break the capture): there, as on the engine's unchecked paths, the kernels' own
clamps and masks are what keep every access inside its tensor.
"""
import torch


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (no synchronisation allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def raise_first(checks: list[tuple[torch.Tensor, str]]) -> None:
    """``checks``: (0-dim bool tensor that is True when the input is wrong, error message). One synchronisation for
    all of them; raises ValueError(message) for the first that is True."""
    if not checks:
        return
    flags = torch.stack([bad.reshape(()) for bad, _ in checks]).tolist()
    for flag, (_, message) in zip(flags, checks):
        if flag:
            raise ValueError(message)


def outside(values: torch.Tensor, low: int, high: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """0-dim bool: any of ``values`` (restricted to ``where``) outside [low, high)."""
    bad = (values < low) | (values >= high)
    if where is not None:
        bad = bad & where
    return bad.any()


def used_blocks_mask(block_table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
    """(B, max_blocks) bool: the block-table entries that hold one of the first ``seqlens[b]`` tokens."""
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    return columns[None, :] * page_size < seqlens[:, None]


def block_table_checks(block_table: torch.Tensor, seqlens: torch.Tensor, num_blocks: int, page_size: int,
                       lengths_name: str) -> list[tuple[torch.Tensor, str]]:
    """``seqlens`` (B,) (the tokens each sequence reads or writes) within the table's capacity and the block ids
    they use within [0, num_blocks)."""
    capacity = block_table.shape[1] * page_size
    return [
        ((seqlens > capacity).any(),
         f"block_table is too short: {block_table.shape[1]} blocks of {page_size} tokens hold {capacity} tokens, "
         f"fewer than {lengths_name}"),
        (outside(block_table, 0, num_blocks, used_blocks_mask(block_table, seqlens, page_size)),
         f"block_table entries must be block ids in [0, {num_blocks}) (the cache's blocks)"),
    ]


def check_kvcache_values(cache_seqlens, seqlen_new: int, capacity: int, k_cache: torch.Tensor, block_table,
                         cache_batch_idx, cache_leftpad) -> None:
    """The value checks of ``flash_attn_with_kvcache`` (``cache_seqlens`` a (B,) int32 tensor or an int)."""
    if capturing():
        return
    checks = []
    if isinstance(cache_seqlens, torch.Tensor):
        ends = cache_seqlens + seqlen_new
        checks.append(((cache_seqlens < 0).any(), "cache_seqlens must be >= 0"))
        if block_table is not None:
            checks += block_table_checks(block_table, ends, k_cache.shape[0], k_cache.shape[1],
                                         "cache_seqlens + the new tokens")
        else:
            checks.append(((ends > capacity).any(), f"cache_seqlens + the new tokens must be <= {capacity} "
                                                    f"(k_cache's length)"))
        if cache_leftpad is not None:
            checks.append((((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).any(),
                           "cache_leftpad must be in [0, cache_seqlens] for every sequence"))
    elif block_table is not None:  # an int length: its bound is known on the host, the block ids are not
        seqlens = torch.full((block_table.shape[0],), cache_seqlens + seqlen_new, device=block_table.device)
        checks += block_table_checks(block_table, seqlens, k_cache.shape[0], k_cache.shape[1],
                                     "cache_seqlens + the new tokens")
    elif cache_leftpad is not None:
        checks.append((outside(cache_leftpad, 0, cache_seqlens + 1),
                       "cache_leftpad must be in [0, cache_seqlens] for every sequence"))
    if cache_batch_idx is not None:
        checks.append((outside(cache_batch_idx, 0, k_cache.shape[0]),
                       f"cache_batch_idx entries must be rows of k_cache, in [0, {k_cache.shape[0]})"))
    raise_first(checks)


def check_varlen_values(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q, cu_seqlens_k, seqused_k,
                        block_table) -> None:
    """The value checks of ``flash_attn_varlen_func``: cumulative lengths non-decreasing from 0 and within q / k,
    ``seqused_k`` within each sequence's keys (or the block table's capacity), block ids within the cache."""
    if capturing():
        return
    checks = [(((cu_seqlens_q[0] != 0) | (cu_seqlens_q.diff() < 0).any() | (cu_seqlens_q[-1] > q.shape[0])),
               f"cu_seqlens_q must start at 0, never decrease and end <= {q.shape[0]} (q's tokens)")]
    if cu_seqlens_k is not None and block_table is None:
        checks.append((((cu_seqlens_k[0] != 0) | (cu_seqlens_k.diff() < 0).any() | (cu_seqlens_k[-1] > k.shape[0])),
                       f"cu_seqlens_k must start at 0, never decrease and end <= {k.shape[0]} (k's tokens)"))
    if block_table is not None:
        seqlens = seqused_k if seqused_k is not None else cu_seqlens_k.diff()
        if seqused_k is not None:
            checks.append(((seqused_k < 0).any(), "seqused_k must be >= 0"))
        else:
            checks.append(((cu_seqlens_k.diff() < 0).any(), "cu_seqlens_k must never decrease"))
        checks += block_table_checks(block_table, seqlens, k.shape[0], k.shape[1],
                                     "seqused_k" if seqused_k is not None else "the key lengths")
    elif seqused_k is not None:
        checks.append((((seqused_k < 0) | (seqused_k > cu_seqlens_k.diff())).any(),
                       "seqused_k must be in [0, cu_seqlens_k[b + 1] - cu_seqlens_k[b]] for every sequence"))
    raise_first(checks)


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """``slot_mapping`` entries < num_slots (negative entries are padding)."""
    if capturing() or slot_mapping.numel() == 0:
        return
    raise_first([((slot_mapping >= num_slots).any(),
                  f"slot_mapping entries must be < {num_slots} (num_blocks * block_size) or negative (padding)")])
