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
    if os.environ.get("FLASHSERVE_ATTENTION_BACKEND", "").lower() == "torch":
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and triton_interpret_enabled()
