"""The per-row steps of the sort-free sampler around the candidate gathering, one program per row each:
``row_cutoffs`` (maximum, softmax sum and candidate cutoff from the block statistics) and ``select_candidates``
(top-k / top-p / min-p on the candidates, sorted in the kernel, and the race over the survivors). Semantics: the
references of the same names in ``flashserve.kernels.reference.sampling``.
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import next_power_of_2
from flashserve.kernels.reference import sampling as reference
from flashserve.kernels.philox import _exponential


@triton.jit
def _row_cutoffs_kernel(block_max_ptr, block_sum_ptr, top_k_ptr, row_max_ptr, mass_ptr, cutoff_ptr, num_blocks,
                        vocab, capacity, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCKS)
    mask = offsets < num_blocks
    block_max = tl.load(block_max_ptr + row * num_blocks + offsets, mask=mask, other=float("-inf"))
    block_sum = tl.load(block_sum_ptr + row * num_blocks + offsets, mask=mask, other=0.0)
    row_max = tl.max(block_max, axis=0)
    mass = tl.sum(tl.where(mask, block_sum * tl.exp(block_max - row_max), 0.0), axis=0)
    top_k = tl.load(top_k_ptr + row)
    kth = tl.sum(tl.where(offsets == tl.minimum(tl.maximum(top_k, 1), num_blocks) - 1,
                          tl.sort(block_max, descending=True), 0.0), axis=0)
    by_mass = tl.minimum(row_max + tl.log(mass / capacity), row_max)
    use_kth = (top_k > 0) & (top_k < vocab) & (top_k <= num_blocks)
    tl.store(row_max_ptr + row, row_max)
    tl.store(mass_ptr + row, mass)
    tl.store(cutoff_ptr + row, tl.where(use_kth, kth, by_mass))


def row_cutoffs(block_max: torch.Tensor, block_sum: torch.Tensor, top_k: torch.Tensor, vocab: int,
                capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.row_cutoffs`` in one launch."""
    if not use_triton(block_max):
        return reference.row_cutoffs(block_max, block_sum, top_k, vocab, capacity)
    num_rows, num_blocks = block_max.shape
    row_max, mass, cutoff = (torch.empty(num_rows, dtype=torch.float32, device=block_max.device) for _ in range(3))
    if num_rows:
        _row_cutoffs_kernel[(num_rows,)](block_max, block_sum, top_k, row_max, mass, cutoff, num_blocks, vocab,
                                         capacity, BLOCKS=next_power_of_2(num_blocks))
    return row_max, mass, cutoff


@triton.jit
def _select_kernel(values_ptr, indices_ptr, count_ptr, row_max_ptr, mass_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                   streams_ptr, noise_ptr, noise_stride, token_ptr, best_ptr, floor_ptr, bound_ptr, fallback_ptr,
                   vocab, capacity, fewest, most, log_win_margin, TILE: tl.constexpr, STREAMS: tl.constexpr,
                   LIBDEVICE_LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + row)
    if (count > fewest) & (count <= most):  # the rows of this tile size; the others are another launch's
        ranks = tl.arange(0, TILE)
        valid = ranks < tl.minimum(count, capacity)
        values = tl.load(values_ptr + row * capacity + ranks, mask=valid, other=float("-inf"))
        indices = tl.load(indices_ptr + row * capacity + ranks, mask=valid, other=0)
        row_max = tl.load(row_max_ptr + row)
        mass = tl.load(mass_ptr + row)
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        weights = tl.where(valid, tl.exp(values - row_max), 0.0)
        top_k_active = (top_k > 0) & (top_k < vocab)
        k = tl.where(top_k_active, top_k, vocab)
        truncated = top_k_active | (top_p < 1.0)
        if truncated:  # the boundary of top-k / top-p, on the candidates sorted in descending order
            ordered = tl.sort(values, descending=True)
            in_k = valid & (ranks < k)
            kept_weights = tl.where(in_k, tl.exp(ordered - row_max), 0.0)
            normaliser = tl.where(top_k_active, tl.sum(kept_weights, axis=0), mass)
            mass_before = (tl.cumsum(kept_weights, axis=0) - kept_weights) / normaliser
            kept = in_k & ((mass_before < tl.where(top_p >= 1.0, float("inf"), top_p)) | (ranks == 0))
            boundary = tl.min(tl.where(kept, ordered, float("inf")), axis=0)
        else:
            boundary = tl.min(tl.where(valid, float("-inf"), values), axis=0)  # -inf: every candidate is kept
        min_p = tl.load(min_p_ptr + row)
        floor = tl.where(min_p > 0.0, row_max + tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
        survivors = valid & (values >= boundary) & (values >= floor)
        if STREAMS:
            draws = _exponential(streams_ptr, row, indices, LIBDEVICE_LOG)
        else:
            draws = tl.load(noise_ptr + row * noise_stride + indices, mask=valid, other=1.0)
        ratio = tl.where(survivors, weights / draws, -1.0)
        best = tl.max(ratio, axis=0)
        tl.store(token_ptr + row, tl.min(tl.where(ratio == best, indices, vocab), axis=0))
        tl.store(best_ptr + row, best)
        tl.store(floor_ptr + row, floor)
        tl.store(bound_ptr + row, tl.where(truncated, float("inf"), row_max + tl.log(best) + log_win_margin))
        candidate_mass = tl.sum(weights, axis=0)
        fallback = truncated & ((count > capacity) | (top_k_active & (count < k))
                                | ((~top_k_active) & (count < vocab) & (candidate_mass < top_p * mass)))
        tl.store(fallback_ptr + row, fallback.to(tl.int8))


SMALL_TILE = 512  # rows with at most this many candidates are selected by a launch of this tile size


def select_candidates(values: torch.Tensor, indices: torch.Tensor, count: torch.Tensor, row_max: torch.Tensor,
                      mass: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                      vocab: int, streams: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """``reference.select_candidates`` on candidates in any order (``gather_candidates``' output, the slots past
    the count unspecified): the kernel sorts the candidates of the truncated rows itself. Two launches (tiles of
    ``SMALL_TILE`` and of the whole capacity, each row taken by the one its count fits) keep the sort as short as
    the candidates. The draws at the candidates are computed from ``streams`` or gathered from ``noise`` (R, V).
    Ties of the race go to the smallest token id."""
    if not use_triton(values):
        ranks = torch.arange(values.shape[1], device=values.device)
        values = torch.where(ranks < count.unsqueeze(1), values, float("-inf"))
        values, order = values.sort(dim=1, descending=True, stable=True)
        indices = indices.gather(1, order)
        draws = reference.exponential_at(streams, indices) if streams is not None else noise.gather(1, indices)
        return reference.select_candidates(values, indices, count, row_max, mass, top_k, top_p, min_p, draws, vocab)
    num_rows, capacity = values.shape
    device = values.device
    token = torch.empty(num_rows, dtype=torch.int64, device=device)
    best, floor, bound = (torch.empty(num_rows, dtype=torch.float32, device=device) for _ in range(3))
    fallback = torch.empty(num_rows, dtype=torch.int8, device=device)
    tile = next_power_of_2(capacity)
    tiles = [(SMALL_TILE, -1, SMALL_TILE), (tile, SMALL_TILE, 2 ** 31 - 1)] if tile > SMALL_TILE else \
        [(tile, -1, 2 ** 31 - 1)]
    if num_rows:
        noise_arg = noise if noise is not None else values
        for size, fewest, most in tiles:
            _select_kernel[(num_rows,)](
                values, indices, count, row_max, mass, top_k, top_p, min_p,
                streams if streams is not None else indices, noise_arg, noise_arg.stride(0), token, best, floor,
                bound, fallback, vocab, capacity, fewest, most, reference.LOG_WIN_MARGIN, TILE=size,
                STREAMS=streams is not None, LIBDEVICE_LOG=not triton_interpret_enabled(),
                num_warps=8 if size > SMALL_TILE else 4)
    return token, best, floor, bound, fallback.bool()
