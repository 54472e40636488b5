"""Structured outputs in the engine: each constrained request's grammar matcher, the requests waiting for their
grammar to compile, and the per-step token bitmask applied to the logits.

Life of a constrained request (``SamplingParams.structured_outputs``):

1. ``LLMEngine.add_request`` builds its grammar (ValueError naming the field when invalid) and submits it to the
   ``GrammarCompiler`` (``flashserve.engine.grammars``), which compiles it in a worker thread, once per distinct
   grammar. Until the compiled grammar is there, the request waits in ``GrammarWaitlist``, outside the scheduler:
   the other requests keep decoding.
2. Once compiled, the request gets an xgrammar ``GrammarMatcher`` (``RequestGrammar``) and joins the scheduler.
3. Every step, ``TokenBitmask.apply`` fills one row of allowed tokens per sampling request (all ones for the
   unconstrained rows; xgrammar's batch matcher fills the constrained ones in parallel threads) on the host while
   the device still runs the forward pass, copies it to the device and masks the logits out of place (-inf where a
   bit is 0) right before the sampler. A batch without constrained requests returns its logits untouched. Decode
   CUDA graphs keep being replayed: the mask applies to the graph's output logits.
4. ``RequestGrammar.accept`` advances the matcher with each token the engine appends; the grammar's end (the
   matcher accepting a stop token) finishes the request with "stop".

Preemption needs no rollback: a preempted request keeps its tokens (it recomputes their KV) and its matcher has
accepted exactly those tokens; a sampled token the engine drops (``max_tokens=0``) is never accepted.
"""
import logging
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch

from flashserve.engine.request import Request

logger = logging.getLogger(__name__)


class RequestGrammar:
    """A request's compiled grammar (a future until compiled) and its matcher (None until then)."""

    __slots__ = ("future", "matcher")

    def __init__(self, future: Future):
        self.future = future
        self.matcher = None

    def start(self, stop_token_ids: list[int]) -> None:
        """Create the matcher from the compiled grammar (which must be ready); the grammar ends on
        ``stop_token_ids``."""
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(self.future.result(), override_stop_tokens=list(stop_token_ids))

    def accept(self, token_id: int) -> bool:
        """Advance the matcher by ``token_id``; True when the grammar is complete (the token was a stop token) or
        the token is not allowed (which the mask prevents; logged), i.e. when the request must finish."""
        if not self.matcher.accept_token(token_id):
            logger.warning("structured outputs: token %d is not allowed by the grammar; finishing the request",
                           token_id)
            return True
        return self.matcher.is_terminated()


class GrammarWaitlist:
    """Requests whose grammar is still compiling, in arrival order.

    Args:
        stop_token_ids: the tokens that end a completed grammar (the engine's EOS tokens).
    """

    def __init__(self, stop_token_ids: list[int]):
        self.stop_token_ids = list(stop_token_ids)
        self.requests: dict[str, Request] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def admit(self, request: Request) -> bool:
        """Start the request's matcher and return True when its grammar is compiled; otherwise hold the request
        (False) until ``take_ready`` returns it."""
        if request.grammar.future.done() and request.grammar.future.exception() is None:
            request.grammar.start(self.stop_token_ids)
            return True
        self.requests[request.request_id] = request
        return False

    def take_ready(self) -> tuple[list[Request], list[Request]]:
        """Remove and return the held requests whose compilation ended: (compiled, with their matchers started;
        failed, the error logged)."""
        ready, failed = [], []
        for request_id, request in list(self.requests.items()):
            future = request.grammar.future
            if not future.done():
                continue
            del self.requests[request_id]
            if future.exception() is not None:
                logger.error("structured outputs: compiling the grammar of request %s failed: %r", request_id,
                             future.exception())
                failed.append(request)
            else:
                request.grammar.start(self.stop_token_ids)
                ready.append(request)
        return ready, failed

    def discard(self, request_id: str) -> Request | None:
        """Forget a held request (aborted); returns it, or None when it was not held."""
        return self.requests.pop(request_id, None)

    def wait(self, timeout_s: float) -> None:
        """Block until one held request's grammar is compiled or ``timeout_s`` passed (when nothing else can
        run)."""
        if self.requests:
            wait([request.grammar.future for request in self.requests.values()], timeout_s, FIRST_COMPLETED)


class TokenBitmask:
    """The allowed-token bitmask of a batch and its application to the logits.

    Row ``i`` of the host buffer (int32, (max_rows, ceil(vocab_size / 32))) is xgrammar's bitmask of sampling
    request ``i``: bit ``t % 32`` of word ``t // 32`` is set when token ``t`` is allowed.

    Args:
        max_rows: the most requests that sample in one step.
        vocab_size: columns of the logits.
        device: where the logits live.
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        words = -(-vocab_size // 32)
        self.host = torch.empty(max_rows, words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self.shifts = torch.arange(32, dtype=torch.int32, device=self.device)
        self._batch_matcher = None

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """``logits`` (N, vocab_size) with the tokens each request's grammar forbids at -inf (a new tensor), or
        ``logits`` itself when no request of the batch is constrained."""
        rows = [i for i, request in enumerate(requests) if request.grammar is not None]
        if not rows:
            return logits
        if self._batch_matcher is None:
            import xgrammar

            self._batch_matcher = xgrammar.BatchGrammarMatcher()
        num_rows = len(requests)
        host = self.host[:num_rows]
        if len(rows) < num_rows:
            host.fill_(-1)
        self._batch_matcher.batch_fill_next_token_bitmask([requests[i].grammar.matcher for i in rows], host, rows)
        words = host.to(self.device, non_blocking=True)
        allowed = ((words.unsqueeze(2) >> self.shifts) & 1).view(num_rows, -1)[:, :self.vocab_size]
        return logits.masked_fill(allowed == 0, float("-inf"))
