"""Sampling without sorting the vocabulary: top-k / top-p / min-p by partial selection, and the exponential race.

The sampled token of a row is ``argmax(p / q)`` over the tokens that survive top-k, top-p and min-p, with q ~ Exp(1)
per token (equivalent to drawing from p). Two launches replace the sort of the whole row:

1. ``gather_candidates`` (one read of the logits): each row's softmax normaliser and every token whose scaled logit
   ``x = logit / temperature`` is within ``CANDIDATE_DEPTH`` of the row's maximum, compacted into a small buffer.
2. ``sample`` sorts only those candidates, finds the top-k / top-p boundary on them (all tokens tied with the last
   kept one are kept), and races over the survivors; rows without top-k / top-p race over the whole row
   (``race_full_rows``, one more read), since every token can win there.

A row whose boundary the candidates do not determine (more than ``capacity`` candidates, a top-k beyond them, or
a nucleus heavier than their mass) falls back to the sort (``reference.sample_sorted``): exact, slower, and the
one place that waits for the device.

The noise q is either given as a (R, V) tensor or computed where it is needed from the row's Philox stream
(``streams``): ``exponential_at`` computes exactly what ``torch.Tensor.exponential_`` on CUDA writes (curand's
Philox4x32-10, ``-log(u)``) for any element of a call, so a row can sample from its torch.Generator's stream without
materialising V draws. ``torch_stream_layout`` gives the call geometry that torch uses (256-thread blocks, at most
``SMs * max threads per SM / 256`` of them, 4 draws per thread and Philox call).
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import cdiv
from flashserve.kernels.reference import sampling as reference

CANDIDATE_DEPTH = 24.0   # candidates: x >= max(x) - 24, i.e. probability >= e^-24 ~ 4e-11 of the top token's
DEFAULT_CAPACITY = 2048  # candidate slots per row
_BLOCK = 1024
_BLOCKS_PER_CHUNK = 8


def torch_stream_layout(numel: int, device: torch.device) -> tuple[int, int]:
    """(thread stride, Philox offset increment) of a ``numel``-element ``exponential_`` call on ``device`` (CUDA),
    as torch computes them (``calc_execution_policy`` in ATen's DistributionTemplates.h)."""
    props = torch.cuda.get_device_properties(device)
    blocks = min(props.multi_processor_count * (props.max_threads_per_multi_processor // 256), cdiv(numel, 256))
    stride = 256 * blocks
    return stride, ((numel - 1) // (stride * 4) + 1) * 4


@triton.jit
def _exponential(streams_ptr, row, tokens, LIBDEVICE_LOG: tl.constexpr):
    """Exp(1) draws of torch's CUDA ``exponential_`` at ``tokens`` of the stream in row ``row`` of streams
    (``LIBDEVICE_LOG``: CUDA's logf, as torch calls it; Triton's interpreter has no libdevice)."""
    seed = tl.load(streams_ptr + row * 4)
    counter0 = tl.load(streams_ptr + row * 4 + 1)
    base = tl.load(streams_ptr + row * 4 + 2)
    stride = tl.load(streams_ptr + row * 4 + 3)
    element = base + tokens.to(tl.int64)
    quotient = element // stride
    thread = element - quotient * stride
    counter = counter0 + quotient // 4
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = (thread & 0xFFFFFFFF).to(tl.uint32)
    c3 = ((thread >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox_impl(c0, c1, c2, c3, k0, k1)
    component = quotient % 4
    bits = tl.where(component == 0, r0, tl.where(component == 1, r1, tl.where(component == 2, r2, r3)))
    uniform = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    if LIBDEVICE_LOG:
        log = libdevice.log(uniform)
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
        grid = (token_ids.shape[0], cdiv(token_ids.shape[1], _BLOCK))
        _exponential_at_kernel[grid](streams, token_ids, out, token_ids.shape[1], BLOCK=_BLOCK,
                                     LIBDEVICE_LOG=not triton_interpret_enabled())
    return out


@triton.jit
def _candidates_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, row_max_ptr, depth, vocab,
                       mass_ptr, values_ptr, indices_ptr, count_ptr, capacity, num_chunks,
                       BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = tl.load(rows_ptr + index)
    temperature = tl.load(temperature_ptr + index)
    row_max = tl.load(row_max_ptr + index)
    mass = tl.zeros((BLOCK,), dtype=tl.float32)
    for block in range(BLOCKS_PER_CHUNK):
        cols = (chunk * BLOCKS_PER_CHUNK + block) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        scaled = tl.div_rn(logits, temperature)
        mass += tl.where(mask, tl.exp(scaled - row_max), 0.0)
        qualifies = mask & (scaled >= row_max - depth)
        flags = qualifies.to(tl.int32)
        num = tl.sum(flags, axis=0)
        if num > 0:
            start = tl.atomic_add(count_ptr + index, num)
            slots = start + tl.cumsum(flags, axis=0) - 1
            stored = qualifies & (slots < capacity)
            tl.store(values_ptr + index * capacity + slots, scaled, mask=stored)
            tl.store(indices_ptr + index * capacity + slots, cols.to(tl.int64), mask=stored)
    tl.store(mass_ptr + index * num_chunks + chunk, tl.sum(mass, axis=0))


def gather_candidates(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                      capacity: int = DEFAULT_CAPACITY, depth: float = CANDIDATE_DEPTH):
    """``reference.gather_candidates`` of ``logits[rows]`` ((R,) int64 rows of (N, V) logits, temperature (R,))."""
    if not use_triton(logits):
        return reference.gather_candidates(logits[rows], temperature, depth, capacity)
    num_rows, vocab = rows.shape[0], logits.shape[1]
    device = logits.device
    row_max = logits[rows].amax(dim=1).float() / temperature if num_rows < logits.shape[0] else \
        logits.amax(dim=1).float() / temperature
    num_chunks = cdiv(vocab, _BLOCK * _BLOCKS_PER_CHUNK)
    mass = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=device)
    values = torch.full((num_rows, capacity), float("-inf"), dtype=torch.float32, device=device)
    indices = torch.zeros((num_rows, capacity), dtype=torch.int64, device=device)
    count = torch.zeros((num_rows,), dtype=torch.int32, device=device)
    if num_rows:
        _candidates_kernel[(num_rows, num_chunks)](
            logits, rows, logits.stride(0), temperature, row_max, depth, vocab, mass, values, indices, count,
            capacity, num_chunks, BLOCK=_BLOCK, BLOCKS_PER_CHUNK=_BLOCKS_PER_CHUNK)
    return values, indices, count, row_max, mass.sum(dim=1)


@triton.jit
def _race_kernel(logits_ptr, rows_ptr, stride_row, temperature_ptr, row_max_ptr, min_p_ptr, streams_ptr, vocab,
                 best_ptr, best_index_ptr, num_chunks, BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
                 LIBDEVICE_LOG: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = tl.load(rows_ptr + index)
    temperature = tl.load(temperature_ptr + index)
    row_max = tl.load(row_max_ptr + index)
    min_p = tl.load(min_p_ptr + index)
    best = -1.0
    best_index = 0
    for block in range(BLOCKS_PER_CHUNK):
        cols = (chunk * BLOCKS_PER_CHUNK + block) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        weight = tl.exp(tl.div_rn(logits, temperature) - row_max)
        weight = tl.where(mask & (weight >= min_p), weight, 0.0)
        ratio = tl.where(mask, weight / _exponential(streams_ptr, index, cols, LIBDEVICE_LOG), -1.0)
        block_best = tl.max(ratio, axis=0)
        block_index = tl.argmax(ratio, axis=0) + (chunk * BLOCKS_PER_CHUNK + block) * BLOCK
        better = block_best > best
        best_index = tl.where(better, block_index, best_index)
        best = tl.where(better, block_best, best)
    tl.store(best_ptr + index * num_chunks + chunk, best)
    tl.store(best_index_ptr + index * num_chunks + chunk, best_index.to(tl.int64))


def race_full_rows(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor,
                   streams: torch.Tensor) -> torch.Tensor:
    """``reference.race_full_rows`` of ``logits[rows]``, the noise from ``streams`` computed in the kernel."""
    if not use_triton(logits):
        return reference.race_full_rows(logits[rows], temperature, min_p, streams)
    num_rows, vocab = rows.shape[0], logits.shape[1]
    row_max = logits[rows].amax(dim=1).float() / temperature
    num_chunks = cdiv(vocab, _BLOCK * _BLOCKS_PER_CHUNK)
    best = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=logits.device)
    best_index = torch.empty((num_rows, num_chunks), dtype=torch.int64, device=logits.device)
    if num_rows:
        _race_kernel[(num_rows, num_chunks)](
            logits, rows, logits.stride(0), temperature, row_max, min_p, streams.contiguous(), vocab, best,
            best_index, num_chunks, BLOCK=_BLOCK, BLOCKS_PER_CHUNK=_BLOCKS_PER_CHUNK,
            LIBDEVICE_LOG=not triton_interpret_enabled())
    return best_index.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)


def reproduces_torch_exponential(device: torch.device) -> bool:
    """Whether ``exponential_at`` gives exactly the draws of ``exponential_`` on ``device`` (CUDA), for a call that
    takes one draw per thread and one whose grid is capped (four and more per thread), and the same offsets."""
    generator = torch.Generator(device=device).manual_seed(0x5EED)
    for rows, vocab in ((3, 1000), (2, 400_000)):
        offset = generator.get_offset()
        stride, increment = torch_stream_layout(rows * vocab, device)
        expected = torch.empty((rows, vocab), device=device).exponential_(generator=generator)
        streams = torch.tensor([[0x5EED, offset // 4, r * vocab, stride] for r in range(rows)], device=device)
        columns = torch.arange(vocab, device=device).expand(rows, -1).contiguous()
        if generator.get_offset() != offset + increment or not torch.equal(exponential_at(streams, columns),
                                                                            expected):
            return False
    return True
