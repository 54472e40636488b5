"""Sampling without sorting the vocabulary: top-k / top-p / min-p by partial selection, and the exponential race.

The sampled token of a row is ``argmax(p / q)`` over the tokens that survive top-k, top-p and min-p, with q ~ Exp(1)
per token (equivalent to drawing from p). ``flashserve.kernels.nucleus.sample`` puts these kernels together:

1. ``block_stats`` (the one full read of the logits): per block of ``BLOCK`` tokens, the largest scaled logit
   ``x = logit / temperature`` and the softmax sum below it; hence each row's maximum and normaliser. Also each
   sub-block's maximum (``SUB_BLOCKS`` per block), on the way to the block's: nearly free.
2. ``gather_candidates`` compacts the tokens at or above a per-row cutoff into a small buffer, reading only the
   sub-blocks whose maximum reaches it (for an LM's peaked rows a few dozen of 256 bytes each). The
   cutoff: for a top-k row the k-th largest block maximum (so the top k are all in), for the others probability
   1 / capacity (so at most ``capacity`` tokens qualify). The select kernel sorts them (a few thousand per row at
   most) and the top-k / top-p boundary found on them (``selection``).
3. The race runs over the surviving candidates; for rows without top-k / top-p, where every token may win,
   ``flashserve.kernels.race`` then races the tokens that could still beat the candidates' best (a draw is never
   below 2^-24, so a token of weight w cannot beat a ratio above w * 2^24): compacted when they are few, whole rows
   (``race_blocks``, or the shared stream's kernel) when they are not.

A truncated row whose boundary the candidates do not determine (too many of them for a top-k row, or a nucleus
heavier than their mass) falls back to the sort (``reference.sample_sorted``): exact, slower, and the one place
that waits for the device.

The noise q is either given as a (R, V) tensor or computed where it is needed from the row's Philox stream
(``streams``, ``flashserve.kernels.philox``).
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import cdiv, next_power_of_2
from flashserve.kernels.philox import _exponential
from flashserve.kernels.reference import sampling as reference

DEFAULT_CAPACITY = 4096  # candidate slots per row (a sort of this many per row stays in one thread block)
BLOCK = 1024             # tokens per block of the block statistics
SUB_BLOCKS = 16          # sub-blocks per block whose maximum ``block_stats`` keeps for ``gather_candidates``
STATS_GROUP = 2          # blocks per program of ``block_stats``, read as one tile (so more bytes are in flight)
STATS_WARPS = 4
CANDIDATE_PROGRAMS = 16  # programs per row of ``gather_candidates``, taking the row's listed sub-blocks in turns
CANDIDATE_CHUNK = 16     # sub-blocks that ``gather_candidates`` reads at once
RACE_GROUP = 8           # blocks per program of ``race_blocks`` (one load writes off those without a possible winner)


@triton.jit
def _divide(x, divisor, reciprocal, FMA: tl.constexpr):
    """``x / divisor`` as IEEE division rounds it (what torch's ``logits / temperature`` gives), ``reciprocal`` being
    ``tl.div_rn(1.0, divisor)``: the product by the reciprocal, corrected once with fused multiply-adds, is the
    correctly rounded quotient wherever it and the remainder stay in the normal range (Markstein's theorem); +-inf
    and NaN pass through; a quotient below 2^-126 in magnitude may differ in its last place. Several times cheaper
    than ``tl.div_rn`` per element. ``FMA`` False (Triton's interpreter, whose fma rounds twice): ``tl.div_rn``."""
    if FMA:
        quotient = x * reciprocal
        corrected = tl.fma(tl.fma(-quotient, divisor, x), reciprocal, quotient)
        return tl.where(tl.abs(quotient) == float("inf"), quotient, corrected)
    else:
        return tl.div_rn(x, divisor)


@triton.jit
def _block_stats_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, vocab, block_max_ptr, block_sum_ptr,
                        sub_max_ptr, num_blocks, BLOCK: tl.constexpr, SUB_BLOCKS: tl.constexpr, GROUP: tl.constexpr,
                        FMA: tl.constexpr):
    # a program reads GROUP blocks at once, as a [GROUP, SUB_BLOCKS, BLOCK // SUB_BLOCKS] tile (block, sub-block,
    # token): the sub-blocks' maxima are the first step of the blocks' maxima
    index = tl.program_id(0).to(tl.int64)
    blocks = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
    subs = blocks[:, None] * SUB_BLOCKS + tl.arange(0, SUB_BLOCKS)[None, :]
    cols = subs[:, :, None] * (BLOCK // SUB_BLOCKS) + tl.arange(0, BLOCK // SUB_BLOCKS)[None, None, :]
    mask = cols < vocab
    row = tl.load(rows_ptr + index)
    logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    temperature = tl.load(temperature_ptr + index)
    scaled = _divide(logits, temperature, tl.div_rn(1.0, temperature), FMA)
    sub_max = tl.max(scaled, axis=2)
    largest = tl.max(sub_max, axis=1)
    total = tl.sum(tl.sum(tl.where(mask, tl.exp(scaled - largest[:, None, None]), 0.0), axis=2), axis=1)
    stored = blocks < num_blocks
    tl.store(block_max_ptr + index * num_blocks + blocks, largest, mask=stored)
    tl.store(block_sum_ptr + index * num_blocks + blocks, total, mask=stored)
    tl.store(sub_max_ptr + index * num_blocks * SUB_BLOCKS + subs, sub_max, mask=stored[:, None])


def block_stats(logits: torch.Tensor, rows: torch.Tensor,
                temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.block_stats`` of ``logits[rows]`` in blocks of ``BLOCK`` tokens: the one full read of the
    logits that the sampler makes. Returns (block_max, block_sum) (R, blocks) and sub_block_max (R, blocks *
    SUB_BLOCKS): the largest scaled logit of each sub-block of ``BLOCK // SUB_BLOCKS`` tokens (-inf past the
    vocabulary), with which ``gather_candidates`` reads only the sub-blocks that reach its cutoff."""
    if not use_triton(logits):
        return reference.block_stats(logits[rows], temperature, BLOCK, BLOCK // SUB_BLOCKS)
    num_rows, num_blocks = rows.shape[0], cdiv(logits.shape[1], BLOCK)
    block_max = torch.empty((num_rows, num_blocks), dtype=torch.float32, device=logits.device)
    block_sum = torch.empty_like(block_max)
    sub_block_max = torch.empty((num_rows, num_blocks * SUB_BLOCKS), dtype=torch.float32, device=logits.device)
    if num_rows:
        _block_stats_kernel[(num_rows, cdiv(num_blocks, STATS_GROUP))](
            logits, rows, logits.stride(0), temperature, logits.shape[1], block_max, block_sum, sub_block_max,
            num_blocks, BLOCK=BLOCK, SUB_BLOCKS=SUB_BLOCKS, GROUP=STATS_GROUP, FMA=not triton_interpret_enabled(),
            num_warps=STATS_WARPS)
    return block_max, block_sum, sub_block_max


@triton.jit
def _append_candidates(values_ptr, indices_ptr, count_ptr, index, capacity, qualifies, values, tokens):
    """Append the qualifying (value, token) pairs of a 2D tile to row ``index``'s slots, in row-major order: an
    atomic on the row's count reserves them; pairs past ``capacity`` are counted, not stored."""
    flags = qualifies.to(tl.int32)
    line_counts = tl.sum(flags, axis=1)
    start = tl.atomic_add(count_ptr + index, tl.sum(line_counts, axis=0))
    slots = start + (tl.cumsum(line_counts, axis=0) - line_counts)[:, None] + tl.cumsum(flags, axis=1) - 1
    stored = qualifies & (slots < capacity)
    tl.store(values_ptr + index * capacity + slots, values, mask=stored)
    tl.store(indices_ptr + index * capacity + slots, tokens.to(tl.int64), mask=stored)


@triton.jit
def _list_sub_blocks_kernel(sub_max_ptr, cutoff_ptr, list_ptr, list_count_ptr, num_subs, SUBS: tl.constexpr):
    # one program per row: the sub-blocks whose maximum reaches the cutoff, in order, and how many
    index = tl.program_id(0).to(tl.int64)
    subs = tl.arange(0, SUBS)
    sub_max = tl.load(sub_max_ptr + index * num_subs + subs, mask=subs < num_subs, other=float("-inf"))
    read = (subs < num_subs) & (sub_max >= tl.load(cutoff_ptr + index))
    flags = read.to(tl.int32)
    tl.store(list_ptr + index * num_subs + tl.cumsum(flags, axis=0) - 1, subs, mask=read)
    tl.store(list_count_ptr + index, tl.sum(flags, axis=0))


@triton.jit
def _candidates_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, cutoff_ptr, list_ptr, list_count_ptr,
                       vocab, values_ptr, indices_ptr, count_ptr, capacity, num_subs, SUB: tl.constexpr,
                       CHUNK: tl.constexpr, PROGRAMS: tl.constexpr, FMA: tl.constexpr):
    # PROGRAMS programs per row take the row's listed sub-blocks in turns, CHUNK of them per [CHUNK, SUB] load
    index = tl.program_id(0).to(tl.int64)
    num_read = tl.load(list_count_ptr + index)
    cutoff = tl.load(cutoff_ptr + index)
    temperature = tl.load(temperature_ptr + index)
    reciprocal = tl.div_rn(1.0, temperature)
    row = tl.load(rows_ptr + index)
    for start in range(tl.program_id(1) * CHUNK, num_read, PROGRAMS * CHUNK):
        wanted = start + tl.arange(0, CHUNK)
        listed = wanted < num_read
        subs = tl.load(list_ptr + index * num_subs + wanted, mask=listed, other=0)
        cols = subs[:, None] * SUB + tl.arange(0, SUB)[None, :]
        mask = listed[:, None] & (cols < vocab)
        logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        scaled = _divide(logits, temperature, reciprocal, FMA)
        _append_candidates(values_ptr, indices_ptr, count_ptr, index, capacity, mask & (scaled >= cutoff), scaled,
                           cols)


def gather_candidates(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, cutoff: torch.Tensor,
                      sub_block_max: torch.Tensor, capacity: int = DEFAULT_CAPACITY,
                      count: torch.Tensor | None = None):
    """``reference.gather_candidates`` of ``logits[rows]``, except that the slots past a row's count are left
    unwritten (their content is unspecified: readers mask by the count); only the sub-blocks whose maximum
    (``sub_block_max`` from ``block_stats``) reaches the cutoff are read: a first launch lists them per row, a
    second reads them, ``CANDIDATE_CHUNK`` per load. ``count``: an (R,) int32 zero-filled
    buffer to count into (so that one fill serves several calls), or None for a new one."""
    if not use_triton(logits):
        return reference.gather_candidates(logits[rows], temperature, cutoff, capacity)
    num_rows, device = rows.shape[0], logits.device
    values = torch.empty((num_rows, capacity), dtype=torch.float32, device=device)
    indices = torch.empty((num_rows, capacity), dtype=torch.int64, device=device)
    if count is None:
        count = torch.zeros((num_rows,), dtype=torch.int32, device=device)
    num_subs = sub_block_max.shape[1]
    if num_rows:
        listed = torch.empty((num_rows, num_subs), dtype=torch.int32, device=device)
        list_count = torch.empty((num_rows,), dtype=torch.int32, device=device)
        _list_sub_blocks_kernel[(num_rows,)](sub_block_max, cutoff, listed, list_count, num_subs,
                                             SUBS=next_power_of_2(num_subs), num_warps=8)
        _candidates_kernel[(num_rows, CANDIDATE_PROGRAMS)](
            logits, rows, logits.stride(0), temperature, cutoff, listed, list_count, logits.shape[1], values,
            indices, count, capacity, num_subs, SUB=BLOCK // SUB_BLOCKS, CHUNK=CANDIDATE_CHUNK,
            PROGRAMS=CANDIDATE_PROGRAMS, FMA=not triton_interpret_enabled())
    return values, indices, count


@triton.jit
def _race_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, row_max_ptr, floor_ptr, bound_ptr,
                 block_max_ptr, streams_ptr, vocab, best_ptr, best_index_ptr, num_blocks, BLOCK: tl.constexpr,
                 GROUP: tl.constexpr, LIBDEVICE_LOG: tl.constexpr, FMA: tl.constexpr):
    # a program takes GROUP blocks: those that cannot hold a winner are written off at once (one vector load),
    # the others raced one after another
    index = tl.program_id(0).to(tl.int64)
    blocks = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
    in_range = blocks < num_blocks
    threshold = tl.maximum(tl.load(floor_ptr + index), tl.load(bound_ptr + index))
    largest = tl.load(block_max_ptr + index * num_blocks + blocks, mask=in_range, other=float("-inf"))
    races = in_range & (largest >= threshold)  # else no token of the block can win
    tl.store(best_ptr + index * num_blocks + blocks, tl.full([GROUP], -1.0, tl.float32), mask=in_range & ~races)
    tl.store(best_index_ptr + index * num_blocks + blocks, blocks.to(tl.int64) * BLOCK, mask=in_range & ~races)
    flags = races.to(tl.int32)
    ranks = tl.where(races, tl.cumsum(flags, axis=0) - 1, -1)
    row = tl.load(rows_ptr + index)
    temperature = tl.load(temperature_ptr + index)
    reciprocal = tl.div_rn(1.0, temperature)
    row_max = tl.load(row_max_ptr + index)
    for i in range(0, tl.sum(flags, axis=0)):
        block = tl.sum(tl.where(ranks == i, blocks, 0), axis=0)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        scaled = _divide(logits, temperature, reciprocal, FMA)
        weight = tl.exp(scaled - row_max)
        ratio = tl.where(mask & (scaled >= threshold), weight / _exponential(streams_ptr, index, cols, LIBDEVICE_LOG),
                         -1.0)
        tl.store(best_ptr + index * num_blocks + block, tl.max(ratio, axis=0))
        tl.store(best_index_ptr + index * num_blocks + block, (tl.argmax(ratio, axis=0) + block * BLOCK).to(tl.int64))


def race_blocks(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, row_max: torch.Tensor,
                floor: torch.Tensor, streams: torch.Tensor, block_max: torch.Tensor,
                bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.race_blocks`` of ``logits[rows]``, the noise computed in the kernel from ``streams``; blocks
    whose ``block_max`` is below ``bound`` (no token there can beat a ratio already found) or below ``floor``
    are neither read nor raced (their best is -1); within a block, only tokens at or above both race. A row whose
    ``bound`` is +inf costs one load per ``RACE_GROUP`` blocks: ``flashserve.kernels.race`` switches rows off that
    way."""
    if not use_triton(logits):
        return reference.race_blocks(logits[rows], temperature, row_max, floor, bound, streams, BLOCK)
    num_rows, num_blocks = rows.shape[0], block_max.shape[1]
    best = torch.empty((num_rows, num_blocks), dtype=torch.float32, device=logits.device)
    best_index = torch.empty((num_rows, num_blocks), dtype=torch.int64, device=logits.device)
    if num_rows:
        _race_kernel[(num_rows, cdiv(num_blocks, RACE_GROUP))](
            logits, rows, logits.stride(0), temperature, row_max, floor, bound, block_max, streams.contiguous(),
            logits.shape[1], best, best_index, num_blocks, BLOCK=BLOCK, GROUP=RACE_GROUP,
            LIBDEVICE_LOG=not triton_interpret_enabled(),
            FMA=not triton_interpret_enabled())
    return best, best_index
