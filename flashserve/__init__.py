"""flashserve: a fast, small, readable LLM inference engine whose attention runs on its own Triton kernels.

``from flashserve import LLM, SamplingParams`` gives vLLM's offline interface. The names are imported on first
use, so that ``import flashserve.kernels`` stays light and free of import cycles.
"""
import importlib

from flashserve.logger import configure_logging

__version__ = "0.1.0"
configure_logging()

_EXPORTS = {
    "LLM": "flashserve.llm",
    "SamplingParams": "flashserve.sampling_params",
    "StructuredOutputsParams": "flashserve.sampling_params",
    "RequestOutput": "flashserve.outputs",
    "CompletionOutput": "flashserve.outputs",
    "Logprob": "flashserve.outputs",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flashserve' has no attribute {name!r}")
