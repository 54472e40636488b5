"""Cascade attention: the kernel composition against the plain paged decode, the planner's shared-prefix search,
and the engine's greedy outputs with cascade on and off over prompts that share cached blocks (CPU; a GPU test at
real sizes)."""
import random
from types import SimpleNamespace

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.engine import cascade
from flashserve.kernels import paged_attention
from flashserve.kernels.cascade import cascade_decode
from flashserve.models import attention as attention_module
from flashserve.models.checkpoint import write_random_checkpoint


def check_cascade(batch, heads, heads_k, head_dim, block_size, prefix_blocks, max_suffix, dtype, device="cpu"):
    """cascade_decode over a table whose rows share their first ``prefix_blocks`` blocks == the plain decode."""
    generator = torch.Generator().manual_seed(0)
    width = prefix_blocks + -(-max_suffix // block_size) + 1
    num_blocks = prefix_blocks + batch * (width - prefix_blocks) + 3
    k_cache = torch.randn(num_blocks, block_size, heads_k, head_dim, generator=generator).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, heads_k, head_dim, generator=generator).to(dtype).to(device)
    own = torch.randperm(num_blocks - prefix_blocks, generator=generator)[:batch * (width - prefix_blocks)]
    table = torch.cat([torch.arange(prefix_blocks).expand(batch, -1),
                       (own + prefix_blocks).view(batch, -1)], dim=1).to(torch.int32).to(device)
    suffix = torch.randint(1, max_suffix + 1, (batch,), generator=generator).to(torch.int32).to(device)
    prefix_len = prefix_blocks * block_size
    q = torch.randn(batch, heads, head_dim, generator=generator).to(dtype).to(device)
    scale = head_dim ** -0.5
    expected = paged_attention.decode(q, k_cache, v_cache, suffix + prefix_len, table, scale)
    got = cascade_decode(q, k_cache, v_cache, table, suffix + prefix_len,
                         torch.full((1,), prefix_len, dtype=torch.int32, device=device), scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cascade_matches_plain_decode(dtype):
    check_cascade(batch=5, heads=4, heads_k=2, head_dim=32, block_size=16, prefix_blocks=3, max_suffix=40,
                  dtype=dtype)


def test_cascade_reference_path(monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    check_cascade(batch=3, heads=2, heads_k=1, head_dim=16, block_size=4, prefix_blocks=5, max_suffix=9,
                  dtype=torch.float32)


def _request(block_ids, num_computed_tokens):
    return SimpleNamespace(block_ids=list(block_ids), num_computed_tokens=num_computed_tokens)


def test_shared_prefix_blocks():
    shared = [_request([7, 8, 9, 10, 11 + i], 20) for i in range(4)]
    assert cascade.shared_prefix_blocks(shared, 4) == 4
    assert cascade.shared_prefix_blocks(shared, 4, min_blocks=5) == 0
    diverging = shared + [_request([7, 8, 3, 10, 99], 20)]
    assert cascade.shared_prefix_blocks(diverging, 4) == 2
    assert cascade.shared_prefix_blocks(diverging, 4, min_blocks=3) == 0  # block 2 differs: rejected at once
    short = shared + [_request([7, 8, 9, 10, 50], 13)]  # its current token (position 13) is in block 3
    assert cascade.shared_prefix_blocks(short, 4) == 3
    assert cascade.shared_prefix_blocks([_request([1, 2], 8), _request([5, 2], 8)], 4) == 0
    assert cascade.shared_prefix_blocks([_request([1, 2, 3], 12), _request([1], 3)], 4, min_blocks=3) == 0


def test_plan_thresholds(monkeypatch):
    monkeypatch.setattr(cascade, "MIN_REQUESTS", 3)
    monkeypatch.setattr(cascade, "MIN_PREFIX_TOKENS", 12)
    monkeypatch.setattr(cascade, "MIN_SAVED_KEY_READS", 24)
    requests = [_request([1, 2, 3, 4 + i], 16) for i in range(3)]
    assert cascade.plan(requests, 4) == 3  # 2 x 12 key reads saved
    assert cascade.plan(requests[:2], 4) == 0  # too few requests
    assert cascade.plan(requests, 2) == 0  # 3 blocks of 2 tokens: prefix too short
    monkeypatch.setattr(cascade, "MIN_SAVED_KEY_READS", 25)
    assert cascade.plan(requests, 4) == 0  # saves too little


def _greedy(llm, prompts, tokens=5):
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    return [output.outputs[0].token_ids for output in llm.generate(prompts, params, use_tqdm=False)]


def check_engine_outputs(directory: str, device: str, monkeypatch) -> None:
    """Prompts sharing 34 cached tokens decode with cascade attention (it runs) and give the same greedy tokens as
    with it switched off."""
    monkeypatch.setattr(cascade, "MIN_REQUESTS", 2)
    monkeypatch.setattr(cascade, "MIN_PREFIX_TOKENS", 16)
    monkeypatch.setattr(cascade, "MIN_SAVED_KEY_READS", 0)
    calls = []
    original = attention_module.cascade_decode
    monkeypatch.setattr(attention_module, "cascade_decode", lambda *args: calls.append(1) or original(*args))
    rng = random.Random(0)
    prefix = [rng.randrange(6, 300) for _ in range(34)]
    prompts = [prefix + [rng.randrange(6, 300) for _ in range(n)] for n in (1, 3, 6, 2)]
    outputs = {}
    for enabled in ("1", "0"):
        monkeypatch.setenv("FLASHSERVE_CASCADE_ATTENTION", enabled)
        llm = LLM(directory, dtype="float32", device=device, block_size=8, enable_prefix_caching=True,
                  max_model_len=128, num_kv_blocks=512)  # a sized pool: not 90% of a GPU shared by parallel tests
        _greedy(llm, [prefix + [5]], tokens=1)  # caches the prefix's blocks: the batch below shares them
        outputs[enabled] = _greedy(llm, prompts)
        if enabled == "1":
            assert calls, "cascade attention never ran"
        del llm
    assert outputs["1"] == outputs["0"]


def test_engine_greedy_outputs_identical(tmp_path, monkeypatch):
    """On the PyTorch reference attention, for speed (the kernels are tested above)."""
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    check_engine_outputs(write_random_checkpoint(str(tmp_path / "llama"), "LlamaForCausalLM", seed=3), "cpu",
                         monkeypatch)


@pytest.mark.gpu
def test_engine_greedy_outputs_identical_gpu(tmp_path, monkeypatch):
    """With CUDA graphs: cascade steps replay their own graphs, the others the plain ones."""
    check_engine_outputs(write_random_checkpoint(str(tmp_path / "llama"), "LlamaForCausalLM", seed=3), "cuda",
                         monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cascade_gpu(dtype):
    check_cascade(batch=64, heads=16, heads_k=8, head_dim=128, block_size=16, prefix_blocks=250, max_suffix=300,
                  dtype=dtype, device="cuda")
    check_cascade(batch=9, heads=32, heads_k=8, head_dim=128, block_size=16, prefix_blocks=20, max_suffix=17,
                  dtype=dtype, device="cuda")


def test_warm_up_cascade_runs_every_variant(tmp_path, monkeypatch):
    """The start-up pass (GPU only in the engine) on a CPU runner: it runs and writes nothing into the cache."""
    from flashserve.engine import warmup

    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    monkeypatch.setattr(cascade, "MIN_PREFIX_TOKENS", 16)
    directory = write_random_checkpoint(str(tmp_path / "llama"), "LlamaForCausalLM", seed=3)
    llm = LLM(directory, dtype="float32", device="cpu", block_size=8, max_model_len=64, max_num_seqs=12)
    runner = llm.engine.runner
    before = runner.kv_cache.clone()
    assert warmup.warm_up_cascade(runner, range(1, 13), show_progress=False) >= 1
    assert torch.equal(runner.kv_cache, before)
