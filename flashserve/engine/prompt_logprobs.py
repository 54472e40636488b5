"""Prompt logprobs (vLLM's ``prompt_logprobs``): the log-probability of every prompt token given the tokens before it.

The logits at position ``p`` of a prompt score prompt token ``p + 1`` (the log-softmax of the raw float32 logits, as
the sampler's logprobs), so a prompt of P tokens has P - 1 scoring positions, 0 .. P - 2; the logits of its last
position are the ones its first token is sampled from, and stay the sampler's. In a step, a request that asks for
prompt logprobs contributes the rows of the scoring positions it computes and has no entry for yet: the positions of
a whole prompt, of a chunk of it (chunked prefill: each step adds its chunk's rows), and none on a recompute after
preemption (the entries are already there, so nothing is appended twice). Requests that do not ask add no row; while
no request needs any, the engine does not look for rows at all (``LLMEngine.scoring``), and a step without rows runs
as before (decode steps replay their CUDA graphs: a step with rows runs eagerly). The rows' logits are computed from
the forward pass's hidden states after sampling, at most ``max_rows`` at a time.

Every position must be computed, so a request does not read the prefix cache while it still needs prompt logprobs
(``BlockManager.reads_prefix_cache``); vLLM does the same.
"""
from dataclasses import dataclass, field

import torch

from flashserve.engine.request import Request
from flashserve.engine.sampler import logprob_dicts
from flashserve.engine.scheduler import ScheduledBatch
from flashserve.outputs import Logprob


@dataclass(slots=True)
class PromptLogprobRows:
    """The rows of one step's packed tokens whose logits score a prompt token.

    Attributes:
        rows: the packed row of every scoring position, request after request.
        targets: the prompt token each row scores (the one after the row's position).
        num_top: how many most likely tokens each row reports (its request's ``prompt_logprobs``).
        spans: (request, number of its rows), in row order.
    """

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    num_top: list[int] = field(default_factory=list)
    spans: list[tuple[Request, int]] = field(default_factory=list)

    @classmethod
    def of(cls, batch: ScheduledBatch) -> "PromptLogprobRows | None":
        """The rows of ``batch`` (before its requests' ``num_computed_tokens`` advance), or None when it has none."""
        result = None
        offset = 0
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            if request.needs_prompt_logprobs:
                start = request.num_computed_tokens
                first = len(request.prompt_logprobs) - 1
                stop = min(start + num_new, request.num_prompt_tokens - 1)
                if first < start:
                    raise RuntimeError(f"{request}: prompt position {first} was skipped (a prefix-cache hit?): "
                                       "this is a bug")
                if stop > first:
                    result = result or cls()
                    result.rows.extend(range(offset + first - start, offset + stop - start))
                    result.targets.extend(request.token_ids[first + 1:stop + 1])
                    result.num_top.extend([request.params.prompt_logprobs] * (stop - first))
                    result.spans.append((request, stop - first))
            offset += num_new
        return result

    def compute(self, model: torch.nn.Module, hidden: torch.Tensor,
                max_rows: int) -> list[tuple[Request, list[dict[int, Logprob]]]]:
        """Each request's new prompt logprob dicts (no text yet), from the step's hidden states (T, hidden)."""
        rows = torch.tensor(self.rows, dtype=torch.long, device=hidden.device)
        entries: list[dict[int, Logprob]] = []
        for begin, logits in zip(range(0, len(self.rows), max_rows), prompt_row_logits(model, hidden, rows, max_rows)):
            end = begin + max_rows
            entries += logprob_dicts(torch.log_softmax(logits.float(), dim=-1), self.targets[begin:end],
                                     self.num_top[begin:end])
        result, begin = [], 0
        for request, count in self.spans:
            result.append((request, entries[begin:begin + count]))
            begin += count
        return result


def prompt_row_logits(model: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor, max_rows: int):
    """Yield the logits of ``hidden[rows]``, ``max_rows`` rows at a time (every rank of a tensor-parallel group
    runs this loop: the LM head gathers over the ranks)."""
    for begin in range(0, rows.numel(), max_rows):
        yield model.compute_logits(hidden[rows[begin:begin + max_rows]])
