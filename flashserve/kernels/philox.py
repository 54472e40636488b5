"""Exp(1) noise from Philox streams, exactly as torch's CUDA ``exponential_`` draws it, at any element of a call.

The sampler's race (``flashserve.kernels.sampling``) needs q ~ Exp(1) per token. ``exponential_at`` computes
exactly what ``torch.Tensor.exponential_`` on CUDA writes (curand's Philox4x32-10, ``-log(u)``) for any element of
a call, so a row samples from its torch.Generator's stream without materialising V draws; ``_exponential`` does
the same inside other kernels. A row's stream is (seed, Philox counter, element base, thread stride): the call's
generator seed and offset / 4, where the row's draws start in the call, and the call's thread stride.
``torch_stream_layout`` gives the call geometry that torch uses (256-thread blocks, at most
``SMs * max threads per SM / 256`` of them, 4 draws per thread and Philox call), and
``reproduces_torch_exponential`` checks the whole at start-up.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from flashserve.kernels._dispatch import triton_interpret_enabled, use_triton
from flashserve.kernels._launch import cdiv
from flashserve.kernels.reference import sampling as reference

BLOCK = 1024  # draws per program of ``exponential_at``


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
