"""One request's state inside the engine: its tokens, how many have KV in the cache, its blocks and its output."""
import enum
from collections.abc import Iterable

import torch

from flashserve.sampling_params import SamplingParams

PENDING_TOKEN = -1
"""The last entry of ``token_ids`` while its token is sampled but not yet read by the host (async scheduling,
``flashserve.engine.inflight``)."""


class RequestStatus(enum.Enum):
    """Where a request is: queued (or preempted), being computed, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """A request as the scheduler, block manager and model runner see it.

    ``token_ids`` holds the prompt followed by the generated tokens (the last one may be ``PENDING_TOKEN``).
    ``num_computed_tokens`` of them have their KV in the cache blocks ``block_ids`` (token ``t`` in block
    ``block_ids[t // block_size]``, row ``t % block_size``).
    A request samples a new token in a step once all its tokens are computed; a preempted request restarts from
    ``num_computed_tokens = 0`` and recomputes prompt and output together (vLLM v1's recompute).

    Attributes:
        request_id: the caller's id.
        prompt: the prompt text, or None.
        params: the sampling parameters.
        prompt_token_ids: the prompt's token ids (never modified).
        token_ids: prompt + output token ids.
        num_prompt_tokens: length of the prompt.
        num_computed_tokens: tokens whose KV is in the cache.
        block_ids: the cache blocks, in token order.
        block_hashes: chained hashes of the full blocks of ``token_ids`` computed so far (prefix caching).
        num_cached_blocks: how many leading blocks are registered in the prefix cache.
        max_total_tokens: the length at which the request ends with "length" (prompt + max_tokens, capped by
            max_model_len; max_model_len when max_tokens is None).
        generator: the request's own random stream when it has a seed.
        status, finish_reason: lifecycle.
        stop_reason: the stop string or stop token id that ended the request (None otherwise, EOS included).
        text: the request's ``OutputText`` (None when the engine does not detokenize it).
        logprobs: per-token logprobs (when asked for).
        prompt_logprobs: with ``params.prompt_logprobs``, the prompt tokens' logprob dicts computed so far, after
            None for the first token (see ``flashserve.engine.prompt_logprobs``); None otherwise.
        grammar: with ``params.structured_outputs``, its ``RequestGrammar`` (compiled grammar and matcher; see
            ``flashserve.engine.structured_outputs``); None otherwise.
        num_sent_tokens, num_sent_logprobs: how much of the output ``step`` has already returned.
        stop_token_set: the token ids whose sampling may end the request with "stop" (``stop_token_ids``, and
            ``eos_token_ids`` unless ``ignore_eos``), for the one-lookup test of each sampled token.
        greedy: ``params.greedy``; plain_sampling: whether no option ever needs the eager sampler (no
            ``logit_bias``, penalties, logprobs or ``min_tokens``; grammars are checked apart), both read once here
            (the per-step checks of ``DecodeSampling`` read these, and the options only when plain_sampling is
            False).
    """

    __slots__ = ("request_id", "prompt", "params", "prompt_token_ids", "token_ids", "num_prompt_tokens",
                 "num_computed_tokens", "block_ids", "block_hashes", "num_cached_blocks", "max_total_tokens",
                 "generator", "status", "finish_reason", "stop_reason", "text", "logprobs", "prompt_logprobs",
                 "grammar", "num_sent_tokens", "num_sent_logprobs", "stop_token_set", "greedy", "plain_sampling")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 max_model_len: int, generator: torch.Generator | None = None, eos_token_ids: Iterable[int] = ()):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.num_cached_blocks = 0
        self.max_total_tokens = (max_model_len if params.max_tokens is None
                                 else min(self.num_prompt_tokens + params.max_tokens, max_model_len))
        self.generator = generator
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = None
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None else None
        self.grammar = None
        self.num_sent_tokens = 0
        self.num_sent_logprobs = 0
        self.stop_token_set = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else eos_token_ids)
        self.greedy = params.greedy
        self.plain_sampling = not (params.logit_bias or params.uses_penalties or params.logprobs is not None
                                   or params.min_tokens)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated token ids."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs were asked for and some are still to be computed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        """Whether the request has ended."""
        return self.status == RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
