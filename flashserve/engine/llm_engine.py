"""The incremental engine: add requests, step, collect what is new; the server and ``LLM`` both drive it."""
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from flashserve.config import Config
from flashserve.engine.block_manager import BlockManager
from flashserve.engine.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback
from flashserve.engine.model_runner import ModelRunner
from flashserve.engine.prompt_logprobs import PromptLogprobRows
from flashserve.engine.request import Request
from flashserve.engine.scheduler import Scheduler
from flashserve.outputs import CompletionOutput, Logprob, RequestOutput
from flashserve.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineStats:
    """Running totals since the engine started.

    A step that only decodes (every request computes one token after its prompt) counts as decode time; any other
    step counts as prefill time. ``prefill_tokens`` are the tokens computed that were not decodes (prompt chunks and
    recomputation after preemption); ``decode_tokens`` the tokens sampled in decode-only steps.
    """

    num_steps: int = 0
    prefill_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_tokens: int = 0
    decode_time_s: float = 0.0
    generated_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prefill throughput (0 before any prefill step)."""
        return self.prefill_tokens / self.prefill_time_s if self.prefill_time_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput (0 before any decode-only step)."""
        return self.decode_tokens / self.decode_time_s if self.decode_time_s else 0.0


class LLMEngine:
    """Tokenizer, scheduler, block manager and model runner, stepped one batch at a time.

    ``scoring`` holds the ids of the requests whose prompt logprobs are not all computed yet; while it is empty, a
    step does not look for prompt-logprob rows at all.

    Args:
        config: the engine configuration.
    """

    def __init__(self, config: Config):
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, local_files_only=True)
        self.runner = ModelRunner(config)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.spec.vocab_size
        eos = list(self.runner.spec.eos_token_ids)
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [self.tokenizer.eos_token_id]
        self.eos_token_ids = eos
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.scoring: set[str] = set()
        self.stats = EngineStats()
        self._token_texts: dict[tuple[int, bool], str] = {}  # (token id, skip_special_tokens) -> its text alone

    def add_request(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request; ``prompt`` is text or token ids (``prompt_token_ids`` overrides the tokenization).

        Raises ValueError (and queues nothing) for a duplicate id, n != 1, an empty prompt, token ids (of the
        prompt or of ``logit_bias``) outside the vocabulary, a prompt with no room for one new token within
        ``max_model_len``, or a request that needs more KV blocks than the whole pool.
        """
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text = prompt if isinstance(prompt, str) else None
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if prompt_token_ids is None:
            raise ValueError("prompt must be a string or a list of token ids")
        if params.n != 1:
            raise ValueError(f"add_request takes n = 1 (got n = {params.n}): add params.copies() as requests of "
                             "their own, as LLM.generate and the server do")
        params.check_vocabulary(self.vocab_size)
        token_ids = _token_id_list(prompt_token_ids, self.vocab_size)
        if not token_ids:
            raise ValueError("prompt must not be empty (it has no tokens)")
        if len(token_ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens: with one generated token it exceeds "
                             f"max_model_len ({self.max_model_len})")
        request = Request(request_id, text, token_ids, params, self.max_model_len)
        needed_blocks = self.block_manager.blocks_for_tokens(max(request.max_total_tokens - 1, len(token_ids)))
        if needed_blocks > self.block_manager.num_blocks:
            raise ValueError(f"the request needs {needed_blocks} KV blocks (prompt {len(token_ids)} + max_tokens "
                             f"{params.max_tokens} tokens, within max_model_len {self.max_model_len}) but the pool "
                             f"has {self.block_manager.num_blocks}")
        if params.seed is not None:
            request.generator = torch.Generator(device=self.runner.device)
            request.generator.manual_seed(params.seed)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        self.requests[request_id] = request
        if request.needs_prompt_logprobs:
            self.scoring.add(request_id)
        self.scheduler.add(request)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Drop a request (or each of an iterable of ids, as vLLM allows) wherever it is and free its blocks;
        unknown or finished ids are ignored."""
        single = isinstance(request_id, str) or not isinstance(request_id, Iterable)
        for one_id in [request_id] if single else list(request_id):
            request = self.requests.pop(one_id, None)
            self.scoring.discard(one_id)
            if request is not None:
                self.scheduler.abort(request)
                self.runner.sampler.release(one_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns, for every request that sampled, what is new since its previous output.

        Text that might be the start of a stop string is held back until it is known not to be one. A request with
        ``max_tokens=0`` finishes ("length") when its prefill is done: the token sampled then is dropped.
        """
        batch = self.scheduler.schedule()
        if not batch.requests:
            if batch.preempted or not self.has_unfinished():
                return []
            raise RuntimeError("the scheduler could not schedule any request: this is a bug")
        decode_only = all(n == 1 and r.num_computed_tokens >= r.num_prompt_tokens
                          for r, n in zip(batch.requests, batch.num_new_tokens))
        start = time.perf_counter()
        prompt_rows = PromptLogprobRows.of(batch) if self.scoring else None
        token_ids, logprobs, prompt_logprobs = self.runner.run(batch, self.eos_token_ids, prompt_rows)
        elapsed = time.perf_counter() - start
        self._record(batch, decode_only, len(token_ids), elapsed)
        self.scheduler.advance(batch)
        for request, entries in prompt_logprobs:
            self._decode_logprobs(request, entries)
            request.prompt_logprobs.extend(entries)
            if not request.needs_prompt_logprobs:
                self.scoring.discard(request.request_id)
        sampling = [request for request, samples in zip(batch.requests, batch.samples) if samples]
        outputs = []
        for request, token_id, token_logprobs in zip(sampling, token_ids, logprobs):
            if request.params.max_tokens == 0:
                self.scheduler.finish(request, "length")
                self.stats.generated_tokens -= 1
            else:
                self._append_token(request, token_id, token_logprobs)
            outputs.append(self._new_output(request))
            if request.is_finished:
                del self.requests[request.request_id]
                self.runner.sampler.release(request.request_id)
        return outputs

    def _record(self, batch, decode_only: bool, num_sampled: int, elapsed: float) -> None:
        """Add a step to the statistics."""
        stats = self.stats
        stats.num_steps += 1
        stats.generated_tokens += num_sampled
        if decode_only:
            stats.decode_tokens += num_sampled
            stats.decode_time_s += elapsed
        else:
            stats.prefill_tokens += sum(n for r, n in zip(batch.requests, batch.num_new_tokens)
                                        if not (n == 1 and r.num_computed_tokens >= r.num_prompt_tokens))
            stats.prefill_time_s += elapsed

    def _append_token(self, request: Request, token_id: int, token_logprobs: dict[int, Logprob] | None) -> None:
        """Add a sampled token, extend the text, and finish the request when a stop condition is met."""
        params = request.params
        request.token_ids.append(token_id)
        if request.logprobs is not None:
            self._decode_logprobs(request, [token_logprobs])
            request.logprobs.append(token_logprobs)
        past_min = request.num_output_tokens >= params.min_tokens
        is_eos = not params.ignore_eos and token_id in self.eos_token_ids
        reason = None
        if past_min and (is_eos or token_id in params.stop_token_ids):
            reason = "stop"
            request.stop_reason = None if is_eos else token_id
            kept = request.token_ids if params.include_stop_str_in_output else request.token_ids[:-1]
            delta = request.detokenizer.step(kept, flush=True)
        else:
            delta = request.detokenizer.step(request.token_ids)
            if request.num_tokens >= request.max_total_tokens:
                reason = "length"
                delta += request.detokenizer.step(request.token_ids, flush=True)
        text = request.output_text + delta
        if delta and past_min and params.stop_strings:
            match = find_stop_string(text, len(delta), params)
            if match is not None:
                request.stop_reason = text[match[0]:match[1]]
                text = text[:match[1] if params.include_stop_str_in_output else match[0]]
                reason = "stop"
        request.output_text = text
        if reason is not None:
            self.scheduler.finish(request, reason)

    def _decode_logprobs(self, request: Request, entries: list[dict[int, Logprob]]) -> None:
        """Set the ``decoded_token`` of every Logprob of ``entries``: its token's text on its own (each token is
        decoded once per engine and remembered: prompt logprobs with many top tokens repeat the same few)."""
        skip_special_tokens = request.params.skip_special_tokens
        texts = self._token_texts
        for entry in entries:
            for token_id, logprob in entry.items():
                key = (token_id, skip_special_tokens)
                text = texts.get(key)
                if text is None:
                    text = texts[key] = self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)
                logprob.decoded_token = text

    def _new_output(self, request: Request) -> RequestOutput:
        """The request's text, tokens and logprobs not yet returned by ``step``, and its prompt logprobs if this is
        its first output (the one before any token was sent)."""
        prompt_logprobs = request.prompt_logprobs if request.num_sent_tokens == 0 else None
        holdback = 0 if request.is_finished else stop_holdback(request.params)
        text_end = max(request.num_sent_chars, len(request.output_text) - holdback)
        text = request.output_text[request.num_sent_chars:text_end]
        request.num_sent_chars = text_end
        new_tokens = request.token_ids[request.num_prompt_tokens + request.num_sent_tokens:]
        request.num_sent_tokens += len(new_tokens)
        logprobs = None
        if request.logprobs is not None:
            logprobs = request.logprobs[request.num_sent_logprobs:]
            request.num_sent_logprobs = len(request.logprobs)
        completion = CompletionOutput(0, text, new_tokens, request.finish_reason, logprobs, request.stop_reason)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, [completion],
                             request.is_finished, prompt_logprobs)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (and the hit-rate statistics); returns True (vLLM's signature).

        Safe while requests run: their blocks stay theirs, only the sharing of blocks already computed ends.
        """
        self.block_manager.reset_prefix_cache()
        return True

    def prefix_cache_stats(self) -> dict[str, float]:
        """Prefix-cache statistics since the last reset: queried and hit prompt tokens, and the hit rate."""
        manager = self.block_manager
        return {"queried_tokens": manager.num_queried_tokens, "hit_tokens": manager.num_hit_tokens,
                "hit_rate": manager.hit_rate}


def _token_id_list(token_ids, vocab_size: int) -> list[int]:
    """Prompt token ids (any sequence of integers, numpy ones included) -> list[int]; ValueError for anything that
    is not an integer in [0, vocab_size)."""
    if isinstance(token_ids, str) or not isinstance(token_ids, Iterable):
        raise ValueError(f"prompt token ids must be a list of integers, got {type(token_ids).__name__}")
    result = []
    for token in token_ids:
        if isinstance(token, bool):
            raise ValueError(f"prompt token ids must be integers, got {token!r}")
        try:
            token = operator.index(token)
        except TypeError:
            raise ValueError(f"prompt token ids must be integers, got {token!r}") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"prompt token id {token} is outside the vocabulary [0, {vocab_size})")
        result.append(token)
    return result
