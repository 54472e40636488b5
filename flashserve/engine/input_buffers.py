"""Packs a scheduled batch into the index tensors of a forward pass, through persistent host and device buffers.

Every step writes ``input_ids``, ``positions``, ``slot_mapping``, ``cu_seqlens_q``, ``seqused_k``, ``block_table``
and ``logits_indices`` into preallocated host arrays with a few vectorised numpy operations (the only Python loops
walk the requests, never their tokens or blocks one by one). Each request's block-table row persists across steps
and only its new blocks are written (``_BlockRows``), so a decode step costs O(requests), not O(blocks). The arrays
are views of one host arena at fixed offsets, mirrored by one device arena, and a step uploads them with a single
copy (from the arena's start to the last block-table row it uses): one transfer instead of one per array, which
matters where each driver call costs tens of µs. On CUDA the host arena is pinned and the copy ``non_blocking``:
nothing is allocated and nothing waits for the device, and the device arrays keep their addresses from step to
step (what CUDA graph capture needs). Before the host arrays are rewritten, the previous step's copy is waited for
(an event that has normally completed long before). On CPU the host arena is the device arena.

The block table keeps a fixed width of ``max_blocks_per_seq`` columns; entries past a request's blocks are stale
ids of earlier steps (valid block ids, never read: attention stops at ``seqused_k``).

Under tensor parallelism the arena is also the step's message to the other ranks: it starts with a header (the
message kind, the used sizes of the arrays, the CUDA-graph size, the number of prompt-logprob rows) and holds the
packed rows whose logits score prompt tokens (``prompt_rows``), so rank 0 sends a whole step — or the end of a
``generate`` call, or shutdown — in one broadcast of the device arena, which lands at the same addresses on the
other ranks (their graphs read it in place); they read the header back with ``read_header``.

With async scheduling (``flashserve.engine.inflight``) the input id of a request's last token may be one the
previous step sampled and the host has not read: ``carried_rows`` (packed rows) and ``carried_from`` (indices into
that step's sampled tokens) travel in the arena, and right after the upload one gather on the device writes those
input ids (queued after the copy, before the forward pass and before the arena is broadcast to the other ranks); a
decode step whose requests are those of the previous step, in order (``CarriedTokens.in_order``), takes them with
one copy of that step's tokens instead.

A decode step replayed from a CUDA graph captured for ``padded_size`` rows is packed with padding rows after the
real ones: token 0 at position 0, slot -1 (no cache write), KV length 0 (no key read); their outputs are ignored.
"""
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from flashserve.context import AttentionContext
from flashserve.engine.inflight import CarriedTokens
from flashserve.engine.scheduler import ScheduledBatch

# message kinds of the header's first entry: a step to run, the end of an LLM.generate call, shutdown
STEP, END_OF_CALL, SHUTDOWN = 1, 2, 3


@dataclass(slots=True)
class StepHeader:
    """The header of the arena: what a step holds (``padded_size`` 0: not a CUDA-graph replay)."""

    kind: int
    num_tokens: int
    num_reqs: int
    max_seqlen_q: int
    max_seqlen_k: int
    num_logits: int
    padded_size: int
    num_prompt_rows: int


@dataclass(slots=True)
class StepInputs:
    """What the forward pass of one step reads: input_ids and positions (T,) int64, the attention context, and
    logits_indices (S,) int64, the packed row of the last token of each request that samples."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    context: AttentionContext
    logits_indices: torch.Tensor


class _Field:
    """One array of the step's inputs: a typed view of the shared host arena (numpy, for writing) and of the shared
    device arena (torch, for the kernels), both at the same byte offset."""

    __slots__ = ("array", "device")

    def __init__(self, host_arena: torch.Tensor, device_arena: torch.Tensor, offset: int,
                 shape: tuple[int, ...], dtype: torch.dtype):
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        self.array = host_arena[offset:offset + nbytes].view(dtype).view(shape).numpy()
        self.device = device_arena[offset:offset + nbytes].view(dtype).view(shape)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 256) * 256


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
        layout = [("header", (len(StepHeader.__slots__),), torch.int64),
                  ("cu_seqlens_q", (max_num_seqs + 1,), torch.int32), ("seqused_k", (max_num_seqs,), torch.int32),
                  ("logits_indices", (max_num_seqs,), torch.int64), ("input_ids", (max_num_tokens,), torch.int64),
                  ("positions", (max_num_tokens,), torch.int64), ("slot_mapping", (max_num_tokens,), torch.int64),
                  ("prompt_rows", (max_num_tokens,), torch.int64), ("shared_prefix_len", (1,), torch.int32),
                  ("carried_rows", (max_num_seqs,), torch.int64), ("carried_from", (max_num_seqs,), torch.int64),
                  ("block_table", (max_num_seqs, max_blocks_per_seq), torch.int32)]  # the block table last
        offsets, size = [], 0
        for _, shape, dtype in layout:
            offsets.append(size)
            size += _aligned(int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size())
        on_cuda = device.type == "cuda"
        self._host_arena = torch.zeros(size, dtype=torch.uint8, pin_memory=on_cuda)
        self._device_arena = torch.zeros(size, dtype=torch.uint8, device=device) if on_cuda else self._host_arena
        for (name, shape, dtype), offset in zip(layout, offsets):
            setattr(self, name, _Field(self._host_arena, self._device_arena, offset, shape, dtype))
        self._block_table_offset = offsets[-1]
        self._block_table_row_bytes = max_blocks_per_seq * 4
        self._copies_done = torch.cuda.Event() if on_cuda else None
        self._block_rows = _BlockRows(max_num_seqs, max_blocks_per_seq)
        self._view_sizes: tuple[int, int, int] | None = None
        self._views: tuple[torch.Tensor, ...] = ()

    @property
    def arena(self) -> torch.Tensor:
        """The device arena: every array of the step and the header, as one uint8 tensor."""
        return self._device_arena

    def prepare(self, batch: ScheduledBatch, padded_size: int | None = None,
                prompt_rows: list[int] | None = None, shared_prefix_len: int = 0,
                carried: CarriedTokens | None = None) -> StepInputs:
        """Pack ``batch`` (requests before their ``num_computed_tokens`` advances) into the step's inputs.

        ``padded_size`` (decode-only batches, >= the number of requests): add padding rows up to that many.
        ``prompt_rows``: the packed rows whose logits score prompt tokens (for the other ranks).
        ``shared_prefix_len``: the keys a cascade-attention step shares (``shared_prefix_len.device`` then holds it).
        ``carried`` (async scheduling): input ids to take from the previous step's sampled tokens on the device;
        the rows they replace hold ``PENDING_TOKEN`` on the host.
        """
        self._wait_for_copies()
        requests = batch.requests
        num_reqs = len(requests)
        num_new_list = batch.num_new_tokens
        start_list = batch.num_computed_tokens
        num_new = np.array(num_new_list, dtype=np.int64)
        starts = np.array(start_list, dtype=np.int64)
        ends = starts + num_new
        cu_seqlens_q = self.cu_seqlens_q.array[:num_reqs + 1]
        cu_seqlens_q[0] = 0
        np.cumsum(num_new, out=cu_seqlens_q[1:])
        num_tokens = int(cu_seqlens_q[-1])
        max_new = max(num_new_list)
        one_each = max_new == 1 and num_tokens == num_reqs  # a decode step: no repeats, one id per request
        self.seqused_k.array[:num_reqs] = ends
        if one_each:
            input_ids = [r.token_ids[start] for r, start in zip(requests, start_list)]
        else:
            input_ids = list(chain.from_iterable(r.token_ids[start:start + n]
                                                 for r, start, n in zip(requests, start_list, num_new_list)))
        self.input_ids.array[:num_tokens] = input_ids
        block_table = self.block_table.array
        self._block_rows.write(requests, block_table, batch.allocated)
        positions = self.positions.array[:num_tokens]
        if one_each:
            token_rows = np.arange(num_reqs)
            positions[:] = starts
        else:
            token_rows = np.repeat(np.arange(num_reqs), num_new)
            np.subtract(np.arange(num_tokens), np.repeat(cu_seqlens_q[:-1] - starts, num_new), out=positions)
        size = self.block_size
        self.slot_mapping.array[:num_tokens] = block_table[token_rows, positions // size] * size + positions % size
        logits_indices = cu_seqlens_q[1:][np.array(batch.samples, dtype=bool)] - 1
        self.logits_indices.array[:logits_indices.size] = logits_indices
        num_rows = len(prompt_rows) if prompt_rows else 0
        self.prompt_rows.array[:num_rows] = prompt_rows or []
        self.shared_prefix_len.array[0] = shared_prefix_len
        num_carried = 0
        carried_in_order = carried is not None and carried.in_order and one_each
        if carried is not None and not carried_in_order:
            num_carried = len(carried.batch_indices)
            self.carried_rows.array[:num_carried] = cu_seqlens_q[1:][carried.batch_indices] - 1
            self.carried_from.array[:num_carried] = carried.source_indices
        if padded_size is not None:
            self._write_padding(num_reqs, padded_size)
            num_reqs = num_tokens = padded_size
        header = StepHeader(STEP, num_tokens, num_reqs, max_new, int(ends.max()), logits_indices.size,
                            padded_size or 0, num_rows)
        inputs = self._upload(header)
        if carried_in_order:  # packed row i is request i, which takes sampled token i
            self.input_ids.device[:len(requests)].copy_(carried.source)
        elif num_carried:
            tokens = carried.source.index_select(0, self.carried_from.device[:num_carried])
            self.input_ids.device.index_copy_(0, self.carried_rows.device[:num_carried], tokens)
        return inputs

    def prepare_padding(self, num_reqs: int) -> StepInputs:
        """A decode step of ``num_reqs`` padding rows only (for warm-up and CUDA-graph capture)."""
        self._wait_for_copies()
        self.cu_seqlens_q.array[0] = 0
        self.shared_prefix_len.array[0] = 0
        self._write_padding(0, num_reqs)
        return self._upload(StepHeader(STEP, num_reqs, num_reqs, 1, 0, num_reqs, 0, 0))

    def prepare_signal(self, kind: int) -> None:
        """A message without a step (``END_OF_CALL``, ``SHUTDOWN``): only the header's kind matters."""
        self._wait_for_copies()
        self._upload(StepHeader(kind, 0, 0, 0, 0, 0, 0, 0))

    def read_header(self) -> StepHeader:
        """The header of the device arena (on CUDA this waits for the device: the followers' one sync)."""
        return StepHeader(*self.header.device.tolist())

    def _write_padding(self, start: int, stop: int) -> None:
        """Rows ``start:stop`` of a decode step become padding (see the module docstring)."""
        self.input_ids.array[start:stop] = 0
        self.positions.array[start:stop] = 0
        self.slot_mapping.array[start:stop] = -1
        self.seqused_k.array[start:stop] = 0
        self.cu_seqlens_q.array[start + 1:stop + 1] = np.arange(start + 1, stop + 1)
        self.logits_indices.array[start:stop] = np.arange(start, stop)

    def _upload(self, header: StepHeader) -> StepInputs:
        """Write the header, copy the host arena up to the last used block-table row to the device in one copy,
        and describe the used rows of every array."""
        self.header.array[:] = [getattr(header, name) for name in StepHeader.__slots__]
        if self._device_arena is not self._host_arena:
            end = self._block_table_offset + header.num_reqs * self._block_table_row_bytes
            self._device_arena[:end].copy_(self._host_arena[:end], non_blocking=True)
            self._copies_done.record()
        return self.step_inputs(header)

    def step_inputs(self, header: StepHeader) -> StepInputs:
        """The used rows of every device array, as ``header`` describes them (the views of the last sizes are
        kept: a run of decode steps of one batch size slices the arena once)."""
        sizes = (header.num_tokens, header.num_reqs, header.num_logits)
        if sizes != self._view_sizes:
            num_tokens, num_reqs, num_logits = sizes
            self._view_sizes = sizes
            self._views = (self.input_ids.device[:num_tokens], self.positions.device[:num_tokens],
                           self.slot_mapping.device[:num_tokens], self.cu_seqlens_q.device[:num_reqs + 1],
                           self.seqused_k.device[:num_reqs], self.block_table.device[:num_reqs],
                           self.logits_indices.device[:num_logits])
        input_ids, positions, slot_mapping, cu_seqlens_q, seqused_k, block_table, logits_indices = self._views
        context = AttentionContext(slot_mapping=slot_mapping, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
                                   block_table=block_table, max_seqlen_q=header.max_seqlen_q,
                                   max_seqlen_k=header.max_seqlen_k, is_decode=sizes[0] == sizes[1])
        return StepInputs(input_ids, positions, context, logits_indices)

    def _wait_for_copies(self) -> None:
        """Wait until the previous step's host-to-device copies have read the host arrays."""
        if self._copies_done is not None:
            self._copies_done.synchronize()


class _BlockRows:
    """Each request's block-table row, kept across steps and extended by the blocks it gained since: a step copies
    the rows of its requests in one vectorised gather instead of walking every block of every request, and only
    the columns some row has used (``num_columns``; the columns after them keep stale ids, never read).

    A request keeps its row while it is scheduled in consecutive steps; a request missing from a step gives its row
    back (it is rewritten whole if it returns). A new ``block_ids`` list (the block manager makes one when it frees
    a request's blocks) also means a whole rewrite. A step of the previous step's requests, in order (the usual
    decode step), writes no row but those of the requests the block manager allocated for
    (``ScheduledBatch.allocated``), in place: O(changes), no gather."""

    def __init__(self, num_rows: int, max_blocks_per_seq: int):
        self.table = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int32)
        self.rows: dict = {}  # request -> [row, blocks written, the block_ids list written from]
        self.free = list(range(num_rows - 1, -1, -1))
        self.num_columns = 0
        self._last_requests: list | None = None  # the requests of the last call, whose rows ``out`` holds

    def write(self, requests, out: np.ndarray, allocated: list[int]) -> None:
        """Copy the requests' block-table rows into ``out[:len(requests)]`` ((rows, max_blocks_per_seq) int32;
        stale past their blocks). ``allocated``: the indices of the requests whose blocks may have changed since
        the previous call; when ``requests`` are the previous call's, in order, only their rows are written."""
        rows = self.rows
        if requests == self._last_requests:  # out[:len(requests)] holds their rows: extend the allocated ones
            for index in allocated:
                request = requests[index]
                entry = rows[request]
                if entry[2] is not request.block_ids:
                    entry[1], entry[2] = 0, request.block_ids
                written = entry[1]
                if len(entry[2]) > written:
                    self._extend(entry)
                    out[index, written:entry[1]] = entry[2][written:]
            return
        self._last_requests = requests
        indices, missing = [], []
        for request in requests:
            entry = rows.get(request)
            if entry is None:
                missing.append(len(indices))
                indices.append(0)
                continue
            blocks = request.block_ids
            if entry[2] is not blocks:
                entry[1], entry[2] = 0, blocks
            if len(blocks) > entry[1]:
                self._extend(entry)
            indices.append(entry[0])
        if missing or len(rows) > len(requests):  # rows of requests not scheduled now go back first
            scheduled = set(requests)
            for request in [r for r in rows if r not in scheduled]:
                self.free.append(rows.pop(request)[0])
            for index in missing:
                request = requests[index]
                entry = rows[request] = [self.free.pop(), 0, request.block_ids]
                self._extend(entry)
                indices[index] = entry[0]
        columns = self.num_columns
        out[:len(requests), :columns] = self.table[indices, :columns]

    def _extend(self, entry: list) -> None:
        """Write the blocks of ``entry``'s list that its row lacks."""
        row, written, blocks = entry
        self.table[row, written:len(blocks)] = blocks[written:]
        entry[1] = len(blocks)
        self.num_columns = max(self.num_columns, len(blocks))
