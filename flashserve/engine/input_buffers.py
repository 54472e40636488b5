"""Packs a scheduled batch into the index tensors of a forward pass, through persistent host and device buffers.

Every step writes ``input_ids``, ``positions``, ``slot_mapping``, ``cu_seqlens_q``, ``seqused_k``, ``block_table``
and ``logits_indices`` into preallocated host arrays with a few vectorised numpy operations (the only Python loops
walk the requests, never their tokens or blocks one by one), then copies the used prefix of each into a
preallocated device buffer. On CUDA the host arrays are pinned and the copies ``non_blocking``: nothing is allocated
and nothing waits for the device, and the device buffers keep their addresses from step to step (what CUDA graph
capture needs). Before the host arrays are rewritten, the previous step's copies are waited for (an event that has
normally completed long before). On CPU the host arrays are the device buffers.

The block table keeps a fixed width of ``max_blocks_per_seq`` columns; entries past a request's blocks are stale
ids of earlier steps (valid block ids, never read: attention stops at ``seqused_k``).

A decode step replayed from a CUDA graph captured for ``padded_size`` rows is packed with padding rows after the
real ones: token 0 at position 0, slot -1 (no cache write), KV length 0 (no key read); their outputs are ignored.
"""
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from flashserve.context import AttentionContext
from flashserve.engine.scheduler import ScheduledBatch


@dataclass(slots=True)
class StepInputs:
    """What the forward pass of one step reads: input_ids and positions (T,) int64, the attention context, and
    logits_indices (S,) int64, the packed row of the last token of each request that samples."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    context: AttentionContext
    logits_indices: torch.Tensor


class _Buffer:
    """One host array (pinned on CUDA) and its device twin (the same memory on CPU)."""

    __slots__ = ("host", "array", "device")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=on_cuda)
        self.array = self.host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device) if on_cuda else self.host

    def upload(self, rows: int) -> torch.Tensor:
        """The first ``rows`` rows on the device (copied without waiting on CUDA)."""
        if self.device is not self.host:
            self.device[:rows].copy_(self.host[:rows], non_blocking=True)
        return self.device[:rows]


class InputBuffers:
    """Persistent buffers for batches of at most ``max_num_seqs`` requests and ``max_num_tokens`` tokens.

    Args:
        max_num_tokens: the most tokens of a step (``max_num_batched_tokens``).
        max_num_seqs: the most requests of a step.
        max_blocks_per_seq: block-table width, ``ceil(max_model_len / block_size)``.
        block_size: tokens per KV block.
        device: where the forward pass runs.
    """

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device):
        self.block_size = block_size
        self.device = device
        self.input_ids = _Buffer((max_num_tokens,), torch.int64, device)
        self.positions = _Buffer((max_num_tokens,), torch.int64, device)
        self.slot_mapping = _Buffer((max_num_tokens,), torch.int64, device)
        self.cu_seqlens_q = _Buffer((max_num_seqs + 1,), torch.int32, device)
        self.seqused_k = _Buffer((max_num_seqs,), torch.int32, device)
        self.block_table = _Buffer((max_num_seqs, max_blocks_per_seq), torch.int32, device)
        self.logits_indices = _Buffer((max_num_seqs,), torch.int64, device)
        self._copies_done = torch.cuda.Event() if device.type == "cuda" else None

    def prepare(self, batch: ScheduledBatch, padded_size: int | None = None) -> StepInputs:
        """Pack ``batch`` (requests before their ``num_computed_tokens`` advances) into the step's inputs.

        ``padded_size`` (decode-only batches, >= the number of requests): add padding rows up to that many.
        """
        self._wait_for_copies()
        requests = batch.requests
        num_reqs = len(requests)
        num_new = np.array(batch.num_new_tokens, dtype=np.int64)
        starts = np.fromiter((r.num_computed_tokens for r in requests), dtype=np.int64, count=num_reqs)
        ends = starts + num_new
        cu_seqlens_q = self.cu_seqlens_q.array[:num_reqs + 1]
        cu_seqlens_q[0] = 0
        np.cumsum(num_new, out=cu_seqlens_q[1:])
        num_tokens = int(cu_seqlens_q[-1])
        self.seqused_k.array[:num_reqs] = ends
        self.input_ids.array[:num_tokens] = np.fromiter(
            chain.from_iterable(r.token_ids[s:e] for r, s, e in zip(requests, starts.tolist(), ends.tolist())),
            dtype=np.int64, count=num_tokens)
        num_blocks = np.fromiter((len(r.block_ids) for r in requests), dtype=np.int64, count=num_reqs)
        block_ids = np.fromiter(chain.from_iterable(r.block_ids for r in requests), dtype=np.int32,
                                count=int(num_blocks.sum()))
        block_rows = np.repeat(np.arange(num_reqs), num_blocks)
        block_cols = np.arange(block_ids.size) - np.repeat(np.cumsum(num_blocks) - num_blocks, num_blocks)
        block_table = self.block_table.array
        block_table[block_rows, block_cols] = block_ids
        token_rows = np.repeat(np.arange(num_reqs), num_new)
        positions = self.positions.array[:num_tokens]
        np.subtract(np.arange(num_tokens), np.repeat(cu_seqlens_q[:-1] - starts, num_new), out=positions)
        size = self.block_size
        self.slot_mapping.array[:num_tokens] = block_table[token_rows, positions // size] * size + positions % size
        logits_indices = cu_seqlens_q[1:][np.array(batch.samples, dtype=bool)] - 1
        self.logits_indices.array[:logits_indices.size] = logits_indices
        if padded_size is not None:
            self._write_padding(num_reqs, padded_size)
            num_reqs = num_tokens = padded_size
        return self._upload(num_tokens, num_reqs, int(num_new.max()), int(ends.max()), logits_indices.size)

    def prepare_padding(self, num_reqs: int) -> StepInputs:
        """A decode step of ``num_reqs`` padding rows only (for warm-up and CUDA-graph capture)."""
        self._wait_for_copies()
        self.cu_seqlens_q.array[0] = 0
        self._write_padding(0, num_reqs)
        return self._upload(num_reqs, num_reqs, 1, 0, num_reqs)

    def _write_padding(self, start: int, stop: int) -> None:
        """Rows ``start:stop`` of a decode step become padding (see the module docstring)."""
        self.input_ids.array[start:stop] = 0
        self.positions.array[start:stop] = 0
        self.slot_mapping.array[start:stop] = -1
        self.seqused_k.array[start:stop] = 0
        self.cu_seqlens_q.array[start + 1:stop + 1] = np.arange(start + 1, stop + 1)
        self.logits_indices.array[start:stop] = np.arange(start, stop)

    def _upload(self, num_tokens: int, num_reqs: int, max_seqlen_q: int, max_seqlen_k: int,
                num_logits: int) -> StepInputs:
        """Copy the first rows of every host array to the device and describe them."""
        context = AttentionContext(
            slot_mapping=self.slot_mapping.upload(num_tokens),
            cu_seqlens_q=self.cu_seqlens_q.upload(num_reqs + 1),
            seqused_k=self.seqused_k.upload(num_reqs),
            block_table=self.block_table.upload(num_reqs),
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            is_decode=num_tokens == num_reqs,
        )
        inputs = StepInputs(self.input_ids.upload(num_tokens), self.positions.upload(num_tokens), context,
                            self.logits_indices.upload(num_logits))
        if self._copies_done is not None:
            self._copies_done.record()
        return inputs

    def _wait_for_copies(self) -> None:
        """Wait until the previous step's host-to-device copies have read the host arrays."""
        if self._copies_done is not None:
            self._copies_done.synchronize()
