"""Greedy parity with Hugging Face transformers for every architecture, across the engine's batching features.

Each architecture gets one tiny random-weight checkpoint; the reference continuation of every prompt comes from
``transformers``' ``generate(do_sample=False)`` with EOS disabled. Our ``generate(temperature=0, ignore_eos=True)``
must give the same token ids with prefix caching on and off, on a rerun that hits the cache, with a tiny token
budget (chunked prefill), with a pool small enough to force preemption, and with block sizes 1 and 16.

The engine logic does not depend on the attention backend, and Triton's CPU interpreter is slow, so these tests
run on the PyTorch reference attention; one test per architecture (chunked prefill with preemption) runs on
whatever backend the environment selects — the Triton kernels under ``TRITON_INTERPRET=1`` in CI.
"""
import random

import pytest

from flashserve import LLM, SamplingParams
from hf_parity import checkpoint_with_continuations
from moe_cases import MOE_CASES

# (architecture, config overrides): Mistral also with a sliding window shorter than the prompts.
ARCHITECTURES = [("LlamaForCausalLM", {}), ("Qwen2ForCausalLM", {}), ("Qwen3ForCausalLM", {}),
                 ("MistralForCausalLM", {}), ("MistralForCausalLM", {"sliding_window": 8}), *MOE_CASES.values()]
NEW_TOKENS = 6


def _prompts(vocab_size: int) -> list[list[int]]:
    """Prompts of 1 to 40 tokens; the 16-, 37- and 40-token ones share their first full blocks."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(6, vocab_size) for _ in range(n)]
    base = draw(32)
    return [draw(1), draw(7), base[:16], base + draw(5), base + draw(8)]


@pytest.fixture(scope="module", params=ARCHITECTURES,
                ids=[arch + "".join(f"-{k}{v}" for k, v in overrides.items()) for arch, overrides in ARCHITECTURES])
def checkpoint(request, tmp_path_factory):
    """(directory, prompts, Hugging Face greedy continuations) for one architecture."""
    architecture, overrides = request.param
    return checkpoint_with_continuations(str(tmp_path_factory.mktemp(architecture)), architecture, overrides, 1,
                                         _prompts, NEW_TOKENS)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture
def reference_attention(monkeypatch):
    """Run the attention through the PyTorch reference (see the module docstring)."""
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")


def _assert_no_leaks(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert not llm.engine.requests


def test_parity_prefix_caching_and_rerun(checkpoint, reference_attention):
    directory, prompts, expected = checkpoint
    llm = LLM(directory, dtype="float32", device="cpu", block_size=16, enable_prefix_caching=True)
    assert _generate(llm, prompts) == expected
    first = llm.prefix_cache_stats()
    assert first["hit_tokens"] == 16 + 32  # the 37- and 40-token prompts reuse the blocks of the earlier ones
    assert _generate(llm, prompts) == expected
    second = llm.prefix_cache_stats()
    assert second["hit_tokens"] - first["hit_tokens"] == 32 + 32  # a fully cached prompt recomputes its last block
    _assert_no_leaks(llm)


def test_parity_without_prefix_caching_block_size_1(checkpoint, reference_attention):
    directory, prompts, expected = checkpoint
    llm = LLM(directory, dtype="float32", device="cpu", block_size=1, enable_prefix_caching=False)
    assert _generate(llm, prompts) == expected
    assert llm.prefix_cache_stats()["hit_tokens"] == 0
    _assert_no_leaks(llm)


def test_parity_chunked_prefill_and_preemption(checkpoint, reference_attention):
    _check_chunked_prefill_and_preemption(*checkpoint)


def test_parity_through_selected_kernels(checkpoint):
    """Chunked prefill + preemption with the environment's attention backend (the Triton kernels in CI)."""
    directory, prompts, expected = checkpoint
    _check_chunked_prefill_and_preemption(directory, prompts, expected)


def _check_chunked_prefill_and_preemption(directory, prompts, expected):
    llm = LLM(directory, dtype="float32", device="cpu", block_size=4, num_kv_blocks=13,
              max_num_batched_tokens=7, enable_prefix_caching=True)
    assert _generate(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_no_leaks(llm)


@pytest.mark.gpu
def test_parity_on_gpu_float32_and_bfloat16_runs(checkpoint):
    """On CUDA: float32 greedy parity through the Triton kernels, and a bfloat16 run that finishes.

    The pools are sized explicitly: GPU tests may run in parallel processes, and a pool sized from free memory
    would take what the others need (the profiled sizing runs in benchmarks/throughput.py).
    """
    directory, prompts, expected = checkpoint
    llm = LLM(directory, dtype="float32", device="cuda", block_size=16, max_num_batched_tokens=24,
              num_kv_blocks=256)
    assert _generate(llm, prompts) == expected
    assert _generate(llm, prompts) == expected
    _assert_no_leaks(llm)
    del llm
    llm = LLM(directory, dtype="bfloat16", device="cuda", block_size=16, num_kv_blocks=256)
    outputs = _generate(llm, prompts)
    assert [len(tokens) for tokens in outputs] == [NEW_TOKENS] * len(prompts)
    _assert_no_leaks(llm)
