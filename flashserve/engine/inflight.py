"""Async scheduling: step N+1 is scheduled and launched before the host has read step N's sampled tokens.

With ``Config.async_scheduling`` (vLLM's name) a decode step costs about max(host, device) instead of their sum.
``LLMEngine.step`` schedules and launches step N+1, then reads step N's tokens and does its host work (append the
tokens, stop checks, detokenization, outputs) while the device runs step N+1:

- A request that sampled in step N and continues gets ``PENDING_TOKEN`` appended to its ``token_ids`` once step N
  is launched and step N-1 read (``InflightStep.num_placeholders``), so the scheduler sees one more token to compute;
  step N+1's input id for it is gathered on the device from step N's sampled tokens (``CarriedTokens``, applied by
  ``InputBuffers.prepare`` before anything reads the inputs, and before the inputs are broadcast to
  tensor-parallel followers), and the placeholder is overwritten once step N is read. The prefix cache never
  registers a block whose last token is still pending (``BlockManager``).
- A request that step N's token ends by length (or ``max_tokens=0``) is known to end before the token is read: it
  leaves the scheduler (its blocks are freed) at the same time (``InflightStep.final``), before step N+1 is
  scheduled, as in the synchronous engine; its token, text and finish reason (a stop token or string still wins
  over "length") come when step N is read.
- A request that step N's token ends by EOS, a stop token or a stop string is found one step late: it ran in
  step N+1, whose token for it is discarded; its blocks are freed when step N is read (step N+1's cache writes
  into them are ordered on the device before any later step's).
- A step whose next one needs the host to know its tokens runs synchronously (read before scheduling the next):
  requests with structured outputs (the grammar's mask for the next token depends on the token).

Everything else reads only what the host knows at launch (penalties count sampled tokens on the device; min_tokens
counts the placeholder as an output token; prompt logprobs are stored when their step is launched). Greedy and
seeded requests get the tokens of the synchronous engine (logprobs up to float rounding: a batch that holds a
request one step longer may round the others' rows differently). Requests without a seed share one random
stream, whose draws shift when a request that ended one step late samples in that step: their outputs are
reproducible from run to run but not equal to the synchronous engine's.

What still waits for the device while launching a step (so it overlaps less): logprobs (their dicts are read at
once), prompt logprobs, and top-k / top-p rows (the sampler's check for its sort fallback).

On CUDA, ``TokenReadback`` copies each step's tokens into one of two pinned buffers right after sampling and
records an event; reading a step waits for that event only, not for the step launched after it. On CPU every
operation completes when called, so the same code runs with no overlap.
"""
from dataclasses import dataclass, field

import torch

from flashserve.engine.request import PENDING_TOKEN, Request
from flashserve.engine.scheduler import ScheduledBatch
from flashserve.outputs import Logprob


@dataclass(slots=True)
class SampledTokens:
    """A step's sampled token ids: ``device`` (S,) int64, and their host copy (``host``, complete once ``ready``
    has happened; None on CPU, where ``host`` is ``device``)."""

    device: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None = None

    def tolist(self) -> list[int]:
        """The token ids (waits for this step's copy only)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class TokenReadback:
    """Starts the device-to-host copy of each step's sampled tokens, alternating between two pinned buffers (at
    most two steps are unread at once: the one being read and the one launched before it was read)."""

    def __init__(self, max_rows: int, device: torch.device):
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            self.buffers = [torch.empty(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
        self.next = 0

    def start(self, tokens: torch.Tensor) -> SampledTokens:
        """``tokens`` (S,) int64 on the device, with their copy to the host queued after the work that makes them."""
        if not self.on_cuda:
            return SampledTokens(tokens, tokens)
        index, self.next = self.next, 1 - self.next
        host = self.buffers[index][:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        self.events[index].record()
        return SampledTokens(tokens, host, self.events[index])


@dataclass(slots=True)
class CarriedTokens:
    """Input ids a step takes from the previous step's sampled tokens on the device: request ``batch_indices[i]``
    of the batch gets ``source[source_indices[i]]`` as the input id of its last scheduled token. ``in_order``: the
    batch is the previous step's sampling requests, all continuing, in the same order (both index lists are
    ``range(len(batch))``: the usual decode step)."""

    batch_indices: list[int] | range
    source_indices: list[int] | range
    source: torch.Tensor
    in_order: bool = False


@dataclass(slots=True)
class InflightStep:
    """A launched step whose tokens the host has not read yet.

    Attributes:
        batch: the scheduled batch.
        sampling: its sampling requests, in the order of ``tokens``.
        tokens: the sampled token ids.
        logprobs: per sampling request, its logprob dict or None.
        decode_only: whether every request computes one token after its prompt (statistics).
        prefill_tokens: the tokens computed that are not decodes (statistics).
        elapsed_s: host seconds of the ``step`` call that launched it (statistics).
        num_placeholders: how many of its sampling requests were given ``PENDING_TOKEN`` (they end with it until
            the step is read).
        final: the requests this step's token ends (left the scheduler at launch).
        needs_sync: whether the next step must wait until this one is read (structured outputs).
    """

    batch: ScheduledBatch
    sampling: list[Request]
    tokens: SampledTokens
    logprobs: list[dict[int, Logprob] | None]
    decode_only: bool = False
    prefill_tokens: int = 0
    elapsed_s: float = 0.0
    num_placeholders: int = 0
    final: set[Request] = field(default_factory=set)
    needs_sync: bool = False

    def carried_to(self, batch: ScheduledBatch) -> CarriedTokens | None:
        """The input ids ``batch`` (scheduled after this step) takes from this step's tokens; None if none."""
        if not self.num_placeholders:
            return None
        if self.num_placeholders == len(self.sampling) and batch.requests == self.sampling:  # one C loop
            rows = range(len(self.sampling))
            return CarriedTokens(rows, rows, self.tokens.device, in_order=True)
        placeholders = {request: index for index, request in enumerate(self.sampling)
                        if request.token_ids[-1] == PENDING_TOKEN}
        batch_indices, source_indices = [], []
        for index, request in enumerate(batch.requests):
            source = placeholders.get(request)
            if source is not None:
                batch_indices.append(index)
                source_indices.append(source)
        return CarriedTokens(batch_indices, source_indices, self.tokens.device) if batch_indices else None
