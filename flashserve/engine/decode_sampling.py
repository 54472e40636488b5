"""Sampling of decode steps from persistent buffers, replayed from CUDA graphs beside the decode forward graphs.

The eager ``Sampler`` costs a dozen kernel launches and their Python per step (about a millisecond of host time at
256 requests). ``DecodeSampling`` samples the common batches instead — every row greedy, or sampled with any mix of
temperature, top-k, top-p, min-p, with or without seeds — from per-row options written into one pinned host arena
and uploaded with one copy to fixed device addresses (``temperature``, ``top_k``, ``top_p``, ``min_p``, the rows'
Philox ``streams`` and a ``greedy`` flag), so that on CUDA a step is the forward graph's replay, this graph's replay
and one read of the token ids (and of the sort-fallback flags, in the same transfer). Which sampled rows draw from
the shared generator (in order) is written too, for the dense race (``race.SharedStream``).

Per padded batch size two graphs are captured: the argmax alone (a batch without sampled rows), and the whole
sort-free sampler over every row (``nucleus.sample_without_fallback`` with ``truncated=None``) whose greedy rows
then take the argmax. Padding rows and greedy rows race with placeholder options and stream (their draws are not
taken from any generator) and their tokens are discarded; their top-k of 1 keeps that race to one block. The rare
truncated row whose boundary the candidates do not determine is sampled again, eagerly, by the sort
(``nucleus.sample``'s fallback) from the logits the graph read.

The tokens are those of the eager ``Sampler`` for the same batch and seeds: the same per-row kernels run on the
same logits, and the same Philox offsets are claimed from the same generators in the same order
(``Sampler.stream_rows`` over the sampled rows). Batches that need more stay on the eager ``Sampler``
(``supports``): ``logit_bias``, penalties, ``min_tokens`` still masking, logprobs, structured outputs, and sampled
rows where the kernels cannot compute torch's draws (``Sampler.computes_noise`` False, e.g. on CPU). On CPU (no
graphs) ``sample`` runs the same code on the same buffers eagerly.
"""
import itertools

import numpy as np
import torch

from flashserve.engine.input_buffers import _aligned, _Field
from flashserve.engine.request import Request
from flashserve.engine.sampler import Sampler, truncates
from flashserve.kernels import nucleus, philox, race, sampling
from flashserve.kernels.reference import sampling as reference

_PLACEHOLDER_STREAM = [0, 0, 0, 256]  # the stream of rows whose draws are discarded (no generator is advanced)
# Their top-k: 1 makes them truncated rows, whose race is over one block's candidates (untruncated ones would
# race every token of the vocabulary, per-token Philox calls included, for a token that is thrown away).
_PLACEHOLDER_TOP_K = 1


def workspace_bytes(rows: int, vocab_size: int) -> int:
    """An upper estimate of the device memory a sampling graph of ``rows`` rows allocates in the graphs' pool: the
    candidate and race slots (value and token id per slot), the per-block statistics (with the sub-block maxima) and
    the race results."""
    num_blocks = -(-vocab_size // sampling.BLOCK)
    return rows * (12 * (sampling.DEFAULT_CAPACITY + race.RACE_CAPACITY)
                   + (20 + 4 * sampling.SUB_BLOCKS) * num_blocks + 256)


class DecodeSampling:
    """Samples batches of at most ``max_rows`` requests from persistent option buffers.

    Args:
        sampler: the engine's ``Sampler`` (its generators and start-up checks).
        max_rows: the most rows of a batch; vocab_size: columns of the logits; device: where they live.
        logits: None, or the persistent (>= max_rows, vocab_size) float32 logits buffer that the decode graphs
            write (what the captured graphs read).
    """

    def __init__(self, sampler: Sampler, max_rows: int, vocab_size: int, device: torch.device,
                 logits: torch.Tensor | None = None):
        self.sampler = sampler
        self.logits = logits
        self.device = torch.device(device)
        self.max_rows, self.vocab_size = max_rows, vocab_size
        rows = max_rows
        layout = [("streams", (rows, 4), torch.int64), ("top_k", (rows,), torch.int64),
                  ("temperature", (rows,), torch.float32), ("top_p", (rows,), torch.float32),
                  ("min_p", (rows,), torch.float32), ("greedy", (rows,), torch.bool),
                  ("shared_index", (rows,), torch.int64), ("num_shared", (1,), torch.int32),
                  ("shared_member", (rows,), torch.bool)]
        sizes = [_aligned(int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size())
                 for _, shape, dtype in layout]
        on_cuda = self.device.type == "cuda"
        self._host_arena = torch.zeros(sum(sizes), dtype=torch.uint8, pin_memory=on_cuda)
        self._device_arena = (torch.zeros(sum(sizes), dtype=torch.uint8, device=self.device) if on_cuda
                              else self._host_arena)
        offset = 0
        for (name, shape, dtype), size in zip(layout, sizes):
            setattr(self, name, _Field(self._host_arena, self._device_arena, offset, shape, dtype))
            offset += size
        self.row_index = torch.arange(rows, dtype=torch.int64, device=self.device)
        self.shared = None  # the rows of the shared generator (on CUDA, where their dense race can use it)
        if on_cuda:
            self.shared = race.SharedStream(
                self.shared_index.device, self.num_shared.device, self.shared_member.device,
                philox.torch_stream_layout(vocab_size, self.device)[0],
                philox.torch_stream_layout(rows * vocab_size, self.device)[0])
        self.out = torch.zeros((2, rows), dtype=torch.int64, device=self.device)  # tokens; 1: needs the fallback
        self._copy_done = torch.cuda.Event() if on_cuda else None
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._placeholder_rows = 0  # leading rows whose options are placeholders in both arenas
        self._row_requests: list[Request | None] = [None] * rows  # whose options each row of the host arena holds
        self._shared_rows: list[int] = []  # the rows of the shared stream that the host arena lists
        self._write_placeholders(0, rows)

    def supports(self, requests: list[Request]) -> bool:
        """Whether ``sample`` can take this batch (see the module docstring for what stays on the eager path)."""
        return self.sampled_rows(requests) is not None

    def sampled_rows(self, requests: list[Request]) -> list[int] | None:
        """The indices of the batch's sampled (not greedy) rows, or None when ``sample`` cannot take the batch
        (``supports``), in one walk over the requests' options read once (``Request.plain_sampling``, ``greedy``)."""
        if len(requests) > self.max_rows or not self.sampler.sort_free:
            return None
        computes_noise = self.sampler.computes_noise
        rows = []
        for index, request in enumerate(requests):
            if request.grammar is not None or (not request.plain_sampling and _needs_eager_sampler(request)):
                return None
            if not request.greedy:
                if not computes_noise:
                    return None
                rows.append(index)
        return rows

    @torch.inference_mode()
    def capture(self, sizes: list[int], pool) -> None:
        """Capture both graphs of every size (each run once eagerly first, which compiles its kernels), into the
        decode graphs' memory ``pool`` (one graph replays at a time); they read the ``logits`` buffer."""
        if self.logits is None:
            raise ValueError("DecodeSampling.capture needs the logits buffer the graphs read")
        self.logits.zero_()  # the first runs read it: finite values
        self._write_placeholders(0, self.max_rows)
        self._device_arena.copy_(self._host_arena)
        self._placeholder_rows = self.max_rows
        for size in sorted(sizes, reverse=True):
            for sampled in (False, True):
                self._run(size, sampled)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._run(size, sampled)
                self.graphs[(size, sampled)] = graph
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def sample(self, requests: list[Request], padded_size: int, logits: torch.Tensor | None = None,
               sampled_rows: list[int] | None = None) -> torch.Tensor:
        """The tokens of ``requests`` (row ``i`` of the logits for ``requests[i]``; the eager ``Sampler``'s), as a
        (len(requests),) int64 device tensor of its own.

        ``padded_size``: the rows the step's graph computed (>= len(requests)); ``logits``: None for the logits
        buffer (a graph's output, replayed here), else (padded_size, vocab) float32 logits sampled eagerly by the
        same code (CPU, eager steps). Like the eager ``Sampler``, this waits for the device only when a sampled row
        has top-k or top-p (to read the sort-fallback flags). ``sampled_rows``: ``sampled_rows(requests)`` when
        known."""
        num_rows = len(requests)
        if sampled_rows is None:
            sampled_rows = [i for i, request in enumerate(requests) if not request.greedy]
        self._write_options(requests, sampled_rows, padded_size)
        sampled = bool(sampled_rows)
        graph = self.graphs.get((padded_size, sampled)) if logits is None else None
        if graph is not None:
            graph.replay()
        else:
            self._run(padded_size, sampled, logits)
        tokens = self.out[0, :num_rows].clone()  # the next replay overwrites ``out``
        if sampled and any(truncates(requests[i].params, self.vocab_size) for i in sampled_rows):
            where = self.out[1, :num_rows].nonzero().squeeze(1).tolist()  # flags are only raised on such rows
            if where:
                source = self.logits if logits is None else logits
                tokens[where] = self._sort_fallback(source, where)
        return tokens

    def _write_options(self, requests: list[Request], sampled_rows: list[int], padded_size: int) -> None:
        """Fill the host arena for the batch (claiming the sampled rows' draws from their generators) and start
        its upload; nothing to do for a greedy batch whose rows hold placeholders already (host and device)."""
        if not sampled_rows and padded_size <= self._placeholder_rows:
            return
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous step's upload has read the host arena
        if sampled_rows:
            self._placeholder_rows = 0
            self._write_rows(requests, sampled_rows, padded_size)
        else:
            self._write_placeholders(0, padded_size)
            self._placeholder_rows = padded_size
        if self._copy_done is not None:
            self._device_arena.copy_(self._host_arena, non_blocking=True)
            self._copy_done.record()

    def _write_rows(self, requests: list[Request], sampled_rows: list[int], padded_size: int) -> None:
        """Rows ``0:padded_size`` of the host arena for a batch with sampled rows, writing what changed: one
        identity check per row, then options (or placeholders) only for the rows whose request changed since the
        last write, the shared-stream rows only when they changed; the streams, which advance every step, in one
        write."""
        wanted: list[Request | None] = [None] * padded_size
        for i in sampled_rows:
            wanted[i] = requests[i]
        owners = self._row_requests
        for i in range(padded_size):
            request = wanted[i]
            if owners[i] is not request:
                owners[i] = request
                if request is None:
                    self._write_placeholders(i, i + 1)
                else:
                    params = request.params
                    self.top_k.array[i] = params.top_k
                    self.temperature.array[i] = params.temperature
                    self.top_p.array[i] = params.top_p
                    self.min_p.array[i] = params.min_p
                    self.greedy.array[i] = False
        streams = self.sampler.stream_rows([requests[i] for i in sampled_rows], self.vocab_size)
        self.streams.array[sampled_rows] = np.fromiter(itertools.chain.from_iterable(streams), np.int64,
                                                       count=4 * len(streams)).reshape(-1, 4)
        shared_rows = [i for i in sampled_rows if requests[i].generator is None]
        if shared_rows != self._shared_rows:
            self.shared_member.array[:padded_size] = False
            self.shared_member.array[shared_rows] = True
            self.shared_index.array[:len(shared_rows)] = shared_rows
            self.num_shared.array[0] = len(shared_rows)
            self._shared_rows = shared_rows

    def _write_placeholders(self, start: int, stop: int) -> None:
        """Rows ``start:stop`` as greedy rows with neutral options; the arena then lists no shared-stream row at all
        (``_write_rows`` lists them again)."""
        self.streams.array[start:stop] = _PLACEHOLDER_STREAM
        self.top_k.array[start:stop] = _PLACEHOLDER_TOP_K
        self.temperature.array[start:stop] = 1.0
        self.top_p.array[start:stop] = 1.0
        self.min_p.array[start:stop] = 0.0
        self.greedy.array[start:stop] = True
        self._row_requests[start:stop] = [None] * (stop - start)
        if self._shared_rows:
            self.shared_member.array[:self.max_rows] = False
            self.shared_index.array[:] = 0
            self.num_shared.array[0] = 0
            self._shared_rows = []

    def _run(self, size: int, sampled: bool, logits: torch.Tensor | None = None) -> None:
        """What a graph of ``size`` rows runs: the tokens (and fallback flags) into ``out``."""
        logits = self.logits[:size] if logits is None else logits
        argmax = logits.argmax(dim=-1)
        if not sampled:
            self.out[0, :size].copy_(argmax)
            self.out[1, :size].zero_()
            return
        greedy = self.greedy.device[:size]
        tokens, fallback = nucleus.sample_without_fallback(
            logits, self.row_index[:size], self.temperature.device[:size], self.top_k.device[:size],
            self.top_p.device[:size], self.min_p.device[:size], None, self.streams.device[:size], None,
            shared=None if self.shared is None else self.shared._replace(
                index=self.shared.index[:size], member=self.shared.member[:size]))
        self.out[0, :size].copy_(torch.where(greedy, argmax, tokens))
        self.out[1, :size].copy_(fallback & ~greedy)

    def _sort_fallback(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The sort-based tokens of ``rows`` (their options and streams still in the device buffers)."""
        where = torch.tensor(rows, dtype=torch.int64, device=self.device)
        streams = self.streams.device[where]
        columns = torch.arange(self.vocab_size, device=self.device).expand(len(rows), -1)
        noise = philox.exponential_at(streams, columns)
        return reference.sample_sorted(logits[where], self.temperature.device[where], self.top_k.device[where],
                                       self.top_p.device[where], self.min_p.device[where], noise)


def _needs_eager_sampler(request: Request) -> bool:
    """Whether the options of ``request`` (one whose ``plain_sampling`` is False) need the eager sampler now."""
    params = request.params
    return bool(params.logit_bias or params.uses_penalties or params.logprobs is not None
                or request.num_output_tokens < params.min_tokens)
