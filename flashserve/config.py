"""Engine configuration: the options of ``LLM(...)``, validated once."""
import os
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class Config:
    """Options of one engine.

    Attributes:
        model: a local checkpoint directory (config.json, safetensors weights, tokenizer files). Nothing is downloaded.
        tokenizer: a directory to load the tokenizer from instead of ``model``.
        dtype: "auto" (the checkpoint's torch_dtype), "float32", "float16" or "bfloat16" (or that torch.dtype, kept
            as its name).
        device: "cuda", "cuda:N" or "cpu"; None picks CUDA when available, else the CPU.
        max_model_len: the longest prompt + output in tokens; None takes the checkpoint's max_position_embeddings.
        block_size: tokens per KV-cache block (>= 1).
        gpu_memory_utilization: on CUDA, the fraction of the GPU's memory the engine may use (weights, activations
            and the KV cache); the KV pool gets what is left after a profiling forward pass.
        num_kv_blocks: the KV pool size in blocks; overrides the automatic sizing. A pool smaller than one
            ``max_model_len`` sequence is allowed: requests that could outgrow it are rejected by ``add_request``.
        max_num_seqs: the most requests running at once.
        max_num_batched_tokens: the token budget of one step (prompt chunks plus decodes).
        enable_prefix_caching: reuse the KV of full blocks shared with earlier prompts.
        enforce_eager: never capture CUDA graphs: every step runs eagerly (on CUDA, decode-only steps otherwise
            replay graphs captured at start-up; see ``flashserve.engine.cuda_graphs``).
        max_cudagraph_capture_size: the largest decode batch captured in a CUDA graph (vLLM's name); None means
            ``min(2 * max_num_seqs, 512)``. Decode batches above it run eagerly. Sizes past the first one that
            holds the largest possible decode batch (``min(max_num_seqs, max_num_batched_tokens)``) would never
            replay and are not captured.
        seed: seed of the random stream used by requests without their own seed.
        async_scheduling: schedule and launch each step before the host has read the previous step's sampled
            tokens, and do that step's host work (stop checks, detokenization, outputs) while the device runs the
            next one (vLLM's name; ``flashserve.engine.inflight``). Same outputs for greedy and seeded requests;
            False runs every step synchronously.
        tensor_parallel_size: the number of ranks (GPUs, or CPU processes) the model is split over
            (``flashserve.distributed``); 1 runs it in this process alone.
    """

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_cudagraph_capture_size: int | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ValueError(f"model must be a local checkpoint directory, got {self.model!r}")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model directory {self.model!r} has no config.json: it must be a Hugging Face "
                             "checkpoint directory (config.json, safetensors weights, tokenizer files)")
        if self.tokenizer is not None and not os.path.isdir(self.tokenizer):
            raise ValueError(f"tokenizer must be a local directory, got {self.tokenizer!r}")
        names = {dtype: name for name, dtype in DTYPES.items()}
        if isinstance(self.dtype, torch.dtype) and self.dtype in names:
            self.dtype = names[self.dtype]
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True or False, got {self.async_scheduling!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"device {self.device!r} is not a valid torch device") from error
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_cudagraph_capture_size is None:
            self.max_cudagraph_capture_size = min(2 * self.max_num_seqs, 512)
        elif type(self.max_cudagraph_capture_size) is not int or self.max_cudagraph_capture_size < 1:
            raise ValueError("max_cudagraph_capture_size must be an int >= 1, "
                             f"got {self.max_cudagraph_capture_size!r}")

        if type(self.tensor_parallel_size) is not int or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}")

    @property
    def torch_device(self) -> torch.device:
        """The device as a ``torch.device``."""
        return torch.device(self.device)
