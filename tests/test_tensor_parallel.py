"""Tensor parallelism on the CPU (gloo): greedy parity with Hugging Face at TP 2 and 4, and equality with TP 1.

Each architecture gets one tiny checkpoint chosen to hit a case of the split: Llama with tied embeddings, q/k/v,
o and MLP biases (the row-parallel biases are added once), a vocabulary of 401 (not divisible by the ranks: padded
to 512), 2 KV heads (fewer than 4 ranks: replicated) and a sharded checkpoint; Qwen2 with q/k/v biases; Qwen3 with
its per-head q/k norms and a single KV head; Mistral with a sliding window shorter than the prompts; the
mixture-of-experts checkpoints of ``moe_cases`` (Qwen3-MoE with a dense layer among the sparse ones, Mixtral,
Qwen2-MoE with its shared expert), whose experts split along their intermediate dimension. Every engine runs
with blocks of 4 tokens, a 16-token step budget (chunked prefill), a pool small enough to preempt, and prefix
caching (a rerun hits the cache); besides the greedy tokens it samples with seeds, and scores prompt
logprobs, all of which must equal the single-process engine's (logprobs to 1e-4). The attention runs on the
PyTorch reference (the split is in the linear layers; the kernels are tested elsewhere).

The spawned workers are separate processes (each imports torch): about 5 s per TP-2 engine and 15 s per TP-4
engine on two cores, so each (architecture, size) starts one engine and checks everything on it.
"""
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from flashserve import LLM, SamplingParams
from flashserve.cli import main as cli_main
from hf_parity import checkpoint_with_continuations
from http_helpers import wait_until_healthy
from moe_cases import MOE_CASES, write_stacked_copy

MODELS = {
    "llama-tied-biases-vocab401-sharded": ("LlamaForCausalLM", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, vocab_size=401, max_shard_size="40KB")),
    "qwen2-biases": ("Qwen2ForCausalLM", {}),
    "qwen3-qk-norm-1kv": ("Qwen3ForCausalLM", dict(num_key_value_heads=1)),
    "mistral-window8": ("MistralForCausalLM", dict(sliding_window=8)),
    **MOE_CASES,
}
NEW_TOKENS = 6
ENGINE = dict(dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=16, num_kv_blocks=16,
              enable_prefix_caching=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _prompts(vocab_size: int) -> list[list[int]]:
    """Prompts of 1 to 40 tokens; the 16-, 37- and 40-token ones share their first blocks."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(6, vocab_size) for _ in range(n)]
    base = draw(32)
    return [draw(1), draw(7), base[:16], base + draw(5), base + draw(8)]


@pytest.fixture(scope="module", autouse=True)
def reference_attention():
    """The PyTorch reference attention in this process and in the workers it spawns (they inherit os.environ)."""
    previous = os.environ.get("FLASHSERVE_ATTENTION_BACKEND")
    os.environ["FLASHSERVE_ATTENTION_BACKEND"] = "torch"
    yield
    if previous is None:
        del os.environ["FLASHSERVE_ATTENTION_BACKEND"]
    else:
        os.environ["FLASHSERVE_ATTENTION_BACKEND"] = previous


def _checkpoint(tmp_path_factory, key: str):
    architecture, overrides = MODELS[key]
    overrides = dict(overrides)
    shard = overrides.pop("max_shard_size", None)
    directory = str(tmp_path_factory.mktemp(key))
    if shard is None:
        return checkpoint_with_continuations(directory, architecture, overrides, 3, _prompts, NEW_TOKENS)
    from flashserve.models.checkpoint import write_random_checkpoint
    from transformers import AutoModelForCausalLM
    import torch

    write_random_checkpoint(directory, architecture, seed=3, max_shard_size=shard, **overrides)
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompts = _prompts(model.config.vocab_size)
    with torch.no_grad():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    return directory, prompts, expected


def _run(llm: LLM, prompts: list[list[int]]) -> dict:
    """Everything the parity tests compare, from one engine."""
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    hits_before = llm.prefix_cache_stats()["hit_tokens"]
    rerun = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, seed=10 + i, max_tokens=NEW_TOKENS, ignore_eos=True)
              for i in range(len(prompts))]
    sampled = [o.outputs[0].token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)]
    scored = llm.generate(prompts[3], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, logprobs=2),
                          use_tqdm=False)[0]
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.requests
    return dict(greedy=first, rerun=rerun, rerun_hits=llm.prefix_cache_stats()["hit_tokens"] - hits_before,
                preemptions=engine.scheduler.num_preemptions, sampled=sampled,
                prompt_logprobs=[{t: lp.logprob for t, lp in entry.items()} for entry in scored.prompt_logprobs[1:]],
                logprobs=[{t: lp.logprob for t, lp in entry.items()} for entry in scored.outputs[0].logprobs])


@pytest.fixture(scope="module", params=list(MODELS))
def results(request, tmp_path_factory):
    """(HF greedy continuations, {tensor_parallel_size: _run's results}) of one checkpoint."""
    directory, prompts, expected = _checkpoint(tmp_path_factory, request.param)
    by_size = {}
    for size in (1, 2, 4):
        llm = LLM(directory, tensor_parallel_size=size, **ENGINE)
        try:
            by_size[size] = _run(llm, prompts)
        finally:
            llm.close()
    assert not multiprocessing.active_children()  # every worker has exited
    return expected, by_size


@pytest.mark.parametrize("size", [2, 4])
def test_greedy_parity_with_hf_and_tp1(results, size):
    expected, by_size = results
    assert by_size[1]["greedy"] == expected
    run = by_size[size]
    assert run["greedy"] == expected
    assert run["rerun"] == expected
    assert run["rerun_hits"] > 0 and run["rerun_hits"] == by_size[1]["rerun_hits"]
    assert run["preemptions"] > 0 and run["preemptions"] == by_size[1]["preemptions"]


@pytest.mark.parametrize("size", [2, 4])
def test_seeded_sampling_and_logprobs_equal_tp1(results, size):
    _, by_size = results
    run, single = by_size[size], by_size[1]
    assert run["sampled"] == single["sampled"]
    for name in ("prompt_logprobs", "logprobs"):
        assert len(run[name]) == len(single[name]) > 0
        for ours, theirs in zip(run[name], single[name]):
            assert ours.keys() == theirs.keys()
            assert all(abs(ours[t] - theirs[t]) < 1e-4 for t in ours)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from flashserve.models.checkpoint import write_random_checkpoint

    return write_random_checkpoint(str(tmp_path_factory.mktemp("tp-llama")), "LlamaForCausalLM", seed=5)


def _config_only(tmp_path, llama_dir: str, **overrides) -> str:
    """A directory with llama_dir's config.json changed by ``overrides`` (no weights: the split is checked first)."""
    with open(os.path.join(llama_dir, "config.json")) as f:
        config = json.load(f)
    config.update(overrides)
    directory = tmp_path / "_".join(overrides)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.mark.parametrize("overrides, size, field", [
    (dict(num_attention_heads=6, num_key_value_heads=6, head_dim=16), 4, "num_attention_heads"),
    (dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16), 2, "num_key_value_heads"),
    (dict(num_attention_heads=12, num_key_value_heads=4, head_dim=8), 6, "num_key_value_heads"),
    (dict(intermediate_size=130), 4, "intermediate_size"),
    (dict(architectures=["Qwen3MoeForCausalLM"], num_experts=4, num_experts_per_tok=2, moe_intermediate_size=50),
     4, "moe_intermediate_size"),
    (dict(architectures=["Qwen2MoeForCausalLM"], num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          shared_expert_intermediate_size=90), 4, "shared_expert_intermediate_size"),
    (dict(architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2, intermediate_size=66),
     4, "intermediate_size"),
])
def test_unsplittable_model_raises_before_any_worker(tmp_path, llama_dir, overrides, size, field):
    directory = _config_only(tmp_path, llama_dir, **overrides)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=field):
        LLM(directory, tokenizer=llama_dir, device="cpu", tensor_parallel_size=size)
    assert time.perf_counter() - start < 5
    assert not multiprocessing.active_children()


def test_dense_intermediate_size_of_an_all_sparse_model_is_not_split():
    """Qwen3-MoE without dense layers never builds the ``intermediate_size`` MLP: only the experts' size counts."""
    from flashserve.distributed.checks import check_split
    from flashserve.models import ModelSpec

    config = dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=64, intermediate_size=130, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=100, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32)
    check_split(ModelSpec.from_config(config), 4)
    with pytest.raises(ValueError, match="intermediate_size"):
        check_split(ModelSpec.from_config(dict(config, mlp_only_layers=[0])), 4)


def test_invalid_tensor_parallel_size(llama_dir):
    for value in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            LLM(llama_dir, device="cpu", tensor_parallel_size=value)


def test_two_engines_in_a_row_and_the_cli(llama_dir, capsys, monkeypatch):
    """Also: one broadcast per step (and one at shutdown); MASTER_PORT chooses the rendezvous port."""
    import flashserve.engine.model_runner as model_runner
    from flashserve.distributed.launch import free_port

    prompts = [[7, 8, 9], [10, 11, 12, 13, 14]]
    expected = [o.outputs[0].token_ids for o in LLM(llama_dir, device="cpu").generate(prompts, GREEDY, use_tqdm=False)]
    broadcasts = []
    broadcast = model_runner.broadcast_from_driver
    monkeypatch.setattr(model_runner, "broadcast_from_driver", lambda x: (broadcasts.append(1), broadcast(x)))
    first = LLM(llama_dir, device="cpu", tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in first.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert len(broadcasts) == first.engine.stats.num_steps
    workers = list(first.engine.parallel.workers)
    del first  # garbage collection stops the workers
    assert all(not process.is_alive() for process in workers)
    assert len(broadcasts) == NEW_TOKENS + 1
    port = free_port("127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    second = LLM(llama_dir, device="cpu", tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in second.generate(prompts, GREEDY, use_tqdm=False)] == expected
    with pytest.raises(OSError), socket.socket() as probe:  # rank 0's rendezvous store listens there
        probe.bind(("127.0.0.1", port))
    second.close()
    second.close()
    with pytest.raises(RuntimeError, match="closed"):
        second.generate(prompts, GREEDY, use_tqdm=False)
    assert not multiprocessing.active_children()
    capsys.readouterr()
    assert cli_main(["generate", "--model", llama_dir, "--device", "cpu", "-tp", "2", "--max-tokens", "3",
                     "--temperature", "0", "Hello"]) == 0
    assert "Completion:" in capsys.readouterr().out
    assert not multiprocessing.active_children()


PARENT_SCRIPT = """
import os, sys
from flashserve import LLM
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
print(" ".join(str(p.pid) for p in llm.engine.parallel.workers), flush=True)
os.kill(os.getpid(), 9)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_workers_exit_when_the_parent_is_killed(llama_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", PARENT_SCRIPT, llama_dir], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 1
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


TORCHRUN_SCRIPT = """
import json, os, sys
from flashserve import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
first = [o.outputs[0].token_ids for o in llm.generate([[7, 8, 9], [10, 11, 12, 13]], params, use_tqdm=False)]
second = [o.outputs[0].token_ids for o in llm.generate([[20, 21]], params, use_tqdm=False)]
print("RESULT", os.environ["RANK"], json.dumps([first, second]), flush=True)
"""


def test_torchrun_two_nodes_on_one_machine(llama_dir, tmp_path):
    from flashserve.distributed.launch import free_port

    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    port = free_port("127.0.0.1")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                               str(port), str(script), llama_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for node in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    results = {}
    for out, _ in outputs:
        for line in out.splitlines():
            if line.startswith("RESULT "):
                _, rank, payload = line.split(" ", 2)
                results[int(rank)] = json.loads(payload)
    assert results[1] == [[], []]  # the other ranks return empty lists
    single = LLM(llama_dir, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = [[o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
                for prompts in ([[7, 8, 9], [10, 11, 12, 13]], [[20, 21]])]
    assert results[0] == expected


def test_each_rank_loads_only_its_slices(llama_dir):
    """Build every rank's shard in this process (loading runs no collective) and put the slices back together."""
    import torch
    from safetensors.torch import load_file

    from flashserve.distributed.state import set_tp_group
    from flashserve.models.loader import load_model

    full = load_file(os.path.join(llama_dir, "model.safetensors"))
    size, shards = 4, []
    try:
        for rank in range(size):
            set_tp_group(rank, size)
            shards.append(load_model(llama_dir, "float32", "cpu")[0])
    finally:
        set_tp_group(0, 1)
    whole = sum(t.numel() for t in full.values())
    norms = sum(t.numel() for name, t in full.items() if "norm" in name)
    for shard in shards:  # 1/4 of every split tensor (and its padding), the norms whole
        held = sum(p.numel() for p in shard.parameters())
        assert held - norms < (whole - norms) / size * 1.3
    layer = "model.layers.0."
    q_rows = [shard.model.layers[0].self_attn.qkv_proj.weight[:16 * 1] for shard in shards]  # 1 head of 16 each
    assert torch.equal(torch.cat(q_rows), full[layer + "self_attn.q_proj.weight"])
    k_rows = [shard.model.layers[0].self_attn.qkv_proj.weight[16:32] for shard in shards]  # 2 KV heads, 4 ranks
    k_full = full[layer + "self_attn.k_proj.weight"]
    assert all(torch.equal(k, k_full[(rank // 2) * 16:(rank // 2 + 1) * 16]) for rank, k in enumerate(k_rows))
    down = torch.cat([shard.model.layers[0].mlp.down_proj.weight for shard in shards], dim=1)
    assert torch.equal(down, full[layer + "mlp.down_proj.weight"])
    embed = torch.cat([shard.model.embed_tokens.weight for shard in shards])
    vocab = full["model.embed_tokens.weight"].shape[0]
    assert embed.shape[0] % (64 * size) == 0 and torch.equal(embed[:vocab], full["model.embed_tokens.weight"])
    assert not embed[vocab:].any()


def test_each_rank_loads_only_its_expert_slices(tmp_path):
    """Qwen2-MoE at TP 4: each rank holds a quarter of every expert's gate/up rows and down columns and of the
    shared expert; the router and the shared expert's gate are whole. Put back together: the checkpoint's tensors."""
    import torch
    from safetensors.torch import load_file

    from flashserve.distributed.state import set_tp_group
    from flashserve.models.checkpoint import write_random_checkpoint
    from flashserve.models.loader import load_model

    architecture, overrides = MOE_CASES["qwen2-moe"]
    directory = write_random_checkpoint(str(tmp_path), architecture, seed=3, **overrides)
    full = load_file(os.path.join(directory, "model.safetensors"))
    size, blocks = 4, []
    try:
        for rank in range(size):
            set_tp_group(rank, size)
            model, spec = load_model(directory, "float32", "cpu")
            blocks.append(model.model.layers[1].mlp)  # decoder_sparse_step 2: layer 1 is sparse
    finally:
        set_tp_group(0, 1)
    prefix, local = "model.layers.1.mlp.", spec.moe.expert_intermediate_size // size
    assert blocks[0].experts.gate_up_proj.shape == (spec.moe.num_experts, 2 * local, spec.hidden_size)
    for expert in range(spec.moe.num_experts):
        name = f"{prefix}experts.{expert}."
        gate_up = [block.experts.gate_up_proj[expert] for block in blocks]
        assert torch.equal(torch.cat([rows[:local] for rows in gate_up]), full[name + "gate_proj.weight"])
        assert torch.equal(torch.cat([rows[local:] for rows in gate_up]), full[name + "up_proj.weight"])
        down = torch.cat([block.experts.down_proj[expert] for block in blocks], dim=1)
        assert torch.equal(down, full[name + "down_proj.weight"])
    shared_down = torch.cat([block.shared_expert.down_proj.weight for block in blocks], dim=1)
    assert torch.equal(shared_down, full[prefix + "shared_expert.down_proj.weight"])
    for block in blocks:
        assert torch.equal(block.gate.weight, full[prefix + "gate.weight"])
        assert torch.equal(block.shared_expert_gate.weight, full[prefix + "shared_expert_gate.weight"])


def test_stacked_expert_checkpoint_at_tp2(tmp_path_factory):
    """Qwen3-MoE with each layer's experts saved as two stacked tensors, at TP 2 (each rank reads its slices of
    them): greedy tokens equal Hugging Face's on the per-expert layout, prompt logprobs the per-expert TP-1
    engine's."""
    architecture, overrides = MODELS["qwen3-moe"]
    source, prompts, expected = checkpoint_with_continuations(str(tmp_path_factory.mktemp("per-expert")),
                                                              architecture, overrides, 3, _prompts, NEW_TOKENS)
    stacked = write_stacked_copy(source, str(tmp_path_factory.mktemp("stacked")))
    scoring = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)

    def run(directory: str, size: int):
        llm = LLM(directory, tensor_parallel_size=size, **ENGINE)
        try:
            greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            scored = llm.generate(prompts[3], scoring, use_tqdm=False)[0].prompt_logprobs[1:]
        finally:
            llm.close()
        return greedy, [{t: lp.logprob for t, lp in entry.items()} for entry in scored]

    greedy, logprobs = run(stacked, 2)
    _, single = run(source, 1)
    assert greedy == expected
    assert [entry.keys() for entry in logprobs] == [entry.keys() for entry in single]
    assert all(abs(ours[t] - theirs[t]) < 1e-4 for ours, theirs in zip(logprobs, single) for t in ours)
    assert not multiprocessing.active_children()


def test_moe_block_partial_sums_add_up_with_one_all_reduce(tmp_path, monkeypatch):
    """Qwen2-MoE's block on each of 4 ranks, built in this process with the all-reduce counted (and left out):
    the ranks' partial outputs (routed and shared experts) sum to the single-rank block's output, and each block
    all-reduces exactly once (the shared expert's down projection does not reduce by itself)."""
    import torch

    import flashserve.distributed.layers as parallel_layers
    import flashserve.models.moe as moe_module
    from flashserve.distributed.state import set_tp_group
    from flashserve.models.checkpoint import write_random_checkpoint
    from flashserve.models.loader import load_model

    architecture, overrides = MOE_CASES["qwen2-moe"]
    directory = write_random_checkpoint(str(tmp_path), architecture, seed=4, **overrides)
    reductions = []
    monkeypatch.setattr(moe_module, "all_reduce", lambda x: (reductions.append("moe"), x)[1])
    monkeypatch.setattr(parallel_layers, "all_reduce", lambda x: (reductions.append("row"), x)[1])
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    size, partials = 4, []
    try:
        for rank in range(size):
            set_tp_group(rank, size)
            block = load_model(directory, "float32", "cpu")[0].model.layers[1].mlp
            reductions.clear()
            partials.append(block(x))
            assert reductions == ["moe"]
    finally:
        set_tp_group(0, 1)
    whole = load_model(directory, "float32", "cpu")[0].model.layers[1].mlp(x)
    torch.testing.assert_close(sum(partials), whole, rtol=1e-5, atol=1e-5)


def test_serve_with_two_ranks(llama_dir):
    """``flashserve serve -tp 2``: greedy completions equal to one rank's; SIGTERM ends the server and its worker."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from flashserve.distributed.launch import free_port

    port = free_port("127.0.0.1")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "flashserve", "serve", llama_dir, "--port", str(port), "--device", "cpu",
               "-tp", "2", "--uvicorn-log-level", "warning"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(httpx, base_url)
        response = httpx.post(base_url + "/v1/completions", timeout=60, json={
            "prompt": [[7, 8, 9], [10, 11, 12, 13]], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        texts = [choice["text"] for choice in response.json()["choices"]]
        children = subprocess.run(["ps", "-ww", "--ppid", str(process.pid), "-o", "pid=,args="], capture_output=True,
                                  text=True).stdout
        workers = [int(line.split()[0]) for line in children.splitlines() if "spawn_main" in line]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM) and "Traceback" not in stderr, stderr
    assert "+ 1 tensor-parallel ranks" in stderr
    single = LLM(llama_dir, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert texts == [o.outputs[0].text for o in single.generate([[7, 8, 9], [10, 11, 12, 13]], params,
                                                                use_tqdm=False)]
    assert len(workers) == 1, children
    deadline = time.monotonic() + 10
    while _alive(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(workers[0])


def test_a_dead_worker_is_an_error_not_a_hang(llama_dir):
    llm = LLM(llama_dir, device="cpu", tensor_parallel_size=2)
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)) == 1
    worker = llm.engine.parallel.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    start = time.perf_counter()
    with pytest.raises(RuntimeError):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    llm.close()
    assert time.perf_counter() - start < 30
    assert not multiprocessing.active_children()


def test_row_parallel_residual_follows_the_all_reduce(monkeypatch):
    """Under tp > 1 a row-parallel layer adds the residual once, after the all-reduce, and says its product's launch
    does not (so the decoder leaves the add to the next fused add + RMSNorm); a norm or a partial-sum layer refuse
    the arguments they cannot honour. With one rank the add is the product's (``linear``'s)."""
    import torch

    from flashserve.distributed import layers as parallel_layers
    from flashserve.distributed.state import set_tp_group

    reductions = []
    monkeypatch.setattr(parallel_layers, "all_reduce", lambda x: (reductions.append(x.clone()), x * 2)[1])
    x, residual = torch.randn(3, 4), torch.randn(3, 6)
    try:
        set_tp_group(0, 2)
        layer = parallel_layers.RowParallelLinear(8, 6, False)
        layer.weight.data.copy_(torch.randn(6, 4))
        assert not layer.adds_residual(3)
        torch.testing.assert_close(layer(x, residual=residual), 2 * (x @ layer.weight.T) + residual)
        torch.testing.assert_close(reductions[0], x @ layer.weight.T)
        with pytest.raises(ValueError, match="norm must be None"):
            layer(x, norm=object())
        partial = parallel_layers.RowParallelLinear(8, 6, False, reduce_results=False)
        with pytest.raises(ValueError, match="residual needs reduce_results"):
            partial(x, residual=residual)
    finally:
        set_tp_group(0, 1)
    layer = parallel_layers.RowParallelLinear(4, 6, False)
    layer.weight.data.copy_(torch.randn(6, 4))
    torch.testing.assert_close(layer(x, residual=residual), x @ layer.weight.T + residual)
