"""``race_rest``: the exponential race over the tokens of rows without top-k / top-p that the candidates left out.

Such a row's token is ``argmax(exp(x - row_max) / q)`` over every token with ``x >= floor`` (min-p), and any token
may win. ``selection.select_candidates`` raced the row's candidates and gave the ``bound`` below which no token can
beat their best (a draw is never below 2^-24). What is left is done in three launches, none waiting for the host:

1. ``sampling.gather_candidates`` compacts the tokens at or above ``max(bound, floor)`` into ``capacity`` slots per
   row (reading only the blocks whose maximum reaches it). For an LM's peaked distribution they are a small part
   of the vocabulary, so the noise (a Philox call and a logarithm per token) is computed for a few of them only.
2. ``sampling.race_blocks`` races whole rows, block by block, for the rows whose tokens overflowed the slots (flat
   distributions); its ``bound`` is +inf, so a block costs one load, for the others.
3. ``_finish_kernel`` races the compacted tokens, takes the best of the dense blocks, and keeps the candidates'
   token unless another token has a strictly larger ratio. Ties among the rest go to the smallest token id.

The ratios are computed as ``race_blocks`` and ``select_candidates`` compute them (``x = logit / temperature``
rounded to nearest, ``exp(x - row_max) / q``), so the winner is the one those kernels would pick.
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import sampling
from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import next_power_of_2
from flashserve.kernels.reference import sampling as reference
from flashserve.kernels.sampling import _exponential

RACE_CAPACITY = 8192  # slots per row for the tokens that may still win; more of them: the row is raced densely
CHUNK = 1024          # compacted tokens raced per step of the finishing kernel's loop


@triton.jit
def _finish_kernel(values_ptr, indices_ptr, count_ptr, row_max_ptr, streams_ptr, block_best_ptr, block_token_ptr,
                   best_ptr, token_ptr, out_ptr, capacity, num_blocks, vocab, CHUNK: tl.constexpr,
                   BLOCKS: tl.constexpr, LIBDEVICE_LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + row)
    listed = tl.where(count > capacity, 0, count)  # an overflowed row's slots hold a subset: the blocks have it all
    row_max = tl.load(row_max_ptr + row)
    lanes = tl.arange(0, CHUNK)
    lane_best = tl.full((CHUNK,), -1.0, tl.float32)
    lane_token = tl.full((CHUNK,), vocab, tl.int64)
    for start in range(0, listed, CHUNK):
        slots = start + lanes
        valid = slots < listed
        values = tl.load(values_ptr + row * capacity + slots, mask=valid, other=float("-inf"))
        indices = tl.load(indices_ptr + row * capacity + slots, mask=valid, other=0)
        ratio = tl.where(valid, tl.exp(values - row_max) / _exponential(streams_ptr, row, indices, LIBDEVICE_LOG),
                         -1.0)
        better = (ratio > lane_best) | ((ratio == lane_best) & (indices < lane_token))
        lane_best = tl.where(better, ratio, lane_best)
        lane_token = tl.where(better, indices, lane_token)
    blocks = tl.arange(0, BLOCKS)
    in_row = blocks < num_blocks
    block_best = tl.load(block_best_ptr + row * num_blocks + blocks, mask=in_row, other=-1.0)
    block_token = tl.load(block_token_ptr + row * num_blocks + blocks, mask=in_row, other=0)
    listed_best = tl.max(lane_best, axis=0)
    dense_best = tl.max(block_best, axis=0)
    rest_best = tl.maximum(listed_best, dense_best)
    rest_token = tl.minimum(tl.min(tl.where(lane_best == rest_best, lane_token, vocab), axis=0),
                            tl.min(tl.where(block_best == rest_best, block_token, vocab), axis=0))
    token = tl.load(token_ptr + row)
    tl.store(out_ptr + row, tl.where(rest_best > tl.load(best_ptr + row), rest_token, token))


def race_rest(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, row_max: torch.Tensor,
              floor: torch.Tensor, bound: torch.Tensor, streams: torch.Tensor, block_max: torch.Tensor,
              token: torch.Tensor, best: torch.Tensor, capacity: int = RACE_CAPACITY) -> torch.Tensor:
    """The sampled tokens of rows that may have a winner outside their candidates.

    Args:
        logits: (N, V) float32; row_index: (R,) int64 rows of it; temperature, row_max, floor, bound, best: (R,)
            float32 (``row_cutoffs`` and ``select_candidates``; a row with ``bound`` +inf keeps its ``token``);
        streams: (R, 4) int64 Philox streams; block_max: (R, blocks) from ``block_stats``; token: (R,) int64 the
            candidates' winner.
    Returns (R,) int64.
    """
    threshold = torch.maximum(bound, floor)
    if not use_triton(logits):
        block_best, block_token = reference.race_blocks(logits[row_index], temperature, row_max, floor, bound,
                                                        streams, sampling.BLOCK)
        rest_best, where = block_best.max(dim=1)
        return torch.where(rest_best > best, block_token.gather(1, where.unsqueeze(1)).squeeze(1), token)
    values, indices, count = sampling.gather_candidates(logits, row_index, temperature, threshold, block_max,
                                                        capacity)
    dense_bound = torch.where(count > capacity, threshold, float("inf"))
    block_best, block_token = sampling.race_blocks(logits, row_index, temperature, row_max, floor, streams,
                                                   block_max, dense_bound)
    out = torch.empty_like(token)
    if row_index.shape[0]:
        num_blocks = block_max.shape[1]
        _finish_kernel[(row_index.shape[0],)](
            values, indices, count, row_max, streams.contiguous(), block_best, block_token, best, token, out,
            capacity, num_blocks, logits.shape[1], CHUNK=CHUNK, BLOCKS=next_power_of_2(num_blocks),
            LIBDEVICE_LOG=not triton_interpret_enabled())
    return out
