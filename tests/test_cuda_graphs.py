"""Decode CUDA graphs and the start-up warm-up.

CPU: the capture sizes, the padding rows of a graph batch, the options, and the warm-up (it must write nothing
into the KV cache). GPU: greedy parity of graph replays with eager steps and with Hugging Face in float32 for every
architecture (batch sizes that hit and miss captured sizes, contexts over many blocks, batches above the largest
graph), and no Triton compilation once ``LLM(...)`` has returned.
"""
import random

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.config import Config
from flashserve.engine.cuda_graphs import capture_sizes
from flashserve.engine.input_buffers import InputBuffers
from flashserve.engine.model_runner import ModelRunner
from flashserve.engine.request import Request
from flashserve.engine.scheduler import ScheduledBatch
from flashserve.kernels import paged_attention
from flashserve.kernels.prefill_tuning import length_class
from flashserve.models.checkpoint import write_random_checkpoint
from hf_parity import checkpoint_with_continuations

ARCHITECTURES = [("LlamaForCausalLM", {}), ("Qwen2ForCausalLM", {}), ("Qwen3ForCausalLM", {}),
                 ("MistralForCausalLM", {"sliding_window": 8})]
NEW_TOKENS = 12


def test_capture_sizes_follow_the_schedule_and_stop_at_the_largest_batch():
    assert capture_sizes(512, 256) == [1, 2, 4, 8, *range(16, 257, 8)]
    assert capture_sizes(512, 1024) == [1, 2, 4, 8, *range(16, 257, 8), *range(272, 513, 16)]
    assert capture_sizes(512, 100) == [1, 2, 4, 8, *range(16, 105, 8)]  # 104 holds a batch of 100
    assert capture_sizes(20, 256) == [1, 2, 4, 8, 16]
    assert capture_sizes(1, 256) == [1]


def test_capture_size_option(tmp_path):
    directory = write_random_checkpoint(str(tmp_path / "m"), "LlamaForCausalLM", seed=0)
    assert Config(model=directory).max_cudagraph_capture_size == 512
    assert Config(model=directory, max_num_seqs=8).max_cudagraph_capture_size == 16
    for bad in (0, -4, 2.5, "8"):
        with pytest.raises(ValueError, match="max_cudagraph_capture_size"):
            Config(model=directory, max_cudagraph_capture_size=bad)


def test_padding_rows_read_and_write_nothing():
    buffers = InputBuffers(max_num_tokens=16, max_num_seqs=8, max_blocks_per_seq=4, block_size=4,
                           device=torch.device("cpu"))
    requests = []
    for index in range(3):
        request = Request(str(index), None, list(range(10 + index)), SamplingParams(), max_model_len=16)
        request.num_computed_tokens = len(request.token_ids) - 1
        request.block_ids = [index, 4 + index, 7]
        requests.append(request)
    batch = ScheduledBatch()
    for request in requests:
        batch.add(request, 1)
    inputs = buffers.prepare(batch, padded_size=8)
    context = inputs.context
    assert inputs.input_ids.shape == (8,) and context.is_decode
    assert inputs.positions.tolist() == [9, 10, 11, 0, 0, 0, 0, 0]
    assert context.slot_mapping.tolist()[3:] == [-1] * 5
    assert context.seqused_k.tolist() == [10, 11, 12, 0, 0, 0, 0, 0]
    assert context.cu_seqlens_q.tolist() == list(range(9))
    assert inputs.logits_indices.tolist() == [0, 1, 2]
    padding = buffers.prepare_padding(5)
    assert padding.context.slot_mapping.tolist() == [-1] * 5 and padding.context.seqused_k.tolist() == [0] * 5


@pytest.mark.parametrize("max_query, max_key", [(8192, 40960), (256, 512), (100, 128), (2, 2), (4096, 4096)])
def test_prefill_warm_up_lengths_cover_every_variant(max_query, max_key):
    """Every (query class, key class, head packing) a batch within the bounds can launch is warmed up."""
    def variant(query, key):
        return length_class(query), length_class(key), query < 64

    warmed = {variant(q, k) for q, k in paged_attention.prefill_warmup_lengths(max_query, max_key)}
    lengths = sorted({2, 3, 63, 64, 65, 511, 512, 513, 4095, 4096, 4097, 8191, 8192, 40960, max_query, max_key})
    for query in (n for n in lengths if n <= max_query):
        for key in (n for n in lengths if query <= n <= max_key):
            assert variant(query, key) in warmed, (query, key)


def test_warm_up_writes_nothing_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    directory = write_random_checkpoint(str(tmp_path / "q"), "Qwen3ForCausalLM", seed=0)
    runner = ModelRunner(Config(model=directory, dtype="float32", device="cpu", max_model_len=96,
                                max_num_batched_tokens=80, max_num_seqs=6))
    assert runner.graphs is None and "warm_up" not in runner.startup_times_s
    assert runner.warm_up(range(1, 7), show_progress=False) > 0
    assert torch.count_nonzero(runner.kv_cache) == 0


def _prompts(vocab_size: int, count: int) -> list[list[int]]:
    """``count`` prompts of 1 to 60 tokens (up to 15 blocks of 4)."""
    rng = random.Random(3)
    return [[rng.randrange(6, vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(count)]


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=[arch for arch, _ in ARCHITECTURES])
def checkpoint(request, tmp_path_factory):
    """(directory, prompts, Hugging Face greedy continuations) for one architecture (float32, on the CPU)."""
    architecture, overrides = request.param
    return checkpoint_with_continuations(str(tmp_path_factory.mktemp(architecture)), architecture, overrides, 2,
                                         lambda vocab_size: _prompts(vocab_size, 9), NEW_TOKENS)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _engine(directory: str, **options) -> LLM:
    """A float32 CUDA engine with an explicit pool (GPU tests may share the GPU between processes)."""
    return LLM(directory, dtype="float32", device="cuda", block_size=4, num_kv_blocks=1024, max_num_seqs=16,
               **options)


@pytest.mark.gpu
def test_graph_replays_match_eager_steps_and_hugging_face(checkpoint):
    directory, prompts, expected = checkpoint
    llm = _engine(directory)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    replays = []
    original = graphs.replay
    graphs.replay = lambda size, *args: replays.append(size) or original(size, *args)
    for count in (1, 3, 9):  # batch sizes 1 (captured), 3 and 9 (padded to 4 and 16)
        assert _generate(llm, prompts[:count]) == expected[:count]
    assert {1, 4, 16} <= set(replays)
    eager = _engine(directory, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    assert _generate(eager, prompts) == expected
    small = _engine(directory, max_cudagraph_capture_size=4)  # batches of 9 run eagerly, smaller ones replay
    assert small.engine.runner.graphs.sizes == [1, 2, 4]
    assert _generate(small, prompts) == expected


@pytest.mark.gpu
def test_nothing_compiles_after_start_up(checkpoint):
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no jit_post_compile_hook")
    directory, _, _ = checkpoint
    llm = LLM(directory, dtype="bfloat16", device="cuda", block_size=16, num_kv_blocks=512, max_num_seqs=32,
              max_model_len=512, max_num_batched_tokens=256)
    compiled = []
    runtime.jit_post_compile_hook = lambda *args, **kwargs: compiled.append(kwargs.get("key", args[:1]))
    try:
        rng = random.Random(0)
        for length in (1, 2, 63, 64, 65, 200, 300, 510):
            for batch in (1, 5, 32):
                prompts = [[rng.randrange(6, 300) for _ in range(length)] for _ in range(batch)]
                params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
                llm.generate(prompts, params, use_tqdm=False)
        sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=5, max_tokens=3, seed=1, logprobs=1)
        llm.generate([[7, 8, 9]] * 3, sampled, use_tqdm=False)
    finally:
        runtime.jit_post_compile_hook = None
    assert compiled == []
