"""Tensor parallelism on GPUs (NCCL, CUDA graphs with the all-reduces inside them): skipped without enough GPUs.

float32: greedy tokens at TP 2 and 4 equal Hugging Face's and TP 1's for every architecture of the CPU tests (the
mixture-of-experts ones running the fused-MoE kernel on each rank's slice of the experts), with decode steps
replayed from graphs (batch sizes that hit and miss captured sizes, a batch above the largest graph) and chunked
prefill; seeded sampling equal to TP 1. Also: a ``tensor_parallel_size`` above the number of GPUs is a ValueError
before any worker starts. On one GPU: the collectives the engine captures replay from a CUDA graph on a one-rank
NCCL group.

bfloat16 at TP 2, by the kernels' rule (error against fp32 <= 2x the error of the same math in bf16 in plain
PyTorch), applied to the whole model: each prompt followed by its fp32 greedy continuation is scored (prompt
logprobs: the log-probability of every next token), by Hugging Face in fp32 (the reference), by Hugging Face in
bf16 (plain PyTorch's bf16 error) and by the TP-2 engine in bf16. Token equality is no measure here: where two
logits (or, in MoE layers, two router scores) are within bf16 rounding of each other, any reordering of the sums
(the all-reduce adds two partial sums) may pick the other one, and so does Hugging Face's bf16 run. The statistic is
the mean |logprob error| over all ~1,900 scored positions: a routing flip moves a few positions a lot, and how often
flips happen grows with the rounding error, so the mean measures both kinds of error, where the maximum would be
decided by one near-tie.
"""
import multiprocessing
import random

import pytest
import torch

from flashserve import LLM, SamplingParams
from hf_parity import checkpoint_with_continuations
from moe_cases import MOE_CASES

pytestmark = pytest.mark.gpu

MODELS = [("LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, vocab_size=401)),
          ("Qwen2ForCausalLM", {}), ("Qwen3ForCausalLM", dict(num_key_value_heads=1)),
          ("MistralForCausalLM", dict(sliding_window=8)), *MOE_CASES.values()]
NEW_TOKENS = 12


def _prompts(vocab_size: int) -> list[list[int]]:
    """19 prompts (a decode batch of 19 replays the graph of 24; 9 of them the graph of 16) of 1 to 300 tokens."""
    rng = random.Random(1)
    return [[rng.randrange(6, vocab_size) for _ in range(rng.choice([1, 5, 17, 64, 300]))] for _ in range(19)]


def _needs_gpus(count: int) -> None:
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} GPUs")


@pytest.fixture(scope="module", params=MODELS, ids=[architecture for architecture, _ in MODELS])
def checkpoint(request, tmp_path_factory):
    architecture, overrides = request.param
    return checkpoint_with_continuations(str(tmp_path_factory.mktemp(architecture)), architecture, overrides, 2,
                                         _prompts, NEW_TOKENS)


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(prompts, params, use_tqdm=False)]


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("size", [2, 4])
def test_fp32_parity_with_graphs(checkpoint, size):
    _needs_gpus(size)
    directory, prompts, expected = checkpoint
    seeded = [SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=NEW_TOKENS, ignore_eos=True)
              for i in range(len(prompts))]
    options = dict(dtype="float32", max_model_len=512, max_num_batched_tokens=256, max_cudagraph_capture_size=16,
                   gpu_memory_utilization=0.5)
    single = LLM(directory, **options)
    reference_samples = _tokens(single, prompts, seeded)
    del single
    llm = LLM(directory, tensor_parallel_size=size, **options)
    try:
        assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.max_size == 16
        assert _tokens(llm, prompts, GREEDY) == expected
        assert _tokens(llm, prompts[:9], GREEDY) == expected[:9]
        assert _tokens(llm, prompts, seeded) == reference_samples
    finally:
        llm.close()
    assert not multiprocessing.active_children()


def _hf_logprobs(directory: str, sequences: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Hugging Face's log-probability of each next token of each sequence (float32 log-softmax of its logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).cuda()
    scores = []
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence], device="cuda")
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            scores.append(logprobs.gather(1, ids[0, 1:, None])[:, 0].cpu())
    del model
    torch.cuda.empty_cache()
    return scores


def _engine_logprobs(llm: LLM, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The engine's prompt logprobs of each next token of each sequence."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate(sequences, params, use_tqdm=False)
    return [torch.tensor([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], sequence[1:])])
            for out, sequence in zip(outputs, sequences)]


def test_bf16_tp2_logprob_error_within_twice_pytorch_bf16(checkpoint):
    _needs_gpus(2)
    directory, prompts, expected = checkpoint
    sequences = [prompt + continuation for prompt, continuation in zip(prompts, expected)]
    reference = torch.cat(_hf_logprobs(directory, sequences, torch.float32))
    torch_bf16 = torch.cat(_hf_logprobs(directory, sequences, torch.bfloat16))
    options = dict(dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.5, enable_prefix_caching=False)
    single = LLM(directory, **options)
    single_bf16 = torch.cat(_engine_logprobs(single, sequences))
    del single
    llm = LLM(directory, tensor_parallel_size=2, **options)
    try:
        split_bf16 = torch.cat(_engine_logprobs(llm, sequences))
    finally:
        llm.close()
    errors = {name: (scores - reference).abs() for name, scores in
              (("torch bf16", torch_bf16), ("TP 1 bf16", single_bf16), ("TP 2 bf16", split_bf16))}
    print(f"|logprob - fp32| over {reference.numel()} positions: " + ", ".join(
        f"{name} mean {error.mean():.3g} max {error.max():.3g}" for name, error in errors.items()))
    assert errors["TP 2 bf16"].mean() <= 2 * errors["torch bf16"].mean()


def test_more_ranks_than_gpus_is_a_value_error(checkpoint):
    directory = checkpoint[0]
    size = torch.cuda.device_count() + 1
    with pytest.raises(ValueError, match="tensor_parallel_size .* is larger than the number of GPUs"):
        LLM(directory, tensor_parallel_size=size)
    assert not multiprocessing.active_children()


DEAD_WORKER_SCRIPT = """
import os, signal, sys
from flashserve import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=256, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([[1, 2, 3]], params, use_tqdm=False)
    worker = llm.engine.parallel.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    try:
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    except Exception as error:
        print("RAISED", type(error).__name__, flush=True)
    os._exit(0)  # only the error is under test, not the teardown of an aborted group
"""


def test_a_dead_worker_is_an_error_not_a_hang(checkpoint):
    """NCCL does not notice a dead peer by itself: rank 0's watcher aborts the group (run in a subprocess with a
    time limit, so that a regression fails instead of hanging the suite)."""
    import subprocess
    import sys

    _needs_gpus(2)
    if "Llama" not in checkpoint[0]:
        pytest.skip("one architecture is enough")
    result = subprocess.run([sys.executable, "-c", DEAD_WORKER_SCRIPT, checkpoint[0]], capture_output=True,
                            text=True, timeout=300)
    assert "RAISED" in result.stdout, result.stderr[-3000:]


ONE_RANK_GRAPH_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from flashserve.distributed.launch import free_port
from flashserve.distributed.state import _all_gather_single

dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1,
                        device_id=torch.device("cuda:0"))
torch.cuda.set_device(0)
x = torch.zeros(4096, device="cuda")
gathered = torch.zeros(4096, device="cuda")
arena = torch.zeros(1024, dtype=torch.uint8, device="cuda")
dist.all_reduce(x)
_all_gather_single(gathered, x)
dist.broadcast(arena, src=0)
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    y = x * 2
    dist.all_reduce(y)
    _all_gather_single(gathered, y)
    dist.broadcast(arena, src=0)
for step in range(20):
    x.copy_(torch.randn(4096, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    if not (torch.equal(y, x * 2) and torch.equal(gathered, x * 2)):
        sys.exit(f"replay {step} is wrong")
dist.destroy_process_group()
print("OK", flush=True)
"""


def test_nccl_collectives_replay_from_cuda_graphs_on_one_rank():
    """What one GPU can check of TP under graphs: the three collectives the engine captures (the layers'
    all-reduce and all-gather, the arena broadcast) captured in a CUDA graph on an NCCL group of one rank replay
    with fresh inputs (a subprocess: the group must not outlive the test)."""
    import subprocess
    import sys

    _needs_gpus(1)
    result = subprocess.run([sys.executable, "-c", ONE_RANK_GRAPH_SCRIPT], capture_output=True, text=True,
                            timeout=120)
    assert "OK" in result.stdout, result.stderr[-3000:]
