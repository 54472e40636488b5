"""Persistent zeroed counters for kernels that hand out atomic tickets (split-K GEMM, stream-K, the decode kernel's
in-kernel combine): the program that takes the last ticket of its group resets the group's counter to 0, so every
launch leaves the buffer as it found it and no launch needs a memset of its own.

One buffer per (device, owner): kernels of different owners never share counters, and launches of one owner run one
after another on a stream (a launch's counters are back to zero when it ends).
"""
import torch

DEFAULT_SLOTS = 4096
_buffers: dict[tuple[torch.device, str], torch.Tensor] = {}


def zeroed_counters(device: torch.device, owner: str, slots: int = DEFAULT_SLOTS) -> torch.Tensor:
    """At least ``slots`` zeroed int32 counters of ``owner`` on ``device`` (a 1-D tensor, reused by every call).

    Made (or grown) at the first call that needs it, which must not be inside a CUDA-graph capture (the engine's
    warm-up makes them first): RuntimeError otherwise."""
    key = (device, owner)
    counters = _buffers.get(key)
    if counters is None or counters.numel() < slots:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the first {owner} launch needing {slots} counters on a device must run before "
                               "CUDA-graph capture")
        counters = _buffers[key] = torch.zeros(max(slots, DEFAULT_SLOTS), dtype=torch.int32, device=device)
    return counters
