"""Sampling without sorting the vocabulary: top-k / top-p / min-p by partial selection, and the exponential race.

The sampled token of a row is ``argmax(p / q)`` over the tokens that survive top-k, top-p and min-p, with q ~ Exp(1)
per token (equivalent to drawing from p). ``flashserve.kernels.nucleus.sample`` puts these kernels together:

1. ``block_stats`` (the one full read of the logits): per block of ``BLOCK`` tokens, the largest scaled logit
   ``x = logit / temperature`` and the softmax sum below it; hence each row's maximum and normaliser. For rows
   without top-k also the block's ``BlockPeaks`` (each sub-block's largest token, the largest runner-up).
2. ``gather_candidates`` compacts the tokens at or above a per-row cutoff into a small buffer, reading only the
   blocks whose maximum reaches it (and, with peaks, whose runner-up does too: else the peaks are the tokens). The
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
(``streams``): ``exponential_at`` computes exactly what ``torch.Tensor.exponential_`` on CUDA writes (curand's
Philox4x32-10, ``-log(u)``) for any element of a call, so a row samples from its torch.Generator's stream without
materialising V draws. ``torch_stream_layout`` gives the call geometry that torch uses (256-thread blocks, at most
``SMs * max threads per SM / 256`` of them, 4 draws per thread and Philox call), and
``reproduces_torch_exponential`` checks the whole at start-up.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import cdiv
from flashserve.kernels.reference import sampling as reference

DEFAULT_CAPACITY = 4096  # candidate slots per row (a sort of this many per row stays in one thread block)
BLOCK = 1024             # tokens per block of the block statistics
PEAKS = 16               # sub-blocks per block whose largest token ``block_stats`` keeps (``BlockPeaks``)


class BlockPeaks(NamedTuple):
    """What ``block_stats(..., top_k)`` keeps of each block besides its maximum and sum, so that the candidate
    gathering need not read the block again: the block cut into ``PEAKS`` sub-blocks of consecutive tokens, each
    sub-block's largest scaled logit ``values`` (R, blocks, PEAKS) float32 and its token ``indices`` (same, int32),
    and ``second`` (R, blocks) float32, the largest over the sub-blocks of their second-largest scaled logit. Every
    token of a block at or above a cutoff ``c > second`` is the peak of its sub-block (a sub-block holds at most
    one such token); for ``c <= second`` the block must be read."""

    values: torch.Tensor
    indices: torch.Tensor
    second: torch.Tensor


def torch_stream_layout(numel: int, device: torch.device) -> tuple[int, int]:
    """(thread stride, Philox offset increment) of a ``numel``-element ``exponential_`` call on ``device`` (CUDA),
    as torch computes them (``calc_execution_policy`` in ATen's DistributionTemplates.h)."""
    props = torch.cuda.get_device_properties(device)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    blocks = min(props.multi_processor_count * (threads_per_sm // 256), cdiv(numel, 256))
    stride = 256 * blocks
    return stride, ((numel - 1) // (stride * 4) + 1) * 4


@triton.jit
def _exponential(streams_ptr, row, tokens, LIBDEVICE_LOG: tl.constexpr):
    """Exp(1) draws of torch's CUDA ``exponential_`` at ``tokens`` of the stream in row ``row`` of streams
    (``LIBDEVICE_LOG``: CUDA's fast ``__logf``, which torch's kernel ends up calling — the precise ``logf``
    differs in the last bits of 85% of the draws on an H200; Triton's interpreter has no libdevice)."""
    seed = tl.load(streams_ptr + row * 4)
    counter0 = tl.load(streams_ptr + row * 4 + 1)
    base = tl.load(streams_ptr + row * 4 + 2)
    stride = tl.load(streams_ptr + row * 4 + 3)
    # element base + token = quotient * stride + thread, with one 64-bit division per program (the row's base) and
    # a 32-bit one per token: the base's thread is < stride < 2^31 and a token < 2^31, so their sum fits 32 bits
    base_quotient = base // stride
    stride32 = stride.to(tl.uint32)
    offset = (base - base_quotient * stride).to(tl.uint32) + tokens.to(tl.uint32)
    wraps = offset // stride32
    quotient = base_quotient + wraps.to(tl.int64)
    counter = counter0 + (quotient >> 2)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = offset - wraps * stride32
    c3 = tl.zeros_like(c2)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox_impl(c0, c1, c2, c3, k0, k1)
    component = quotient & 3
    bits = tl.where(component == 0, r0, tl.where(component == 1, r1, tl.where(component == 2, r2, r3)))
    return _exponential_of_bits(bits, LIBDEVICE_LOG)


@triton.jit
def _exponential_of_bits(bits, LIBDEVICE_LOG: tl.constexpr):
    """torch's Exp(1) draw of one 32-bit Philox output: curand's uniform in (0, 1], then ``-log``."""
    uniform = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    if LIBDEVICE_LOG:
        log = libdevice.fast_logf(uniform)
    else:
        log = tl.log(uniform)
    return -tl.where(uniform >= 0.99999994039535522, -5.9604644775390625e-08, log)


@triton.jit
def _exponential_at_kernel(streams_ptr, tokens_ptr, out_ptr, num_cols, BLOCK: tl.constexpr,
                           LIBDEVICE_LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    tokens = tl.load(tokens_ptr + row * num_cols + cols, mask=mask, other=0)
    tl.store(out_ptr + row * num_cols + cols, _exponential(streams_ptr, row, tokens, LIBDEVICE_LOG), mask=mask)


def exponential_at(streams: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(R, 4) int64 streams and (R, K) int64 token ids -> (R, K) float32 Exp(1) draws; see
    ``reference.exponential_at`` for the semantics."""
    if not use_triton(token_ids):
        return reference.exponential_at(streams, token_ids)
    streams, token_ids = streams.contiguous(), token_ids.contiguous()
    out = torch.empty(token_ids.shape, dtype=torch.float32, device=token_ids.device)
    if token_ids.numel():
        grid = (token_ids.shape[0], cdiv(token_ids.shape[1], BLOCK))
        _exponential_at_kernel[grid](streams, token_ids, out, token_ids.shape[1], BLOCK=BLOCK,
                                     LIBDEVICE_LOG=not triton_interpret_enabled())
    return out


@triton.jit
def _block_stats_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, vocab, block_max_ptr, block_sum_ptr,
                        peak_values_ptr, peak_indices_ptr, second_ptr, top_k_ptr, num_blocks, BLOCK: tl.constexpr,
                        PEAKS: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    row = tl.load(rows_ptr + index)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    scaled = tl.div_rn(logits, tl.load(temperature_ptr + index))
    largest = tl.max(scaled, axis=0)
    total = tl.sum(tl.where(mask, tl.exp(scaled - largest), 0.0), axis=0)
    tl.store(block_max_ptr + index * num_blocks + block, largest)
    tl.store(block_sum_ptr + index * num_blocks + block, total)
    if PEAKS > 0:
        top_k = tl.load(top_k_ptr + index)
        if (top_k > 0) & (top_k < vocab):  # a top-k row: no peaks, every block that reaches its cutoff is read
            tl.store(second_ptr + index * num_blocks + block, float("inf"))
        else:
            # [PEAKS, BLOCK // PEAKS]: each sub-block's largest token and, with it set aside, the next largest
            sub = tl.reshape(scaled, [PEAKS, BLOCK // PEAKS])
            peak_values, peak_offsets = tl.max(sub, axis=1, return_indices=True)
            offsets = tl.arange(0, BLOCK // PEAKS)
            rest = tl.where(offsets[None, :] == peak_offsets[:, None], float("-inf"), sub)
            second = tl.max(tl.max(rest, axis=1), axis=0)
            peaks = (index * num_blocks + block) * PEAKS + tl.arange(0, PEAKS)
            tl.store(peak_values_ptr + peaks, peak_values)
            tl.store(peak_indices_ptr + peaks,
                     block * BLOCK + tl.arange(0, PEAKS) * (BLOCK // PEAKS) + peak_offsets)
            tl.store(second_ptr + index * num_blocks + block, second)


def block_stats(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                top_k: torch.Tensor | None = None):
    """``reference.block_stats`` of ``logits[rows]`` in blocks of ``BLOCK`` tokens: the one full read of the
    logits that the sampler makes. Returns (block_max, block_sum), and with ``top_k`` ((R,) int64, the rows'
    top-k) also the ``BlockPeaks`` that let ``gather_candidates`` skip reading most blocks (None where torch
    runs: it reads the rows anyway). Rows with top-k (0 < k < V) get none (``second`` +inf: their blocks are
    read): their cutoff, the k-th largest block maximum, leaves few blocks to read, and the peaks cost more than
    that (H200: top-k 20 + top-p 128 µs with them, 111 without)."""
    peaks = top_k is not None
    if not use_triton(logits):
        stats = reference.block_stats(logits[rows], temperature, BLOCK)
        return (*stats, None) if peaks else stats
    num_rows, num_blocks = rows.shape[0], cdiv(logits.shape[1], BLOCK)
    block_max = torch.empty((num_rows, num_blocks), dtype=torch.float32, device=logits.device)
    block_sum = torch.empty_like(block_max)
    found = BlockPeaks(torch.empty((num_rows, num_blocks, PEAKS), dtype=torch.float32, device=logits.device),
                       torch.empty((num_rows, num_blocks, PEAKS), dtype=torch.int32, device=logits.device),
                       torch.empty_like(block_max)) if peaks else None
    if num_rows:
        peak_tensors = found if peaks else (block_max, block_max, block_max)  # (not written without peaks)
        _block_stats_kernel[(num_rows, num_blocks)](logits, rows, logits.stride(0), temperature, logits.shape[1],
                                                    block_max, block_sum, *peak_tensors,
                                                    top_k.contiguous() if peaks else rows, num_blocks, BLOCK=BLOCK,
                                                    PEAKS=PEAKS if peaks else 0)
    return (block_max, block_sum, found) if peaks else (block_max, block_sum)


@triton.jit
def _append_candidates(values_ptr, indices_ptr, count_ptr, index, capacity, qualifies, values, tokens):
    """Append the qualifying (value, token) pairs of a vector to row ``index``'s slots: an atomic on the row's
    count reserves them; pairs past ``capacity`` are counted, not stored."""
    flags = qualifies.to(tl.int32)
    start = tl.atomic_add(count_ptr + index, tl.sum(flags, axis=0))
    slots = start + tl.cumsum(flags, axis=0) - 1
    stored = qualifies & (slots < capacity)
    tl.store(values_ptr + index * capacity + slots, values, mask=stored)
    tl.store(indices_ptr + index * capacity + slots, tokens.to(tl.int64), mask=stored)


@triton.jit
def _candidates_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, cutoff_ptr, block_max_ptr, vocab,
                       values_ptr, indices_ptr, count_ptr, peak_values_ptr, peak_indices_ptr, second_ptr, capacity,
                       num_blocks, BLOCK: tl.constexpr, PEAKS: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cutoff = tl.load(cutoff_ptr + index)
    reaches = tl.load(block_max_ptr + index * num_blocks + block) >= cutoff  # other blocks are not even read
    read_block = reaches
    if PEAKS > 0:  # a block whose qualifying tokens are all sub-block peaks hands in its peaks instead
        read_block = reaches & (tl.load(second_ptr + index * num_blocks + block) >= cutoff)
        if reaches & ~read_block:
            peaks = (index * num_blocks + block) * PEAKS + tl.arange(0, PEAKS)
            peak_values = tl.load(peak_values_ptr + peaks)
            peak_indices = tl.load(peak_indices_ptr + peaks)
            # (a peak past the vocabulary is -inf: it never qualifies here, a cutoff of -inf reads the block)
            _append_candidates(values_ptr, indices_ptr, count_ptr, index, capacity, peak_values >= cutoff,
                               peak_values, peak_indices)
    if read_block:
        row = tl.load(rows_ptr + index)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        scaled = tl.div_rn(logits, tl.load(temperature_ptr + index))
        _append_candidates(values_ptr, indices_ptr, count_ptr, index, capacity, mask & (scaled >= cutoff), scaled,
                           cols)


def gather_candidates(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, cutoff: torch.Tensor,
                      block_max: torch.Tensor, capacity: int = DEFAULT_CAPACITY, count: torch.Tensor | None = None,
                      peaks: BlockPeaks | None = None):
    """``reference.gather_candidates`` of ``logits[rows]``, except that the slots past a row's count are left
    unwritten (their content is unspecified: readers mask by the count); only the blocks whose ``block_max`` (from
    ``block_stats``) reaches the cutoff are read, and with ``peaks`` (``block_stats(..., top_k)``) only those
    whose qualifying tokens are not all sub-block peaks. ``count``: an (R,) int32 zero-filled buffer to count into
    (so that one fill serves several calls), or None for a new one."""
    if not use_triton(logits):
        return reference.gather_candidates(logits[rows], temperature, cutoff, capacity)
    num_rows, device = rows.shape[0], logits.device
    values = torch.empty((num_rows, capacity), dtype=torch.float32, device=device)
    indices = torch.empty((num_rows, capacity), dtype=torch.int64, device=device)
    if count is None:
        count = torch.zeros((num_rows,), dtype=torch.int32, device=device)
    if num_rows:
        peak_tensors = (block_max, block_max, block_max) if peaks is None else peaks  # (unread without peaks)
        _candidates_kernel[(num_rows, block_max.shape[1])](
            logits, rows, logits.stride(0), temperature, cutoff, block_max, logits.shape[1], values, indices, count,
            *peak_tensors, capacity, block_max.shape[1], BLOCK=BLOCK, PEAKS=0 if peaks is None else PEAKS)
    return values, indices, count


@triton.jit
def _race_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, row_max_ptr, floor_ptr, bound_ptr,
                 block_max_ptr, streams_ptr, vocab, best_ptr, best_index_ptr, num_blocks, BLOCK: tl.constexpr,
                 LIBDEVICE_LOG: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    threshold = tl.maximum(tl.load(floor_ptr + index), tl.load(bound_ptr + index))
    largest = tl.load(block_max_ptr + index * num_blocks + block)
    best = -1.0
    best_index = block * BLOCK
    if largest >= threshold:  # else no token of the block can win
        row = tl.load(rows_ptr + index)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        scaled = tl.div_rn(logits, tl.load(temperature_ptr + index))
        weight = tl.exp(scaled - tl.load(row_max_ptr + index))
        ratio = tl.where(mask & (scaled >= threshold), weight / _exponential(streams_ptr, index, cols, LIBDEVICE_LOG),
                         -1.0)
        best = tl.max(ratio, axis=0)
        best_index = tl.argmax(ratio, axis=0) + block * BLOCK
    tl.store(best_ptr + index * num_blocks + block, best)
    tl.store(best_index_ptr + index * num_blocks + block, best_index.to(tl.int64))


def race_blocks(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, row_max: torch.Tensor,
                floor: torch.Tensor, streams: torch.Tensor, block_max: torch.Tensor,
                bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.race_blocks`` of ``logits[rows]``, the noise computed in the kernel from ``streams``; blocks
    whose ``block_max`` is below ``bound`` (no token there can beat a ratio already found) or below ``floor``
    are neither read nor raced (their best is -1); within a block, only tokens at or above both race. A row whose
    ``bound`` is +inf costs one load per block: ``flashserve.kernels.race`` switches rows off that way."""
    if not use_triton(logits):
        return reference.race_blocks(logits[rows], temperature, row_max, floor, bound, streams, BLOCK)
    num_rows, num_blocks = rows.shape[0], block_max.shape[1]
    best = torch.empty((num_rows, num_blocks), dtype=torch.float32, device=logits.device)
    best_index = torch.empty((num_rows, num_blocks), dtype=torch.int64, device=logits.device)
    if num_rows:
        _race_kernel[(num_rows, num_blocks)](
            logits, rows, logits.stride(0), temperature, row_max, floor, bound, block_max, streams.contiguous(),
            logits.shape[1], best, best_index, num_blocks, BLOCK=BLOCK, LIBDEVICE_LOG=not triton_interpret_enabled())
    return best, best_index


def reproduces_torch_exponential(device: torch.device) -> bool:
    """Whether ``exponential_at`` gives exactly the draws of ``exponential_`` on ``device`` (CUDA), for a call that
    takes one draw per thread and ones whose grid is capped (several draws per thread and Philox calls), and the same
    offsets.
    False, too, where this torch lacks what the check needs (``Generator.get_offset``/``set_offset``)."""
    if not all(hasattr(torch.Generator, name) for name in ("get_offset", "set_offset")):
        return False
    generator = torch.Generator(device=device).manual_seed(0x5EED)
    for rows, vocab in ((3, 1000), (2, 400_000), (1, 1_200_000)):
        offset = generator.get_offset()
        stride, increment = torch_stream_layout(rows * vocab, device)
        expected = torch.empty((rows, vocab), device=device).exponential_(generator=generator)
        streams = torch.tensor([[0x5EED, offset // 4, r * vocab, stride] for r in range(rows)], device=device)
        columns = torch.arange(vocab, device=device).expand(rows, -1).contiguous()
        if generator.get_offset() != offset + increment or not torch.equal(exponential_at(streams, columns),
                                                                            expected):
            return False
    return True
