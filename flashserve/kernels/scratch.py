"""Scratch memory that one kernel of a call writes and a later kernel of the same call reads (split-KV decode's partial
states, a check kernel's flags), or that a kernel writes and nobody reads, and small constant tensors that kernels
only read (an int ``cache_seqlens`` as a length tensor): reused from call to call instead of allocated (and filled)
each time (an allocation from PyTorch's caching allocator costs a few µs of host time, a fill one more launch).

The rule that keeps the reuse safe: one buffer per (device, CUDA stream, host thread), used only by work that
thread queues on that stream while it is the current stream. Work on one stream runs in the order it was queued,
and one thread queues a call's kernels before the next call's, so the kernels of one call are done with the buffer
before those of the next call touch it; a call on another stream gets another buffer, and so does a call from
another thread (Triton releases the GIL while it launches, so two threads' launches on one stream can interleave).
Nothing that leaves a call (its outputs) may live in scratch memory.
While the current stream is capturing a CUDA graph nothing is reused: the call gets fresh memory from the graph's
own pool, which the graph keeps for its replays (a cached buffer could later be replaced and freed while a graph
still points at it). A buffer grows to the largest request and never shrinks; a replaced one goes back to the
caching allocator, which hands it out again only to work on the stream it was allocated on (this one), after the
work already queued there.
"""
from threading import get_ident

import torch

from flashserve.kernels._launch import bounded_put

_MAX_BUFFERS = 64
_MAX_VIEWS = 64
_MAX_CONSTANTS = 64
_MAX_EXACT = 64


class StreamScratch:
    """fp32 scratch buffers, one per (device, current stream, thread); the dicts need nothing beyond the GIL."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        # (device, stream, thread, numel, offsets) -> (views of its buffer, their data pointers)
        self._views: dict[tuple, tuple] = {}
        self._constants: dict[tuple, torch.Tensor] = {}  # (device, stream, numel, value) -> read-only int32 tensor
        self._exact: dict[tuple, torch.Tensor] = {}  # (device, stream, thread, numel, dtype) -> tensor

    def views(self, device: torch.device, numel: int, offsets: tuple) -> tuple:
        """``buffer[offset:]`` for each offset of ``offsets``, ``buffer`` holding at least ``numel`` fp32 values
        (contents undefined), for work queued on the current stream of ``device``."""
        return self.slices(device, numel, offsets)[0]

    def slices(self, device: torch.device, numel: int, offsets: tuple) -> tuple:
        """(``views(device, numel, offsets)``, their data pointers): for launches that pass pointers. The pointers
        stay valid while the views live: the caller keeps them until its kernels are queued (while a graph is
        captured they are the only reference to a fresh buffer)."""
        stream = _current_stream(device)
        if stream is _CAPTURING:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            return _slices(buffer, offsets)
        key = (device, stream, get_ident(), numel, offsets)
        slices = self._views.get(key)
        if slices is not None:
            return slices
        owner = key[:3]
        buffer = self._buffers.get(owner)
        if buffer is None or buffer.numel() < numel:
            self._views = {k: v for k, v in self._views.items() if k[:3] != owner}
            if buffer is None and len(self._buffers) >= _MAX_BUFFERS:  # many threads: the oldest buffer goes
                oldest = next(iter(self._buffers))
                del self._buffers[oldest]
                self._views = {k: v for k, v in self._views.items() if k[:3] != oldest}
            buffer = self._buffers[owner] = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
        slices = _slices(buffer, offsets)
        if len(self._views) < _MAX_VIEWS:
            self._views[key] = slices
        return slices

    def constant(self, device: torch.device, numel: int, value: int) -> torch.Tensor:
        """A (numel,) int32 tensor of ``value`` for work queued on the current stream of ``device`` that only reads
        it (the same tensor for the same request on the same stream; a fresh one while capturing)."""
        stream = _current_stream(device)
        if stream is _CAPTURING:
            return torch.full((numel,), value, dtype=torch.int32, device=device)
        key = (device, stream, numel, value)
        tensor = self._constants.get(key)
        if tensor is None:
            tensor = bounded_put(self._constants, key, torch.full((numel,), value, dtype=torch.int32, device=device),
                                 _MAX_CONSTANTS)
        return tensor

    def exact(self, device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A (numel,) tensor of ``dtype`` (contents undefined) for work queued on the current stream of ``device``
        (one per device, stream, thread, size and dtype; a fresh one while capturing): for a small result that a
        kernel writes in full and the same call reads back (a check kernel's flags, copied to the host)."""
        stream = _current_stream(device)
        if stream is _CAPTURING:
            return torch.empty(numel, dtype=dtype, device=device)
        key = (device, stream, get_ident(), numel, dtype)
        tensor = self._exact.get(key)
        if tensor is None:
            tensor = bounded_put(self._exact, key, torch.empty(numel, dtype=dtype, device=device), _MAX_EXACT)
        return tensor

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()
        self._constants.clear()
        self._exact.clear()


_CAPTURING = object()


def _slices(buffer: torch.Tensor, offsets: tuple) -> tuple:
    views = tuple(buffer[offset:] for offset in offsets)
    return views, tuple(view.data_ptr() for view in views)


def _current_stream(device: torch.device):
    """The current stream of a CUDA device as a raw handle (None off CUDA); _CAPTURING while it captures a graph."""
    index = _CUDA_INDICES.get(device, _CUDA_INDICES)  # (_cuda_index, inline)
    if index is _CUDA_INDICES:
        index = _cuda_index(device)
    if index is _NOT_CUDA:
        return None
    if torch.cuda.is_current_stream_capturing():
        return _CAPTURING
    return torch._C._cuda_getCurrentRawStream(index)


_NOT_CUDA = object()
_CUDA_INDICES: dict[torch.device, object] = {}  # device -> its index, _NOT_CUDA off CUDA (device.type: ~0.2 µs)


def _cuda_index(device: torch.device):
    index = _CUDA_INDICES.get(device, _CUDA_INDICES)
    if index is _CUDA_INDICES:
        index = _CUDA_INDICES[device] = device.index if device.type == "cuda" else _NOT_CUDA
    return index


# The library's scratch memory (decode's split-KV partial states, int lengths as tensors).
SCRATCH = StreamScratch()
