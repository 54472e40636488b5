"""Repetition, presence and frequency penalties from token counts kept on the device, updated as tokens are sampled.

Each request that uses a penalty gets a slot (a row) the first time it samples: ``output_counts[slot]`` counts its
generated tokens and ``in_prompt[slot]`` marks its prompt tokens, both filled from the request's tokens at that
moment. After that only the sampled token of each step is added (one indexed add for the whole batch, on the
device), so a step costs O(requests) and never walks a request's tokens. A preempted request keeps its slot (its
tokens do not change); the engine releases the slot when the request ends. The slots grow by doubling.

Semantics (vLLM's): repetition divides a positive logit / multiplies a negative one of every token seen in the
prompt or the output; then presence subtracts once, and frequency once per occurrence, for output tokens.
"""
import torch

from flashserve.engine.request import Request
from flashserve.kernels._launch import upload


class PenaltyState:
    """Per-request token counts for penalties, on ``device``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.output_counts: torch.Tensor | None = None  # (slots, vocab) int32
        self.in_prompt: torch.Tensor | None = None      # (slots, vocab) bool

    def release(self, request_id: str) -> None:
        """Forget a request's counts (unknown ids are ignored)."""
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.free.append(slot)

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """Penalise, in place, the rows of ``logits`` (N, vocab) whose requests use penalties; returns those rows."""
        rows = [i for i, request in enumerate(requests) if request.params.uses_penalties]
        if not rows:
            return rows
        slots = upload([self._slot(requests[i], logits.shape[1]) for i in rows], torch.int64, self.device)
        row_index = upload(rows, torch.int64, self.device)
        factors = upload([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
                          for p in (requests[i].params for i in rows)], logits.dtype, self.device)
        repetition, presence, frequency = (factors[:, j:j + 1] for j in range(3))
        selected = logits[row_index]
        counts = self.output_counts[slots]
        seen = self.in_prompt[slots] | (counts > 0)
        selected = torch.where(seen, torch.where(selected > 0, selected / repetition, selected * repetition), selected)
        counts = counts.to(logits.dtype)
        selected -= frequency * counts + presence * (counts > 0).to(logits.dtype)
        logits[row_index] = selected
        return rows

    def record(self, requests: list[Request], rows: list[int], tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (``tokens`` (N,) on the device) for ``rows`` (from ``apply``)."""
        if not rows:
            return
        slots = upload([self.slots[requests[i].request_id] for i in rows], torch.int64, self.device)
        sampled = tokens[upload(rows, torch.int64, self.device)]
        self.output_counts.index_put_((slots, sampled), torch.ones_like(sampled, dtype=torch.int32),
                                      accumulate=True)

    def _slot(self, request: Request, vocab: int) -> int:
        """The request's slot, created (and filled from its tokens) on first use."""
        slot = self.slots.get(request.request_id)
        if slot is not None:
            return slot
        if not self.free:
            self._grow(vocab)
        slot = self.slots[request.request_id] = self.free.pop()
        self.output_counts[slot].zero_()
        self.in_prompt[slot].zero_()
        prompt = torch.tensor(request.prompt_token_ids, dtype=torch.int64, device=self.device)
        self.in_prompt[slot, prompt] = True
        output = request.output_token_ids
        if output:
            self.output_counts[slot] += torch.bincount(torch.tensor(output, dtype=torch.int64, device=self.device),
                                                       minlength=vocab).to(torch.int32)
        return slot

    def _grow(self, vocab: int) -> None:
        """Double the slots (8 at first)."""
        old = 0 if self.output_counts is None else self.output_counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros((new, vocab), dtype=torch.int32, device=self.device)
        in_prompt = torch.zeros((new, vocab), dtype=torch.bool, device=self.device)
        if old:
            counts[:old] = self.output_counts
            in_prompt[:old] = self.in_prompt
        self.output_counts, self.in_prompt = counts, in_prompt
        self.free.extend(range(new - 1, old - 1, -1))

