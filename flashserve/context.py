"""The attention metadata of one forward pass, shared by the model runner (which sets it) and the attention
layers (which read it), so that the model's signature stays ``forward(input_ids, positions)``."""
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SharedPrefix:
    """A decode batch's shared prefix for cascade attention (``flashserve.kernels.cascade.cascade_decode``): every
    request's first ``length`` keys are the same cached blocks (the first columns of the context's block table).

    Attributes:
        length: (1,) int32 on the device, the number of shared keys (a multiple of the block size), read by the
            kernels (so a captured CUDA graph replays for any prefix length).
    """

    length: torch.Tensor


@dataclass(slots=True)
class AttentionContext:
    """Metadata of the batch being run; all index tensors live on the model's device.

    Tokens of the batch are packed: request ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q.

    Attributes:
        slot_mapping: (num_tokens,) int64, cache slot of each new token (``block * block_size + row``); -1 skips.
        cu_seqlens_q: (B + 1,) int32 cumulative query lengths.
        seqused_k: (B,) int32 KV length of each request after this step's tokens are written.
        block_table: (B, max_blocks) int32 block ids of each request (padding entries are ignored).
        max_seqlen_q: largest query length in the batch.
        max_seqlen_k: largest KV length in the batch.
        is_decode: every request has exactly one query token.
        shared_prefix: set on a decode step that runs cascade attention, else None.
    """

    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool
    shared_prefix: SharedPrefix | None = None


_context: AttentionContext | None = None


def set_context(context: AttentionContext | None) -> None:
    """Install the metadata of the next forward pass (None clears it)."""
    global _context
    _context = context


def get_context() -> AttentionContext:
    """The metadata of the forward pass in progress; raises RuntimeError when none is set."""
    if _context is None:
        raise RuntimeError("no attention context is set: run the model through the model runner")
    return _context
