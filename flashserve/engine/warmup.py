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
- the sampler: greedy, sampled (temperature, top-k, top-p, min-p, seeded), penalties and logprobs.
"""
import torch
from tqdm.auto import tqdm

from flashserve.context import AttentionContext, set_context
from flashserve.engine.request import Request
from flashserve.kernels import paged_attention
from flashserve.sampling_params import SamplingParams


def warm_up_prefill(runner, show_progress: bool = True) -> int:
    """Run the prefill variants; returns the number of forward passes."""
    max_query = min(runner.config.max_num_batched_tokens, runner.max_model_len)
    pairs = paged_attention.prefill_warmup_lengths(max_query, runner.max_model_len)
    device = runner.device
    block_table = torch.zeros((1, runner.max_blocks_per_seq), dtype=torch.int32, device=device)
    for query_length, key_length in tqdm(pairs, desc="Warming up prefill kernels", unit="shape",
                                         disable=not show_progress, leave=False):
        positions = torch.arange(key_length - query_length, key_length, device=device)
        context = AttentionContext(
            slot_mapping=torch.full((query_length,), -1, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor([0, query_length], dtype=torch.int32, device=device),
            seqused_k=torch.tensor([key_length], dtype=torch.int32, device=device),
            block_table=block_table, max_seqlen_q=query_length, max_seqlen_k=key_length, is_decode=False)
        input_ids = torch.randint(0, runner.spec.vocab_size, (query_length,), device=device)
        _forward(runner, input_ids, positions, context)
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


def warm_up_sampler(runner) -> None:
    """Sample once through each of the sampler's paths."""
    vocab = runner.spec.vocab_size
    variants = [
        [SamplingParams(temperature=0)],
        [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)],
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


@torch.inference_mode()
def _forward(runner, input_ids: torch.Tensor, positions: torch.Tensor, context: AttentionContext) -> None:
    set_context(context)
    try:
        hidden = runner.model(input_ids, positions)
        runner.model.compute_logits(hidden[-1:])
    finally:
        set_context(None)
