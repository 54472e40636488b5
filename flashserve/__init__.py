"""flashserve: a fast, small, readable LLM inference engine whose attention runs on its own Triton kernels."""
__version__ = "0.1.0"
