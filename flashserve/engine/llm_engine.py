"""The incremental engine: add requests, step, collect what is new; the server and ``LLM`` both drive it."""
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from flashserve.config import Config
from flashserve.distributed.launch import start_group
from flashserve.engine.block_manager import BlockManager
from flashserve.engine.detokenizer import OutputText, TokenTexts
from flashserve.engine.grammars import GrammarCompiler
from flashserve.engine.inflight import InflightStep
from flashserve.engine.input_buffers import END_OF_CALL, SHUTDOWN
from flashserve.engine.model_runner import ModelRunner
from flashserve.engine.prompt_logprobs import PromptLogprobRows
from flashserve.engine.request import PENDING_TOKEN, Request, RequestStatus
from flashserve.engine.scheduler import ScheduledBatch, Scheduler
from flashserve.engine.structured_outputs import GrammarWaitlist, RequestGrammar
from flashserve.engine.token_bytes import token_bytes
from flashserve.engine.token_outputs import OutputProcessor, token_id_list
from flashserve.outputs import RequestOutput
from flashserve.sampling_params import SamplingParams

_FINISHED = RequestStatus.FINISHED

GRAMMAR_WAIT_S = 0.01
"""How long a step with nothing to run but requests waiting for their grammar blocks on the compilation."""


@dataclass(slots=True)
class EngineStats:
    """Running totals since the engine started.

    A step that only decodes (every request computes one token after its prompt) counts as decode time; any other
    step counts as prefill time. A step's time is that of the ``step`` call that launched it (with async
    scheduling that call also read the step before). ``prefill_tokens`` are the tokens computed that were not
    decodes (prompt chunks and recomputation after preemption); ``decode_tokens`` the tokens sampled in decode-only
    steps.
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

    With ``tensor_parallel_size > 1`` the engine first joins or starts its tensor-parallel group
    (``flashserve.distributed.launch``); the scheduler, block manager and sampler run on rank 0 only
    (``is_driver``), the other ranks follow its steps (``follow``). ``close`` (or garbage collection) stops the
    spawned workers.

    ``scoring`` holds the ids of the requests whose prompt logprobs are not all computed yet; while it is empty, a
    step does not look for prompt-logprob rows at all. Requests with ``structured_outputs`` wait in
    ``grammar_waitlist`` (outside the scheduler) until their grammar is compiled (see
    ``flashserve.engine.structured_outputs``); the grammar compiler starts with the first such request.

    Args:
        config: the engine configuration.
    """

    def __init__(self, config: Config):
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, local_files_only=True)
        self.parallel, rank_config = start_group(config)
        try:
            self.runner = ModelRunner(rank_config)
        except BaseException:
            if self.parallel is not None:
                self.parallel.close()
            raise
        self._finalizer = weakref.finalize(self, self.parallel.close, self.runner) if self.parallel else None
        self.is_driver = self.runner.is_driver
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
        self.token_texts = TokenTexts(self.tokenizer)
        self.output_processor = OutputProcessor(self.token_texts, self.eos_token_ids)
        token_bytes(self.tokenizer)  # the detokenizer's byte table, read now rather than on the first request
        self.grammar_compiler: GrammarCompiler | None = None
        self.grammar_waitlist = GrammarWaitlist(self.eos_token_ids)
        self._inflight: InflightStep | None = None

    def add_request(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request; ``prompt`` is text or token ids (``prompt_token_ids`` overrides the tokenization).

        Raises ValueError (and queues nothing) for a duplicate id, n != 1, an empty prompt, token ids (of the
        prompt or of ``logit_bias``) outside the vocabulary, a prompt with no room for one new token within
        ``max_model_len``, a request that needs more KV blocks than the whole pool, or an invalid
        ``structured_outputs`` schema, regex or grammar (the message starts with ``structured_outputs.<field>``).
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
        token_ids = token_id_list(prompt_token_ids, self.vocab_size)
        if not token_ids:
            raise ValueError("prompt must not be empty (it has no tokens)")
        if len(token_ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens: with one generated token it exceeds "
                             f"max_model_len ({self.max_model_len})")
        request = Request(request_id, text, token_ids, params, self.max_model_len,
                          eos_token_ids=self.eos_token_ids)
        needed_blocks = self.block_manager.blocks_for_tokens(max(request.max_total_tokens - 1, len(token_ids)))
        if needed_blocks > self.block_manager.num_blocks:
            raise ValueError(f"the request needs {needed_blocks} KV blocks (prompt {len(token_ids)} + max_tokens "
                             f"{params.max_tokens} tokens, within max_model_len {self.max_model_len}) but the pool "
                             f"has {self.block_manager.num_blocks}")
        if params.structured_outputs is not None:
            request.grammar = RequestGrammar(self._grammars().submit(params.structured_outputs))
        if params.seed is not None:
            request.generator = torch.Generator(device=self.runner.device)
            request.generator.manual_seed(params.seed)
        if params.detokenize:
            request.text = OutputText(self.tokenizer, token_ids, params)
        self.requests[request_id] = request
        if request.needs_prompt_logprobs:
            self.scoring.add(request_id)
        if request.grammar is None or self.grammar_waitlist.admit(request):
            self.scheduler.add(request)

    def _grammars(self) -> GrammarCompiler:
        """The grammar compiler, made on first use (its worker thread reads the whole vocabulary once)."""
        if self.grammar_compiler is None:
            self.grammar_compiler = GrammarCompiler(self.config.tokenizer or self.config.model, self.vocab_size,
                                                    self.eos_token_ids)
        return self.grammar_compiler

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Drop a request (or each of an iterable of ids, as vLLM allows) wherever it is and free its blocks;
        unknown or finished ids are ignored."""
        single = isinstance(request_id, str) or not isinstance(request_id, Iterable)
        for one_id in [request_id] if single else list(request_id):
            request = self.requests.pop(one_id, None)
            self.scoring.discard(one_id)
            if request is None:
                continue
            if self.grammar_waitlist.discard(one_id) is not None:
                request.status, request.finish_reason = RequestStatus.FINISHED, "abort"
            else:
                self.scheduler.abort(request)
                self.runner.sampler.release(one_id)
        inflight = self._inflight
        if inflight is not None and all(self.requests.get(r.request_id) is not r for r in inflight.sampling):
            self._inflight = None  # nothing left to read: its tokens are discarded
            self.stats.generated_tokens -= len(inflight.sampling)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting (for the scheduler or for its grammar) or running, or a launched step
        is still to be read."""
        return self.scheduler.has_unfinished() or len(self.grammar_waitlist) > 0 or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns, for every request that sampled, what is new since its previous output.

        With ``async_scheduling`` the outputs are those of the step launched by the previous call: this call
        launches the next batch first (``flashserve.engine.inflight``). Text that might be the start of a stop
        string is held back until it is known not to be one. A request with ``max_tokens=0`` finishes ("length")
        when its prefill is done: the token sampled then is dropped. A request whose grammar failed to compile ends
        with "abort".
        """
        start = time.perf_counter()
        outputs = self._admit_compiled() if self.grammar_waitlist else []
        inflight, self._inflight = self._inflight, None
        if inflight is not None and inflight.needs_sync:
            outputs += self._read(inflight)
            inflight = None
        batch = self.scheduler.schedule()
        if not batch.requests:
            if inflight is not None:
                return outputs + self._read(inflight)
            if not self.scheduler.has_unfinished():
                self.grammar_waitlist.wait(GRAMMAR_WAIT_S)  # nothing else to do (no wait when none is compiling)
                return outputs
            if batch.preempted:
                return outputs
            raise RuntimeError("the scheduler could not schedule any request: this is a bug")
        launched = self._launch(batch, inflight)
        if inflight is not None:
            outputs += self._read(inflight)
        if self.config.async_scheduling:
            self._expect_tokens(launched)
            launched.elapsed_s = time.perf_counter() - start
            self._inflight = launched
        else:
            outputs += self._read(launched)
            launched.elapsed_s = time.perf_counter() - start
        self._record(launched)
        return outputs

    def _launch(self, batch: ScheduledBatch, previous: InflightStep | None) -> InflightStep:
        """Run ``batch`` up to its sampled tokens (on the device, not read) and advance its requests; input ids
        still pending in ``previous`` come from its tokens on the device. Prompt logprobs are stored now."""
        prompt_rows = PromptLogprobRows.of(batch) if self.scoring else None
        carried = previous.carried_to(batch) if previous is not None else None
        tokens, logprobs, prompt_logprobs = self.runner.run(batch, self.eos_token_ids, prompt_rows, carried)
        sampling = batch.sampling
        needs_sync = self.grammar_compiler is not None and any(request.grammar is not None for request in sampling)
        launched = InflightStep(batch, sampling, tokens, logprobs, decode_only=batch.decode_only,
                                needs_sync=needs_sync)  # no grammar compiler: no request has had a grammar
        if not launched.decode_only:
            launched.prefill_tokens = batch.total_tokens - batch.num_decodes
        self.scheduler.advance(batch)
        for request, entries in prompt_logprobs:
            if request.text is not None:
                self.token_texts.fill(entries, request.params.skip_special_tokens)
            request.prompt_logprobs.extend(entries)
            if not request.needs_prompt_logprobs:
                self.scoring.discard(request.request_id)
        return launched

    def _expect_tokens(self, launched: InflightStep) -> None:
        """Async scheduling, once the step before ``launched`` is read: give every request that continues after
        ``launched`` a ``PENDING_TOKEN``, and take those that its token ends by length out of the scheduler."""
        num_placeholders = 0
        for request in launched.sampling:
            if request.status is _FINISHED:
                continue  # ended by the step read just before (its token of this step is discarded), or aborted
            token_ids = request.token_ids
            if len(token_ids) + 1 >= request.max_total_tokens:  # max_tokens=0 too (max_total_tokens: the prompt)
                self.scheduler.finish(request, "length")
                launched.final.add(request)
            else:
                token_ids.append(PENDING_TOKEN)
                num_placeholders += 1
        launched.num_placeholders = num_placeholders

    def _read(self, step: InflightStep) -> list[RequestOutput]:
        """Read ``step``'s tokens (waiting for them) and do its host work: append them, check the stop conditions,
        detokenize, and return the outputs. Tokens of requests that ended or were aborted since ``step`` was
        launched are discarded."""
        outputs = []
        final, requests = step.final, self.requests
        append_token, new_output = self.output_processor.append_token, OutputProcessor.new_output
        for request, token_id, token_logprobs in zip(step.sampling, step.tokens.tolist(), step.logprobs):
            if requests.get(request.request_id) is not request:
                self.stats.generated_tokens -= 1
                continue
            if request.max_total_tokens == request.num_prompt_tokens:  # max_tokens=0: the token is dropped
                reason, text = "length", None
                self.stats.generated_tokens -= 1
            else:
                reason, text = append_token(request, token_id, token_logprobs)
            if request in final:
                request.finish_reason = reason
            elif reason is not None:
                self.scheduler.finish(request, reason)
            outputs.append(new_output(request, text))
            if request.status is _FINISHED:
                del requests[request.request_id]
                self.runner.sampler.release(request.request_id)
        return outputs

    def _admit_compiled(self) -> list[RequestOutput]:
        """Move the requests whose grammar is compiled to the scheduler; the outputs of those whose grammar
        failed (finished, "abort")."""
        ready, failed = self.grammar_waitlist.take_ready()
        for request in ready:
            self.scheduler.add(request)
        outputs = []
        for request in failed:
            request.status, request.finish_reason = RequestStatus.FINISHED, "abort"
            outputs.append(OutputProcessor.new_output(request))
            del self.requests[request.request_id]
            self.scoring.discard(request.request_id)
        return outputs

    def _record(self, step: InflightStep) -> None:
        """Add a launched step to the statistics (the tokens it samples; the time of the call that launched it)."""
        stats = self.stats
        stats.num_steps += 1
        stats.generated_tokens += len(step.sampling)
        if step.decode_only:
            stats.decode_tokens += len(step.sampling)
            stats.decode_time_s += step.elapsed_s
        else:
            stats.prefill_tokens += step.prefill_tokens
            stats.prefill_time_s += step.elapsed_s

    def follow(self) -> int:
        """A rank other than 0 under torchrun: run rank 0's steps until its current ``generate`` call ends
        (returns ``END_OF_CALL``) or rank 0 stops serving (``SHUTDOWN``)."""
        return self.runner.follow()

    def end_call(self, kind: int = END_OF_CALL) -> None:
        """Rank 0 under torchrun: tell the other ranks that a ``generate`` call is over, or (``SHUTDOWN``) that
        serving is (their ``follow`` returns ``kind``)."""
        if self.parallel is not None and self.parallel.follows_per_call:
            self.runner.signal_followers(kind)

    def stop_followers(self) -> None:
        """Rank 0 under torchrun, at the end of serving: the other ranks' ``follow`` returns ``SHUTDOWN``."""
        self.end_call(SHUTDOWN)

    def close(self) -> None:
        """Stop the tensor-parallel workers and leave the group (nothing to do with one rank). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

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
