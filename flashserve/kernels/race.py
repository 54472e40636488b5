"""``race_rest``: the exponential race over the tokens of rows without top-k / top-p that the candidates left out.

Such a row's token is ``argmax(exp(x - row_max) / q)`` over every token with ``x >= floor`` (min-p), and any token
may win. ``selection.select_candidates`` raced the row's candidates and gave the ``bound`` below which no token can
beat their best (a draw is never below 2^-24). What is left is done in three launches, none waiting for the host:

1. ``sampling.gather_candidates`` compacts the tokens at or above ``max(bound, floor)`` into ``capacity`` slots per
   row (reading only the sub-blocks whose maximum reaches it). For an LM's peaked distribution they are a small part
   of the vocabulary, so the noise (a Philox call and a logarithm per token) is computed for a few of them only.
   A row where more than ``DENSE_BLOCK_FRACTION`` of the blocks reach that threshold skips the compaction (it
   would read most of the row to overflow the slots), as every row of bench_sampler.py's untruncated cases does:
   the bound lies ~17 (log 2^24) below the best candidate's scaled logit, which most blocks reach.
2. The rows whose tokens overflowed the slots (flat distributions) or skipped them race whole: those of the
   engine's shared generator by ``_shared_race_kernel``, which follows the layout of torch's ``exponential_`` call
   (one Philox call gives 4 draws, ``stride`` elements apart, hence to 4 segments of the shared block of rows) so
   that each call is computed once, the others (seeded rows: one draw per Philox call anyway) block by block by
   ``sampling.race_blocks``. Rows that need neither cost one load per program.
3. ``_finish_kernel`` races the compacted tokens, takes the best of the dense blocks, and keeps the candidates'
   token unless another token has a strictly larger ratio. Ties among the rest go to the smallest token id.

The ratios are computed as ``race_blocks`` and ``select_candidates`` compute them (``x = logit / temperature``
rounded to nearest, ``exp(x - row_max) / q``), so the winner is the one those kernels would pick.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels import sampling
from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import cdiv, next_power_of_2, upload
from flashserve.kernels.reference import sampling as reference
from flashserve.kernels.philox import _exponential, _exponential_of_bits
from flashserve.kernels.sampling import _divide

RACE_CAPACITY = 8192  # slots per row for the tokens that may still win; more of them: the row is raced densely
CHUNK = 1024          # compacted tokens raced per step of the finishing kernel's loop
# A row with more blocks than this fraction of them (and than its slots fill) reaching its threshold races
# densely at once: compacting its tokens would overflow the slots anyway after a read of most of the row.
DENSE_BLOCK_FRACTION = 0.5
# Warps per program of the shared-stream race: 8 measured 285.7 µs against 4's 314.1 (H200, 256 x 151,936 flat
# rows; 80 registers per thread instead of 128). A branch-free variant reading each lane's row options (394-460 µs)
# and one taking 4 Philox calls per program (523-805 µs) measured slower.
SHARED_RACE_WARPS = 8


@triton.jit
def _shared_race_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, row_max_ptr, threshold_ptr,
                        shared_ptr, num_shared_ptr, streams_ptr, key_ptr, vocab, BLOCK: tl.constexpr,
                        LIBDEVICE_LOG: tl.constexpr, FMA: tl.constexpr):
    """Program (b, j): Philox call j of the shared stream's threads [b * BLOCK, (b + 1) * BLOCK). Its 4 draws
    belong to 4 segments of BLOCK consecutive elements, ``stride`` apart, each within at most 2 rows (BLOCK <=
    vocab); per row part, the best ratio and its token, packed into one key (ratio bits << 32 | vocab - 1 - token:
    one reduction finds both), go to the row's key by an atomic max. Which lanes of a segment belong to which row
    part is known from the segment's start alone (no reduction)."""
    num_shared = tl.load(num_shared_ptr)
    first = tl.load(shared_ptr)  # the shared stream's seed, counter and stride are those of any of its rows
    seed = tl.load(streams_ptr + first * 4)
    counter = tl.load(streams_ptr + first * 4 + 1) + tl.program_id(1)
    stride = tl.load(streams_ptr + first * 4 + 3)
    thread_start = tl.program_id(0) * BLOCK
    call_start = tl.program_id(1).to(tl.int64) * 4 * stride + thread_start
    total = num_shared.to(tl.int64) * vocab
    needed = call_start < 0  # False: whether a row of the program's segments races densely
    for component in tl.static_range(4):
        position = (call_start + component * stride) // vocab
        for part in tl.static_range(2):
            in_block = position + part < num_shared
            index = tl.load(shared_ptr + position + part, mask=in_block, other=0)
            needed = needed | (in_block & (tl.load(threshold_ptr + index) < float("inf")))
    if (thread_start < stride) & (call_start < total) & needed:
        lanes = tl.arange(0, BLOCK)
        threads = thread_start + lanes
        in_stride = threads < stride
        width = tl.minimum(stride - thread_start, BLOCK)  # lanes of the program within the stride
        zeros = tl.zeros((BLOCK,), tl.uint32)
        c0 = zeros + (counter & 0xFFFFFFFF).to(tl.uint32)
        c1 = zeros + ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox_impl(c0, c1, threads.to(tl.uint32), zeros, k0, k1)
        for component in tl.static_range(4):
            if component == 0:
                bits = r0
            elif component == 1:
                bits = r1
            elif component == 2:
                bits = r2
            else:
                bits = r3
            start = call_start + component * stride  # the element of lane 0
            end = tl.minimum(start + width, total)  # past the segment's last element
            elements = start + lanes
            valid = in_stride & (elements < total)
            position = start // vocab
            split = (position + 1) * vocab  # lanes at or past it belong to the next position
            for part in tl.static_range(2):
                where = position + part
                if part == 0:
                    lanes_in = valid & (elements < split)
                    occupied = start < end
                else:
                    lanes_in = valid & (elements >= split)
                    occupied = split < end
                if occupied & (where < num_shared):
                    index = tl.load(shared_ptr + where)
                    threshold = tl.load(threshold_ptr + index)
                    if threshold < float("inf"):  # else the row needs no dense race
                        cols = (elements - where * vocab).to(tl.int32)
                        row = tl.load(rows_ptr + index)
                        x = tl.load(logits_ptr + row * stride_row + cols, mask=lanes_in, other=float("-inf"))
                        temperature = tl.load(temperature_ptr + index)
                        scaled = _divide(x.to(tl.float32), temperature, tl.div_rn(1.0, temperature), FMA)
                        weight = tl.exp(scaled - tl.load(row_max_ptr + index))
                        ratio = weight / _exponential_of_bits(bits, LIBDEVICE_LOG)
                        keys = (ratio.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (vocab - 1 - cols)
                        key = tl.max(tl.where(lanes_in & (scaled >= threshold), keys, 0), axis=0)
                        tl.atomic_max(key_ptr + index, key)


@triton.jit
def _dense_rows_kernel(block_max_ptr, floor_ptr, bound_ptr, threshold_ptr, cutoff_ptr, num_blocks, most_blocks,
                       BLOCKS: tl.constexpr):
    # per row: the scaled logit a token must reach to possibly win, and the gathering's cutoff: that threshold, or
    # +inf where more than most_blocks blocks reach it (the row races densely without compacting its tokens)
    row = tl.program_id(0).to(tl.int64)
    threshold = tl.maximum(tl.load(floor_ptr + row), tl.load(bound_ptr + row))
    offsets = tl.arange(0, BLOCKS)
    in_range = offsets < num_blocks
    block_max = tl.load(block_max_ptr + row * num_blocks + offsets, mask=in_range, other=float("-inf"))
    reaching = tl.sum((in_range & (block_max >= threshold)).to(tl.int32), axis=0)
    tl.store(threshold_ptr + row, threshold)
    tl.store(cutoff_ptr + row, tl.where(reaching > most_blocks, float("inf"), threshold))


@triton.jit
def _dense_split_kernel(threshold_ptr, cutoff_ptr, count_ptr, member_ptr, shared_threshold_ptr, race_bound_ptr,
                        key_ptr, capacity, SHARED: tl.constexpr):
    # per row, after the gathering: which dense race takes it (the shared stream's, or race_blocks'), if any —
    # a row races densely if it skipped the gathering (cutoff above its threshold) or overflowed the slots
    row = tl.program_id(0).to(tl.int64)
    threshold = tl.load(threshold_ptr + row)
    dense = (tl.load(cutoff_ptr + row) != threshold) | (tl.load(count_ptr + row) > capacity)
    if SHARED:
        member = tl.load(member_ptr + row) != 0
        tl.store(shared_threshold_ptr + row, tl.where(dense & member, threshold, float("inf")))
        dense = dense & ~member
    tl.store(race_bound_ptr + row, tl.where(dense, threshold, float("inf")))
    tl.store(key_ptr + row, tl.cast(0, tl.int64))


@triton.jit
def _finish_kernel(values_ptr, indices_ptr, count_ptr, row_max_ptr, streams_ptr, block_best_ptr, block_token_ptr,
                   key_ptr, best_ptr, token_ptr, out_ptr, capacity, num_blocks, vocab, CHUNK: tl.constexpr,
                   BLOCKS: tl.constexpr, LIBDEVICE_LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + row)
    listed = tl.where(count > capacity, 0, count)  # an overflowed row's slots hold a subset: the dense race has all
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
    key = tl.load(key_ptr + row)  # the shared stream's dense race: 0, or ratio bits << 32 | vocab - 1 - token
    key_best = tl.where(key > 0, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), -1.0)
    key_token = vocab - 1 - (key & 0xFFFFFFFF)
    rest_best = tl.maximum(tl.maximum(tl.max(lane_best, axis=0), tl.max(block_best, axis=0)), key_best)
    rest_token = tl.minimum(tl.min(tl.where(lane_best == rest_best, lane_token, vocab), axis=0),
                            tl.min(tl.where(block_best == rest_best, block_token, vocab), axis=0))
    rest_token = tl.minimum(rest_token, tl.where(key_best == rest_best, key_token, vocab))
    token = tl.load(token_ptr + row)
    tl.store(out_ptr + row, tl.where(rest_best > tl.load(best_ptr + row), rest_token, token))


class SharedStream(NamedTuple):
    """Which of the R rows draw from the shared generator's one ``exponential_`` call (their stream bases are
    ``position * vocab``): ``index`` (>= n,) int64 the rows in position order, ``count`` (1,) int32 n, ``member``
    (R,) bool; ``min_stride`` and ``max_stride`` bound the call's thread stride (host ints: they size the grid)."""

    index: torch.Tensor
    count: torch.Tensor
    member: torch.Tensor
    min_stride: int
    max_stride: int


def shared_stream(stream_rows: list[list[int]], member: list[bool], device: torch.device) -> SharedStream | None:
    """The ``SharedStream`` of host-known rows (``Sampler.stream_rows`` and which rows share), or None if none."""
    index = [i for i, shared in enumerate(member) if shared]
    if not index:
        return None
    stride = stream_rows[index[0]][3]
    return SharedStream(upload(index, torch.int64, device), upload([len(index)], torch.int32, device),
                        upload(member, torch.bool, device), stride, stride)


def race_rest(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, row_max: torch.Tensor,
              floor: torch.Tensor, bound: torch.Tensor, streams: torch.Tensor, block_max: torch.Tensor,
              token: torch.Tensor, best: torch.Tensor, sub_block_max: torch.Tensor,
              shared: SharedStream | None = None, capacity: int = RACE_CAPACITY) -> torch.Tensor:
    """The sampled tokens of rows that may have a winner outside their candidates.

    Args:
        logits: (N, V) float32; row_index: (R,) int64 rows of it; temperature, row_max, floor, bound, best: (R,)
            float32 (``row_cutoffs`` and ``select_candidates``; a row with ``bound`` +inf keeps its ``token``);
        streams: (R, 4) int64 Philox streams; block_max, sub_block_max: from ``block_stats``; token: (R,) int64
            the candidates' winner; shared: the rows of the shared stream, whose dense race then computes each
            Philox call once for its 4 draws (``_shared_race_kernel``) instead of once per draw.
    Returns (R,) int64.
    """
    if not use_triton(logits):
        block_best, block_token = reference.race_blocks(logits[row_index], temperature, row_max, floor, bound,
                                                        streams, sampling.BLOCK)
        rest_best, where = block_best.max(dim=1)
        return torch.where(rest_best > best, block_token.gather(1, where.unsqueeze(1)).squeeze(1), token)
    num_rows, vocab = row_index.shape[0], logits.shape[1]
    num_blocks = block_max.shape[1]
    # rows where most blocks may hold a winner race densely without trying to compact their tokens first
    most_blocks = max(int(num_blocks * DENSE_BLOCK_FRACTION), capacity // sampling.BLOCK)
    if shared is not None and vocab < sampling.BLOCK:
        shared = None  # a segment of the shared kernel would span more than two rows
    device = logits.device
    threshold, cutoff, shared_threshold, race_bound = (torch.empty(num_rows, dtype=torch.float32, device=device)
                                                       for _ in range(4))
    keys = torch.empty(num_rows, dtype=torch.int64, device=device)
    if num_rows:
        _dense_rows_kernel[(num_rows,)](block_max, floor, bound, threshold, cutoff, num_blocks, most_blocks,
                                        BLOCKS=next_power_of_2(num_blocks))
    values, indices, count = sampling.gather_candidates(logits, row_index, temperature, cutoff, sub_block_max,
                                                        capacity)
    if num_rows:
        _dense_split_kernel[(num_rows,)](threshold, cutoff, count, shared.member if shared is not None else count,
                                         shared_threshold, race_bound, keys, capacity, SHARED=shared is not None)
    if shared is not None and num_rows:
        grid = (cdiv(shared.max_stride, sampling.BLOCK), cdiv(shared.index.shape[0] * vocab, 4 * shared.min_stride))
        _shared_race_kernel[grid](logits, row_index, logits.stride(0), temperature, row_max, shared_threshold,
                                  shared.index, shared.count, streams.contiguous(), keys, vocab,
                                  BLOCK=sampling.BLOCK, LIBDEVICE_LOG=not triton_interpret_enabled(),
                                  FMA=not triton_interpret_enabled(),
                                  num_warps=SHARED_RACE_WARPS)
    block_best, block_token = sampling.race_blocks(logits, row_index, temperature, row_max, floor, streams,
                                                   block_max, race_bound)
    out = torch.empty_like(token)
    if num_rows:
        _finish_kernel[(num_rows,)](
            values, indices, count, row_max, streams.contiguous(), block_best, block_token, keys, best, token, out,
            capacity, num_blocks, vocab, CHUNK=CHUNK, BLOCKS=next_power_of_2(num_blocks),
            LIBDEVICE_LOG=not triton_interpret_enabled())
    return out
