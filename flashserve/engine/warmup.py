"""Start-up warm-up: run every kernel variant a request can meet once, so that nothing compiles while serving.

Triton compiles a kernel the first time it sees a new combination of its compile-time arguments, and autotunes
the prefill kernel once per length class; either takes seconds, which in the middle of serving stalls every
request. The warm-up reaches every variant through the model itself (so every layer type, norm and projection
shape is covered), with dummy inputs that write nothing into the KV cache (slot -1):

- prefill: one forward pass per (query length, key length) pair of ``paged_attention.prefill_warmup_lengths`` —
  every length class and head-packing case that batches within ``max_num_batched_tokens`` and ``max_model_len``
  can produce;
- decode: one forward pass per distinct decode launch variant over the batch sizes that run eagerly (all of
  them with ``enforce_eager``, else those above the largest CUDA graph: captured sizes are compiled by their
  capture);
- the small-M matrix products: one prefill pass (and the LM head over every row) per row bucket of
  ``flashserve.kernels.skinny_gemm_plans`` up to ``MAX_ROWS``, so that every projection has its plan (the
  measured table's on its GPU model, else measured once against cuBLAS inside ``skinny_gemm_plans.tuning()``,
  which ``ModelRunner.warm_up`` opens, or read from disk) and its kernels compiled before any graph is captured;
- cascade attention (when the runner uses it): one decode step with a shared prefix per distinct launch variant
  of its two attention halves over the batch sizes that run eagerly (``warm_up_cascade``; captured sizes are
  compiled by their capture);
- the sampler: greedy, sampled (temperature, top-k, top-p, min-p, seeded), penalties and logprobs.
"""
import torch
from tqdm.auto import tqdm

from flashserve.context import AttentionContext, set_context
from flashserve.engine import cascade
from flashserve.engine.request import Request
from flashserve.kernels import paged_attention, skinny_gemm_plans
from flashserve.kernels.cascade import cascade_variant
from flashserve.sampling_params import SamplingParams


def warm_up_prefill(runner, show_progress: bool = True) -> int:
    """Run the prefill variants; returns the number of forward passes."""
    max_query = min(runner.config.max_num_batched_tokens, runner.max_model_len)
    pairs = paged_attention.prefill_warmup_lengths(max_query, runner.max_model_len)
    for query_length, key_length in tqdm(pairs, desc="Warming up prefill kernels", unit="shape",
                                         disable=not show_progress, leave=False):
        _forward_one_sequence(runner, query_length, key_length)
    return len(pairs)


def warm_up_decode(runner, batch_sizes: range, show_progress: bool = True) -> int:
    """Run one eager decode step per distinct decode launch variant among ``batch_sizes``; returns how many."""
    spec = runner.spec
    capacity = runner.max_blocks_per_seq * runner.block_size
    variants = {}
    for batch in batch_sizes:
        key = paged_attention.decode_variant(batch, runner.num_heads, runner.num_kv_heads, spec.head_dim, capacity,
                                             runner.device)
        variants.setdefault(key, batch)
    for batch in tqdm(list(variants.values()), desc="Warming up decode kernels", unit="shape",
                      disable=not show_progress, leave=False):
        inputs = runner.inputs.prepare_padding(batch)
        _forward(runner, inputs.input_ids, inputs.positions, inputs.context)
    return len(variants)


def warm_up_cascade(runner, batch_sizes: range, show_progress: bool = True) -> int:
    """Run one cascade-attention decode step (``flashserve.engine.cascade``) per distinct launch variant
    (``kernels.cascade.cascade_variant``: the launches do not depend on the prefix length) among ``batch_sizes``
    from ``cascade.MIN_REQUESTS`` on. Returns the number of passes (0 when the runner does not use cascade
    attention, or its context cannot hold a prefix of ``cascade.MIN_PREFIX_TOKENS`` tokens)."""
    spec, block_size = runner.spec, runner.block_size
    blocks = -(-cascade.MIN_PREFIX_TOKENS // block_size)
    if not runner.use_cascade or blocks >= runner.max_blocks_per_seq:
        return 0
    capacity = runner.max_blocks_per_seq * block_size
    variants = {}
    for batch in batch_sizes:
        if batch >= cascade.MIN_REQUESTS:
            key = cascade_variant(batch, runner.num_heads, runner.num_kv_heads, spec.head_dim, capacity,
                                  runner.device)
            variants.setdefault(key, batch)
    for batch in tqdm(list(variants.values()), desc="Warming up cascade attention", unit="shape",
                      disable=not show_progress, leave=False):
        inputs = runner.inputs.prepare_padding(batch)  # as the graph capture does: the launches follow the shapes
        _forward(runner, inputs.input_ids, inputs.positions,
                 cascade.with_shared_prefix(inputs.context, runner.inputs.shared_prefix_len.device))
    return len(variants)


def warm_up_linear(runner, show_progress: bool = True) -> int:
    """Run one single-sequence prefill of ``rows`` tokens per row bucket (``rows`` capped at
    ``max_num_batched_tokens`` and ``max_model_len``), with the LM head over all rows; returns the number of
    passes."""
    limit = min(runner.config.max_num_batched_tokens, runner.max_model_len)
    row_counts = sorted({min(bucket, limit) for bucket in skinny_gemm_plans.ROW_BUCKETS})
    for rows in tqdm(row_counts, desc="Warming up matrix products", unit="shape", disable=not show_progress,
                     leave=False):
        _forward_one_sequence(runner, rows, rows, all_logits=True)
    return len(row_counts)


def warm_up_sampler(runner) -> None:
    """Sample once through each of the sampler's paths."""
    vocab = runner.spec.vocab_size
    variants = [
        [SamplingParams(temperature=0)],
        [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)],
        [SamplingParams(temperature=0.8), SamplingParams(temperature=0.8, seed=1)],  # the race's shared kernel
        [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=0, repetition_penalty=1.1,
                                                       presence_penalty=0.5, frequency_penalty=0.5, logprobs=2,
                                                       min_tokens=2)],
    ]
    for params_list in variants:
        requests = []
        for index, params in enumerate(params_list):
            request = Request(f"warmup-{index}", None, [0, 1, 2], params, runner.max_model_len)
            if params.seed is not None:
                request.generator = torch.Generator(device=runner.device)
                request.generator.manual_seed(params.seed)
            requests.append(request)
        logits = torch.randn((len(requests), vocab), dtype=torch.float32, device=runner.device)
        runner.sampler(logits, requests, list(runner.spec.eos_token_ids) or [0])


def _forward_one_sequence(runner, query_length: int, key_length: int, all_logits: bool = False) -> None:
    """A prefill of ``query_length`` new tokens of one sequence of ``key_length`` tokens (writing nothing)."""
    device = runner.device
    context = AttentionContext(
        slot_mapping=torch.full((query_length,), -1, dtype=torch.int64, device=device),
        cu_seqlens_q=torch.tensor([0, query_length], dtype=torch.int32, device=device),
        seqused_k=torch.tensor([key_length], dtype=torch.int32, device=device),
        block_table=torch.zeros((1, runner.max_blocks_per_seq), dtype=torch.int32, device=device),
        max_seqlen_q=query_length, max_seqlen_k=key_length, is_decode=False)
    input_ids = torch.randint(0, runner.spec.vocab_size, (query_length,), device=device)
    positions = torch.arange(key_length - query_length, key_length, device=device)
    _forward(runner, input_ids, positions, context, all_logits)


@torch.inference_mode()
def _forward(runner, input_ids: torch.Tensor, positions: torch.Tensor, context: AttentionContext,
             all_logits: bool = False) -> None:
    set_context(context)
    try:
        hidden = runner.model(input_ids, positions)
        runner.model.compute_logits(hidden if all_logits else hidden[-1:])
    finally:
        set_context(None)
