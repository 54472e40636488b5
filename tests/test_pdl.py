"""Programmatic dependent launch (``flashserve.kernels.pdl``): when it is on, and that it changes no result.

CPU: the switch (off on the CPU, under the interpreter, with ``FLASHSERVE_PDL=0``, below sm_90 and without Triton's
grid dependency control); the resident GEMM's sm_90 PTX loading its weights before the wait. GPU (sm_90+): chains of skinny-GEMM grid-kernel launches that each read the previous
one's output match torch step by step, eager and replayed in a CUDA graph, bit for bit equal to the same chain
without PDL; a Qwen3-style engine's greedy tokens and logprobs through its decode graphs are the same with
``FLASHSERVE_PDL=0`` and ``=1``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.kernels import pdl, skinny_gemm
from flashserve.kernels.skinny_gemm_plans import GemmConfig
from flashserve.models.checkpoint import write_random_checkpoint


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Every test starts and ends with no decision kept (a test's switches must not leak into the next)."""
    pdl.refresh()
    yield
    pdl.refresh()


@pytest.fixture
def sm90(monkeypatch):
    """A CUDA device of compute capability 9 as far as the switch can tell (no GPU needed)."""
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    monkeypatch.delenv("FLASHSERVE_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device("cuda", 0)


def test_decision_kept_until_refresh(sm90, monkeypatch):
    assert pdl.enabled(sm90) == pdl.HAS_GDC
    monkeypatch.setenv("FLASHSERVE_PDL", "0")
    assert pdl.enabled(sm90) == pdl.HAS_GDC  # kept: one dictionary lookup per launch
    pdl.refresh()
    assert not pdl.enabled(sm90)


def test_on_for_cuda_sm90(sm90):
    assert pdl.enabled(sm90) == pdl.HAS_GDC
    assert pdl.launch_options(True) == {"launch_pdl": True} and pdl.launch_options(False) == {}


def test_off_on_the_cpu(sm90):
    assert not pdl.enabled(torch.device("cpu"))


def test_off_under_the_interpreter(sm90, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pdl.refresh()
    assert not pdl.enabled(sm90)


@pytest.mark.parametrize("value, on", [("0", False), ("1", True), ("", True)])
def test_environment_switch(sm90, monkeypatch, value, on):
    monkeypatch.setenv("FLASHSERVE_PDL", value)
    pdl.refresh()
    assert pdl.enabled(sm90) == (on and pdl.HAS_GDC)


def test_off_below_sm90_and_without_grid_dependency_control(sm90, monkeypatch):
    monkeypatch.setattr(pdl, "HAS_GDC", False)
    assert not pdl.enabled(sm90)
    pdl.refresh()
    monkeypatch.setattr(pdl, "HAS_GDC", True)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: False)
    assert not pdl.enabled(sm90)


def test_resident_kernel_reads_its_weights_before_the_wait_on_sm90():
    """The resident GEMM compiled for sm_90 without a GPU (``benchmarks/compile_pdl.py``, Triton's bundled ptxas, in
    a process without the interpreter): its PTX holds both grid-dependency instructions and issues its weight
    loads before ``griddepcontrol.wait`` — the point of the schedule, which no CPU run can otherwise see."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_pdl.py"
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, str(script), "--rows", "1", "--only", "resident fma n8w4 M1 K2048"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   resident fma n8w4 M1 K2048 +residual" in result.stdout


def test_cpu_kernels_launch_without_pdl(monkeypatch):
    """Under the interpreter the kernels take their PDL=False branch (it never sees gdc_wait)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 64)
    w = torch.randn(40, 64) / 8
    out = skinny_gemm.launch(x, w, None, None, False, GemmConfig(32, 64, 2, 4, 1))
    torch.testing.assert_close(out, x @ w.T, atol=1e-4, rtol=1e-4)


def _needs_pdl():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs a CUDA GPU of compute capability >= 9")


# Grid-kernel configs of the decode shapes: one row by FMAs, tensor cores, split-K (one launch, atomic tickets)
GRID_CONFIGS = [GemmConfig(32, 128, 1, 4, 3, False), GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 4, 4, 4),
                GemmConfig(32, 256, 8, 4, 4), GemmConfig(128, 128, 2, 8, 3)]


def _chain_run(x, weights, gate_up, monkeypatch, value: str):
    """With FLASHSERVE_PDL=value: ``chain()`` runs the grid kernel over ``weights`` (each launch reads the previous
    one's output; every config in turn, the gated product once in the middle), eager and captured in a graph."""
    monkeypatch.setenv("FLASHSERVE_PDL", value)
    pdl.refresh()

    def chain():
        y = x
        for i, w in enumerate(weights):
            config = GRID_CONFIGS[i % len(GRID_CONFIGS)]
            config = config if config.use_dot or y.shape[0] == 1 else GRID_CONFIGS[1]
            y = skinny_gemm.launch(y, w, None, None, False, config)
            if i == len(weights) // 2:
                y = skinny_gemm.launch(y, gate_up, None, y, True, GRID_CONFIGS[2])  # residual: the input itself
        return y

    eager = chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured.clone()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_grid_kernel_chain_with_pdl_gpu(monkeypatch, rows):
    _needs_pdl()
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, 1024, device=device, generator=generator).to(torch.bfloat16)
    weights = [(torch.randn(1024, 1024, device=device, generator=generator) / 32).to(torch.bfloat16)
               for _ in range(8)]
    gate_up = (torch.randn(2048, 1024, device=device, generator=generator) / 32).to(torch.bfloat16)
    monkeypatch.setenv("FLASHSERVE_PDL", "1")
    pdl.refresh()
    assert pdl.enabled(device)
    # the reference, step by step in fp32 with the kernel's roundings (each product rounded to bf16)
    expected = x
    for i, w in enumerate(weights):
        expected = torch.nn.functional.linear(expected.float(), w.float()).to(torch.bfloat16)
        if i == len(weights) // 2:
            both = torch.nn.functional.linear(expected.float(), gate_up.float()).to(torch.bfloat16).float()
            gate, up = both.chunk(2, dim=-1)
            expected = (gate / (1 + torch.exp(-gate)) * up + expected.float()).to(torch.bfloat16)
    with_pdl = _chain_run(x, weights, gate_up, monkeypatch, "1")
    without = _chain_run(x, weights, gate_up, monkeypatch, "0")
    for got in with_pdl:
        torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)
    for got, want in zip(with_pdl, without):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_engine_decode_graphs_same_with_and_without_pdl_gpu(tmp_path, monkeypatch):
    """A Qwen3-style model (q/k norm, tied embeddings) in bf16: every decode step replays a CUDA graph whose
    kernels launch with PDL (norm, GEMMs, q/k norm + rotary + KV write, decode, combine) or without."""
    _needs_pdl()
    monkeypatch.setenv("FLASHSERVE_AUTOTUNE", "0")  # both engines take the same kernel configs
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    directory = write_random_checkpoint(str(tmp_path / "qwen3"), "Qwen3ForCausalLM", seed=0, hidden_size=256,
                                        intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
    prompts = [[7 + (i * 13 + j * 5) % 300 for j in range(5 + 9 * i)] for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)
    results = {}
    for value in ("0", "1"):
        monkeypatch.setenv("FLASHSERVE_PDL", value)
        pdl.refresh()
        assert pdl.enabled(torch.device("cuda")) == (value == "1")
        llm = LLM(directory, dtype="bfloat16", device="cuda", block_size=16, num_kv_blocks=256, max_num_seqs=8)
        assert llm.engine.runner.graphs is not None
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[value] = [(o.outputs[0].token_ids, [{t: p.logprob for t, p in step.items()}
                                                    for step in o.outputs[0].logprobs]) for o in outputs]
        del llm
        torch.cuda.empty_cache()
    assert results["0"] == results["1"]
