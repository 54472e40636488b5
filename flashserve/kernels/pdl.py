"""Programmatic dependent launch (PDL, sm_90+): whether the kernels use it on a device, and their device helpers.

A kernel launched with PDL (Triton's ``launch_pdl=True`` launch option) may start while the kernel before it on the
stream (or in the CUDA graph) is still running: as soon as every program of that kernel has executed
``gdc_launch_dependents`` (or exited). That hides the launch latency and lets the new kernel's dependency-free
prologue (a matrix product pulling its first weight tiles into L2) overlap the previous kernel's tail.

The rule every kernel launched with PDL follows: ``gdc_wait()`` in every program before its first global memory
access other than a read of weights (activations, residual stream, KV cache, block tables, counters, scratch and
outputs included: the caching allocator may hand this kernel memory the previous one still reads). ``gdc_wait``
returns once the previous kernel has completed and its writes are visible; since that kernel waited for its own
predecessor in the same way, everything earlier on the stream is complete too. ``gdc_launch_dependents`` only lets
the *next* kernel launch (its own ``gdc_wait`` still waits for this kernel's completion), so it is never a
correctness question; the kernels call it right after their ``gdc_wait``, so that at most two kernels overlap
(the running one and the next one's prologue). A PDL kernel after a plain launch (a torch op) behaves as a plain
launch; a plain launch after a PDL kernel waits for its completion as always.

What counts as a weight: a tensor no kernel writes while the kernels run (the engine loads its weights at start-up).

``enabled(device)``: CUDA, compute capability >= 9, not Triton's interpreter, a Triton with ``gdc_wait``, and
``FLASHSERVE_PDL`` not "0". Decided at the first launch on each device and kept (a dictionary lookup per launch);
``refresh()`` forgets the decisions, so that a process can compare both (the kernels' launch caches key on the
flag, or on the device and ``generation``). Kernels take a ``PDL: tl.constexpr`` and follow the rule through
``wait_for_previous(PDL)``; with ``PDL=False`` they compile exactly as without PDL.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from flashserve.kernels._dispatch import triton_interpret_enabled

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: enabled() is False, the PDL branches never compile
    gdc_launch_dependents = gdc_wait = None

__all__ = ["enabled", "refresh", "launch_options", "wait_for_previous", "prefetch_l2"]
HAS_GDC = gdc_wait is not None
MIN_CAPABILITY_MAJOR = 9
_decisions: dict[torch.device, bool] = {}
# Bumped by refresh(): between two refreshes ``enabled(device)`` is one value per device, so a cache key holding the
# device and ``generation`` (one global read) determines it as well as ``enabled(device)`` does (a dictionary lookup).
generation = 0


@functools.lru_cache(maxsize=None)
def _device_supports(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= MIN_CAPABILITY_MAJOR


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use programmatic dependent launch (see the module docstring)."""
    decision = _decisions.get(device)
    if decision is None:
        decision = _decisions[device] = _decide(device)
    return decision


def _decide(device: torch.device) -> bool:
    if device.type != "cuda" or not HAS_GDC or os.environ.get("FLASHSERVE_PDL", "1") == "0":
        return False
    if triton_interpret_enabled():
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def refresh() -> None:
    """Forget the decisions of ``enabled``: the next launch on each device reads the switches again."""
    global generation
    generation += 1
    _decisions.clear()


def launch_options(pdl: bool) -> dict:
    """The Triton launch options of a launch with (``{"launch_pdl": True}``) or without (``{}``) PDL."""
    return _PDL_OPTIONS if pdl else _NO_OPTIONS


_PDL_OPTIONS, _NO_OPTIONS = {"launch_pdl": True}, {}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """The rule of the module docstring, in every PDL kernel: with ``PDL``, wait for the previous kernel (complete,
    its writes visible), then let the next kernel launch; without it, nothing (the kernel compiles as without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line at each pointer (a hint: no registers, no wait; for weights before gdc_wait)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
