"""Continuous batching in the style of vLLM v1: no prefill and decode phases, only a token budget per step.

Every request has ``num_computed_tokens``; a step gives each scheduled request some new tokens to compute (a whole
or partial prompt, a recompute after preemption, or the one token of a decode). The budget
(``max_num_batched_tokens``) goes first to the running requests in admission order, then to waiting requests,
whose prompts may be split into chunks (chunked prefill) and start after their prefix-cache hits.

When the pool runs out of blocks, the most recently admitted running request is preempted: its blocks are freed,
it goes back to the front of the waiting queue and is recomputed later. The oldest running request can always
proceed (the engine rejects requests larger than the pool), so the scheduler never deadlocks.
"""
from collections import deque
from dataclasses import dataclass, field

from flashserve.engine.block_manager import BlockManager
from flashserve.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledBatch:
    """The work of one step.

    Attributes:
        requests: the scheduled requests, running ones first, in the order their tokens are packed.
        num_new_tokens: tokens each request computes this step (from its ``num_computed_tokens`` on).
        samples: whether each request reaches the end of its tokens this step, and so samples the next one.
        preempted: requests preempted while scheduling this step.
        num_computed_tokens: each request's ``num_computed_tokens`` when scheduled (where its new tokens start).
        sampling: the requests with ``samples`` set, in order.
        num_decodes: the requests that compute one token after their prompt.
        allocated: the indices of the requests whose blocks may have changed since the previous step (the block
            manager allocated for them now; ``add`` counts every request it adds), for ``InputBuffers``.
    """

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    sampling: list[Request] = field(default_factory=list)
    num_decodes: int = 0
    allocated: list[int] = field(default_factory=list)

    def add(self, request: Request, num_new_tokens: int) -> None:
        """Schedule ``num_new_tokens`` tokens of ``request`` (before its ``num_computed_tokens`` advances)."""
        self.allocated.append(len(self.requests))
        self.requests.append(request)
        self.num_new_tokens.append(num_new_tokens)
        computed = request.num_computed_tokens
        self.num_computed_tokens.append(computed)
        samples = computed + num_new_tokens == len(request.token_ids)
        self.samples.append(samples)
        if samples:
            self.sampling.append(request)
        if num_new_tokens == 1 and computed >= request.num_prompt_tokens:
            self.num_decodes += 1

    @property
    def decode_only(self) -> bool:
        """Whether every request computes one token after its prompt."""
        return self.num_decodes == len(self.requests)

    @property
    def total_tokens(self) -> int:
        """Tokens computed this step."""
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    """Decides which requests compute how many tokens in each step.

    Args:
        block_manager: the KV-cache bookkeeping.
        max_num_seqs: the most running requests.
        max_num_batched_tokens: the token budget of one step.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queue a new request."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Choose this step's work (see the module docstring)."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        running, block_size = self.running, self.block_manager.block_size
        caching = self.block_manager.enable_prefix_caching
        requests, num_new_tokens, samples = batch.requests, batch.num_new_tokens, batch.samples
        starts, sampling, allocated = batch.num_computed_tokens, batch.sampling, batch.allocated
        num_decodes = 0
        for request in running:  # preemption pops from the end: the iteration stops before the victims
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            num_tokens = len(request.token_ids)
            num_new = num_tokens - computed
            if num_new > budget:
                num_new = budget
            end = computed + num_new
            # allocate_slots has nothing to do (the usual decode step) unless a block is needed or fills
            if end > len(request.block_ids) * block_size or (caching and end // block_size > request.num_cached_blocks):
                if not self._allocate_or_preempt(request, num_new, batch):
                    break
                allocated.append(len(requests))
            # batch.add(request, num_new) inlined, but in ``allocated`` only if the block manager allocated
            requests.append(request)
            num_new_tokens.append(num_new)
            starts.append(computed)
            if end == num_tokens:
                samples.append(True)
                sampling.append(request)
            else:
                samples.append(False)
            if num_new == 1 and computed >= request.num_prompt_tokens:
                num_decodes += 1
            budget -= num_new
        batch.num_decodes = num_decodes
        if batch.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_hit_tokens = self.block_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if not self.block_manager.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            if self.block_manager.reads_prefix_cache(request):
                self.block_manager.record_prefix_hits(request.num_tokens, num_hit_tokens)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            self.running.append(request)
            batch.add(request, num_new)
            budget -= num_new
        return batch

    def _allocate_or_preempt(self, request: Request, num_new: int, batch: ScheduledBatch) -> bool:
        """Allocate ``request``'s new slots, preempting the newest running requests until they fit.

        Returns False when ``request`` itself had to be preempted.
        """
        while not self.block_manager.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and put it back at the front of the waiting queue, to be recomputed."""
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def advance(self, batch: ScheduledBatch) -> None:
        """Record that the batch's tokens were computed (call after the forward pass, before appending samples)."""
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new

    def finish(self, request: Request, reason: str) -> None:
        """End a request wherever it is (running, or preempted while its last token was being read: async
        scheduling), freeing its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def abort(self, request: Request) -> None:
        """End a request wherever it is, freeing its blocks."""
        self.finish(request, "abort")
