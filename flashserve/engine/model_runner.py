"""Runs the model on a scheduled batch: owns the weights, the paged KV cache and the sampler.

The same code runs on CPU and GPU; only the attention kernels behind ``flashserve.kernels`` differ. Each step packs
the scheduled tokens into ``input_ids``/``positions`` and the ``AttentionContext`` (slot of every new token,
cumulative query lengths, KV lengths, and a block table padded to a fixed width of ``ceil(max_model_len /
block_size)`` columns, so that decode metadata keeps one shape whatever the sequence lengths) through persistent
buffers (``InputBuffers``), runs the forward pass, takes the last hidden row of every request that samples, and
samples; the sampled token ids stay on the device, their copy to the host queued after them (``TokenReadback``),
and the engine's reading them is the step's only wait on the device (with async scheduling, after it launched
the next step: ``flashserve.engine.inflight``). On CUDA (unless ``enforce_eager``) decode-only steps replay CUDA
graphs captured at start-up (``DecodeGraphs``), and sample by replaying a sampling graph (``DecodeSampling``) when
their requests' options allow (the eager ``Sampler`` otherwise); batches larger than the largest captured size and
every other step run eagerly. A step in which a request computes prompt positions whose prompt
logprobs it asked for runs eagerly too, and scores those rows after sampling (``prompt_logprobs``).

Under tensor parallelism (``flashserve.distributed``) every rank runs a ModelRunner over its shard of the model
and its own KV cache (its KV heads only; the pool size is the minimum over the ranks). Start-up runs in lockstep
(the same profiling passes, warm-up and graph captures on every rank: their forward passes hold the collectives).
Rank 0 runs the engine; each of its steps is sent to the other ranks in one broadcast of the input arena
(``InputBuffers``), and they run the same forward pass (and LM head) in ``follow``.

Start-up, each phase logged with its duration: load the weights; size the KV cache; warm up (compile and autotune
every kernel variant a request can need, see ``warmup``; CUDA only); capture the decode and sampling graphs.

KV-cache size (``num_kv_blocks`` when given, otherwise):
- CUDA: a profiling forward pass over ``max_num_batched_tokens`` tokens measures the activation peak, and one over
  a decode batch of the largest graph size estimates the graphs' memory; the pool gets ``gpu_memory_utilization``
  of the GPU's memory minus what is in use (weights, other processes) minus both.
- CPU: room for ``max(max_model_len, 4 * max_num_batched_tokens)`` tokens, capped at ``CPU_KV_CACHE_MAX_BYTES``
  (but never less than one ``max_model_len`` sequence).
"""
import logging
import time

import numpy as np
import torch

from flashserve.config import Config
from flashserve.context import AttentionContext, set_context
from flashserve.distributed.state import broadcast_from_driver, min_over_ranks, tp_rank, tp_size
from flashserve.engine import cascade, decode_sampling, warmup
from flashserve.engine.cuda_graphs import DecodeGraphs, capture_sizes
from flashserve.engine.inflight import CarriedTokens, SampledTokens, TokenReadback
from flashserve.engine.input_buffers import END_OF_CALL, SHUTDOWN, STEP, InputBuffers, StepInputs
from flashserve.engine.prompt_logprobs import PromptLogprobRows, prompt_row_logits
from flashserve.engine.request import Request
from flashserve.engine.sampler import Sampler
from flashserve.engine.scheduler import ScheduledBatch
from flashserve.engine.structured_outputs import TokenBitmask
from flashserve.kernels import skinny_gemm_plans, tuning_cache
from flashserve.models.loader import load_model
from flashserve.outputs import Logprob

CPU_KV_CACHE_MAX_BYTES = 2 << 30
GIB = float(1 << 30)

logger = logging.getLogger(__name__)


class ModelRunner:
    """The model, its KV cache and the sampler on one device.

    Args:
        config: the engine configuration (``max_model_len`` may be None: the checkpoint's limit is then used).

    Attributes:
        model, spec: the decoder (this rank's shard) and its ModelSpec (the whole model's).
        num_heads, num_kv_heads: the query and KV heads of this rank.
        is_driver: whether this is rank 0 (the one that samples), always True without tensor parallelism.
        max_model_len: the resolved context limit.
        num_kv_blocks: blocks in the KV pool.
        kv_cache: (num_layers, 2, num_kv_blocks, block_size, num_kv_heads, head_dim).
        graphs: the decode CUDA graphs, or None (CPU, ``enforce_eager``).
        use_cascade: whether decode steps whose requests share a long cached prefix run cascade attention
            (``flashserve.engine.cascade``; from CUDA graphs of their own where graphs are used).
        max_logit_rows: the most prompt-logprob rows whose logits exist at once (the largest sampling batch, which
            the memory profile accounts for).
        startup_times_s: seconds spent in each start-up phase ("load_weights", "profile_memory", "warm_up",
            "capture_graphs"), in order.
    """

    def __init__(self, config: Config):
        self.config = config
        self.device = config.torch_device
        self.block_size = config.block_size
        self.startup_times_s: dict[str, float] = {}
        start = time.perf_counter()
        self.model, self.spec = load_model(config.model, config.dtype, self.device)
        self.dtype = next(self.model.parameters()).dtype
        attention = self.model.attention_layers()[0]
        self.num_heads, self.num_kv_heads = attention.num_heads, attention.num_kv_heads
        self.is_driver = tp_rank() == 0
        limit = self.spec.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        self.max_model_len = config.max_model_len or limit
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.sampler = Sampler(self.device, config.seed)
        self.use_cascade = (config.enable_prefix_caching and cascade.cascade_enabled() and tp_size() == 1
                            and all(window is None for window in self.spec.sliding_windows))
        # the most requests a step can sample: the largest decode batch, and the most prompt-logprob rows at once
        self.max_logit_rows = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.readback = TokenReadback(self.max_logit_rows, self.device)
        self.token_bitmask = TokenBitmask(self.max_logit_rows, self.spec.vocab_size, self.device)
        use_graphs = self.device.type == "cuda" and not config.enforce_eager
        graph_sizes = capture_sizes(config.max_cudagraph_capture_size, self.max_logit_rows) if use_graphs else []
        padded_rows = graph_sizes[-1] if graph_sizes else 0
        self.inputs = InputBuffers(max(config.max_num_batched_tokens, padded_rows),
                                   max(config.max_num_seqs, padded_rows), self.max_blocks_per_seq, self.block_size,
                                   self.device)
        start = self._phase("load_weights", start, f"{_parameter_bytes(self.model) / GIB:.2f} GiB of weights")
        self.num_kv_blocks = min_over_ranks(config.num_kv_blocks or self._default_num_blocks(padded_rows),
                                            self.device)
        spec = self.spec
        self.kv_cache = torch.zeros(spec.num_layers, 2, self.num_kv_blocks, self.block_size, self.num_kv_heads,
                                    spec.head_dim, dtype=self.dtype, device=self.device)
        for index, attention in enumerate(self.model.attention_layers()):
            attention.k_cache = self.kv_cache[index, 0]
            attention.v_cache = self.kv_cache[index, 1]
        start = self._phase("profile_memory", start, f"KV cache of {self.num_kv_blocks} blocks "
                            f"({self.num_kv_blocks * self.block_size} tokens, {self.kv_cache.nbytes / GIB:.2f} GiB)")
        self.graphs = None
        if self.device.type == "cuda":
            eager_sizes = range(padded_rows + 1, self.max_logit_rows + 1)
            passes = self.warm_up(eager_sizes, show_progress=self.is_driver)
            start = self._phase("warm_up", start, f"{passes} forward passes")
        if graph_sizes:
            cascade_sizes = [size for size in graph_sizes if self.use_cascade and size >= cascade.MIN_REQUESTS]
            self.graphs = DecodeGraphs(self.model, self.inputs, graph_sizes, spec.vocab_size, cascade_sizes)
            self.graphs.capture(show_progress=self.is_driver)
            self._phase("capture_graphs", start, f"{self.graphs.num_graphs} decode graphs, batch sizes 1.."
                        f"{graph_sizes[-1]}, {self.graphs.memory_bytes / GIB:.2f} GiB")
        self.decode_sampling = decode_sampling.DecodeSampling(
            self.sampler, max(self.max_logit_rows, padded_rows), spec.vocab_size, self.device,
            self.graphs.logits if self.graphs is not None else None)
        if self.graphs is not None and self.is_driver:
            self.decode_sampling.capture(graph_sizes, self.graphs.pool)

    def _phase(self, name: str, start: float, detail: str) -> float:
        """Record and log the duration of a start-up phase that began at ``start``; returns the time now."""
        now = time.perf_counter()
        self.startup_times_s[name] = now - start
        logger.info("%s: %.2f s (%s)", name.replace("_", " "), now - start, detail)
        return now

    def warm_up(self, decode_batch_sizes: range, show_progress: bool = True) -> int:
        """Compile (and autotune) every kernel variant of the prefill, eager decode, small-M matrix product and
        sampling paths (``flashserve.engine.warmup``); returns the number of forward passes run. Autotuning
        results are saved to disk (``flashserve.kernels.tuning_cache``), so the next start skips the tuning. The
        sampler's shared random stream starts afresh afterwards."""
        with skinny_gemm_plans.tuning():
            passes = warmup.warm_up_prefill(self, show_progress)
            passes += warmup.warm_up_decode(self, decode_batch_sizes, show_progress)
            passes += warmup.warm_up_cascade(self, decode_batch_sizes, show_progress)
            passes += warmup.warm_up_linear(self, show_progress)
        warmup.warm_up_sampler(self)
        tuning_cache.save_all()
        self.sampler = Sampler(self.device, self.config.seed)
        return passes

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers (K and V)."""
        spec = self.spec
        element = torch.empty((), dtype=self.dtype).element_size()
        return spec.num_layers * 2 * self.block_size * self.num_kv_heads * spec.head_dim * element

    def _default_num_blocks(self, largest_graph: int) -> int:
        """The KV pool size when ``num_kv_blocks`` is not given (see the module docstring); ``largest_graph`` is the
        largest CUDA-graph batch size (0: no graphs)."""
        if self.device.type == "cuda":
            return self._profile_num_blocks(largest_graph)
        tokens = max(self.max_model_len, 4 * self.config.max_num_batched_tokens)
        num_blocks = -(-tokens // self.block_size)
        if num_blocks * self.block_bytes > CPU_KV_CACHE_MAX_BYTES:
            num_blocks = max(CPU_KV_CACHE_MAX_BYTES // self.block_bytes, self.max_blocks_per_seq)
        return num_blocks

    @torch.inference_mode()
    def _profile_num_blocks(self, largest_graph: int) -> int:
        """Run the largest step (and the largest graph's decode batch) over a stand-in cache, measure the peaks,
        and size the pool from what is left."""
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        num_seqs = max(1, min(self.config.max_num_seqs, num_tokens))
        activation_bytes = self._profile_step(num_tokens, num_seqs)
        graph_bytes = 0
        if largest_graph:
            graph_bytes = (self._profile_step(largest_graph, largest_graph, sample=False)
                           + largest_graph * self.spec.vocab_size * 4
                           + decode_sampling.workspace_bytes(largest_graph, self.spec.vocab_size))
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.config.gpu_memory_utilization - (total - free) - activation_bytes - graph_bytes
        num_blocks = int(budget // self.block_bytes)
        logger.info("memory: %.2f GiB in use, %.2f GiB activation peak, %.2f GiB reserved for CUDA graphs, "
                    "%.2f GiB left for the KV cache", (total - free) / GIB, activation_bytes / GIB,
                    graph_bytes / GIB, max(budget, 0) / GIB)
        if num_blocks < 1:
            raise ValueError(f"no GPU memory is left for the KV cache (budget {budget / GIB:.2f} GiB): raise "
                             "gpu_memory_utilization, lower max_num_batched_tokens, or pass num_kv_blocks")
        return num_blocks

    def _profile_step(self, num_tokens: int, num_seqs: int, sample: bool = True) -> int:
        """Peak bytes the forward pass of ``num_seqs`` prompts totalling ``num_tokens`` tokens (and, with
        ``sample``, the sampler's softmax and sort of their logits) allocates beyond what is in use. A graph's pool
        holds no sampling: the sampler runs outside it, in memory the first pass measured.

        The pass runs the serving kernels over a one-block stand-in cache (slot -1: nothing is written; every key
        is read from that block), so it launches nothing that serving would not."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        spec, device = self.spec, self.device
        stand_in = torch.zeros(1, self.block_size, self.num_kv_heads, spec.head_dim, dtype=self.dtype, device=device)
        lengths = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        input_ids = torch.randint(0, spec.vocab_size, (num_tokens,), device=device)
        set_context(AttentionContext(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
            cu_seqlens_q=cu_seqlens, seqused_k=cu_seqlens[1:] - cu_seqlens[:-1],
            block_table=torch.zeros(num_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=device),
            max_seqlen_q=max(lengths), max_seqlen_k=max(lengths), is_decode=num_tokens == num_seqs))
        attention_layers = self.model.attention_layers()
        for attention in attention_layers:
            attention.k_cache = attention.v_cache = stand_in
        try:
            hidden = self.model(input_ids, positions)
            logits = self.model.compute_logits(hidden[cu_seqlens[1:].long() - 1])
            if sample:
                logits.softmax(dim=-1).sort(dim=-1)
        finally:
            set_context(None)
            for attention in attention_layers:
                attention.k_cache = attention.v_cache = None
        del hidden, logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        return peak - current

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, eos_token_ids: list[int], prompt_rows: PromptLogprobRows | None = None,
            carried: CarriedTokens | None = None
            ) -> tuple[SampledTokens, list[dict[int, Logprob] | None], list[tuple[Request, list[dict[int, Logprob]]]]]:
        """Compute the batch's tokens and sample one token for every request with ``batch.samples`` set (rank 0;
        under tensor parallelism the other ranks run the same step in ``follow``).

        Returns the sampled token ids (on the device, their copy to the host started: nothing waits for the step
        unless logprobs or prompt logprobs are asked for) and per-token logprob dicts, in the order of the sampling
        requests, and the prompt logprob dicts of ``prompt_rows`` (``PromptLogprobRows.of(batch)``), per request.
        ``carried``: input ids taken from the previous step's sampled tokens (``InputBuffers.prepare``).
        """
        num_reqs = len(batch.requests)
        decode_only = prompt_rows is None and sum(batch.num_new_tokens) == num_reqs
        shared_blocks = cascade.plan(batch.requests, self.block_size) if decode_only and self.use_cascade else 0
        graph_size = None
        if self.graphs is not None and decode_only:
            graph_size = self.graphs.padded_size(num_reqs)
        inputs = self.inputs.prepare(batch, graph_size, prompt_rows.rows if prompt_rows is not None else None,
                                     shared_blocks * self.block_size, carried)
        broadcast_from_driver(self.inputs.arena)
        sampling = batch.sampling
        logits, hidden = self._forward(inputs, graph_size, len(sampling), shared_blocks)
        if graph_size is not None:
            logits = logits[:num_reqs] if len(sampling) == num_reqs else logits[inputs.logits_indices]
        sampled_rows = None
        if sampling and len(sampling) == num_reqs and (graph_size is not None or self.graphs is None):
            sampled_rows = self.decode_sampling.sampled_rows(sampling)
        if sampled_rows is not None:  # sampled from buffers (a graph replay on CUDA)
            token_ids = self.decode_sampling.sample(sampling, graph_size or num_reqs,
                                                    None if graph_size is not None else logits.float(), sampled_rows)
            logprobs = [None] * len(sampling)
        elif sampling:
            logits = self.token_bitmask.apply(logits.float(), sampling)  # structured outputs: forbidden -> -inf
            token_ids, logprobs = self.sampler.sample(logits, sampling, eos_token_ids)
        else:
            token_ids, logprobs = torch.empty(0, dtype=torch.int64, device=self.device), []
        token_ids = self.readback.start(token_ids)
        del logits
        if prompt_rows is None:
            return token_ids, logprobs, []
        return token_ids, logprobs, prompt_rows.compute(self.model, hidden, self.max_logit_rows)

    def _forward(self, inputs: StepInputs, graph_size: int | None, num_logits: int, shared_blocks: int = 0
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The step's (logits, hidden states): a graph replay (logits of every padded row, no hidden states), or
        an eager pass (the logits of ``inputs.logits_indices``; None when ``num_logits`` is 0), with cascade
        attention over the batch's first ``shared_blocks`` blocks when they are shared by every request (their
        length is in the input buffers)."""
        if graph_size is not None:
            return self.graphs.replay(graph_size, shared_blocks > 0), None
        context = inputs.context
        if shared_blocks:
            context = cascade.with_shared_prefix(context, self.inputs.shared_prefix_len.device)
        set_context(context)
        try:
            hidden = self.model(inputs.input_ids, inputs.positions)
        finally:
            set_context(None)
        if not num_logits:
            return None, hidden
        # every row samples (a decode step): the rows are the hidden states themselves, in order
        rows = hidden if num_logits == hidden.shape[0] else hidden[inputs.logits_indices]
        return self.model.compute_logits(rows), hidden

    @torch.inference_mode()
    def follow(self) -> int:
        """A rank other than 0: run the steps rank 0 broadcasts (their forward passes, LM heads and prompt-logprob
        logits, whose collectives match rank 0's) until the end of a ``generate`` call or shutdown; returns which
        (``END_OF_CALL`` or ``SHUTDOWN``)."""
        while True:
            broadcast_from_driver(self.inputs.arena)
            header = self.inputs.read_header()
            if header.kind != STEP:
                if header.kind not in (END_OF_CALL, SHUTDOWN):
                    raise RuntimeError(f"unknown message kind {header.kind} from rank 0: this is a bug")
                return header.kind
            inputs = self.inputs.step_inputs(header)
            _, hidden = self._forward(inputs, header.padded_size or None, header.num_logits)
            if header.num_prompt_rows:
                rows = self.inputs.prompt_rows.device[:header.num_prompt_rows]
                for _ in prompt_row_logits(self.model, hidden, rows, self.max_logit_rows):
                    pass

    def release_graphs(self) -> None:
        """Free the CUDA graphs (the runner runs eagerly afterwards); done before leaving a tensor-parallel group."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def signal_followers(self, kind: int) -> None:
        """Rank 0: tell the other ranks that a ``generate`` call ended (``END_OF_CALL``) or to stop (``SHUTDOWN``)."""
        if tp_size() > 1:
            self.inputs.prepare_signal(kind)
            broadcast_from_driver(self.inputs.arena)


def _parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (a tied weight counted once)."""
    return sum(param.numel() * param.element_size() for param in model.parameters())
