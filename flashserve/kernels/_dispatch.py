"""Which implementation a kernel call runs: the Triton kernel or the plain-PyTorch reference.

Rules, in order:
1. ``FLASHSERVE_ATTENTION_BACKEND=torch`` forces the PyTorch reference on any device.
2. CUDA tensors run the Triton kernels.
3. CPU tensors run the Triton kernels when ``TRITON_INTERPRET=1`` (Triton's interpreter; this is how CI tests the
   kernels), otherwise the PyTorch reference.
"""
import os

import torch


def triton_interpret_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a call whose main input is ``tensor`` should run the Triton kernel."""
    if _backend_set() and os.environ.get(_BACKEND, "").lower() == "torch":
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and triton_interpret_enabled()


_BACKEND = "FLASHSERVE_ATTENTION_BACKEND"
# os.environ's own mapping (CPython: encoded keys), so that the common case, the variable unset, costs one dict
# look-up: os.environ.get raises and catches a KeyError for it (~0.5 µs, on every eager kernel call).
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.environ.encodekey(_BACKEND) if hasattr(os.environ, "encodekey") else None


def _backend_set() -> bool:
    """Whether FLASHSERVE_ATTENTION_BACKEND may be set (True where os.environ has no mapping of its own)."""
    return _ENVIRON_DATA is None or _BACKEND_KEY is None or _BACKEND_KEY in _ENVIRON_DATA
