"""Model side: our decoder against Hugging Face transformers on tiny random checkpoints, and the loader's rules.

Each architecture runs the way the model runner drives it: a paged KV cache (strided views of one buffer,
scattered block ids), packed prompts, a chunked prefill in two steps, then a decode step, each compared with
transformers' logits at the same positions in fp32.
"""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashserve.context import AttentionContext, set_context
from flashserve.models.layers import Linear, rotary_inverse_frequencies
from moe_cases import MOE_CASES
from flashserve.models import (DecoderForCausalLM, ModelSpec, demo_model_path, load_model, load_spec,
                               write_random_checkpoint)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama3-tied": ("LlamaForCausalLM", {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 7}),
    **MOE_CASES,
}
PAGED_CASES = ["llama", "llama3-tied", "qwen2", "qwen3", "mistral-window", *MOE_CASES]
PROMPT_LENGTHS = (1, 5, 10, 17)
BLOCK_SIZE = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Case name -> checkpoint directory, written once per module."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_random_checkpoint(str(root / name), arch, seed=i, **overrides)
            for i, (name, (arch, overrides)) in enumerate(CASES.items())}


def _hf_logits(model_dir: str, sequences: list[list[int]], device="cpu") -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = model.to(device)
    with torch.no_grad():
        return [model(torch.tensor([ids], device=device)).logits[0].float() for ids in sequences]


class PagedRunner:
    """The model runner's job in miniature: a KV cache per layer, block tables, one context per step."""

    def __init__(self, model: DecoderForCausalLM, spec: ModelSpec, num_requests: int, max_len: int):
        self.device = model.lm_head.weight.device
        blocks_per_request = -(-max_len // BLOCK_SIZE)
        num_blocks = num_requests * blocks_per_request + 3
        self.kv = torch.zeros(spec.num_layers, 2, num_blocks, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim,
                              dtype=model.lm_head.weight.dtype, device=self.device)
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv[i, 0], self.kv[i, 1]
        scattered = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
        self.block_table = scattered[: num_requests * blocks_per_request].view(num_requests, blocks_per_request)
        self.block_table = self.block_table.to(torch.int32).to(self.device)
        self.num_cached = [0] * num_requests
        self.model = model

    def step(self, new_tokens: list[list[int]]) -> list[torch.Tensor]:
        """Run one step over each request's new tokens; returns each request's logits of its new tokens."""
        ids, positions, slots, query_lens = [], [], [], []
        for b, tokens in enumerate(new_tokens):
            start = self.num_cached[b]
            for pos in range(start, start + len(tokens)):
                positions.append(pos)
                slots.append(int(self.block_table[b, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
            ids += tokens
            query_lens.append(len(tokens))
            self.num_cached[b] += len(tokens)
        device = self.device
        cu_seqlens_q = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(device)
        set_context(AttentionContext(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device), cu_seqlens_q=cu_seqlens_q,
            seqused_k=torch.tensor(self.num_cached, dtype=torch.int32, device=device), block_table=self.block_table,
            max_seqlen_q=max(query_lens), max_seqlen_k=max(self.num_cached),
            is_decode=all(n == 1 for n in query_lens)))
        try:
            with torch.no_grad():
                hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device))
                logits = self.model.compute_logits(hidden)
        finally:
            set_context(None)
        return list(logits.split(query_lens))


def _paged_logits(model_dir: str, dtype: str, device: str):
    """(ours, transformers' fp32) logits of every token of prompts + one decoded token each: our side runs a
    chunked prefill in two steps, then a decode step."""
    model, spec = load_model(model_dir, dtype, device)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    next_tokens = torch.randint(0, spec.vocab_size, (len(prompts),), generator=generator).tolist()
    expected = _hf_logits(model_dir, [p + [t] for p, t in zip(prompts, next_tokens)], device)
    runner = PagedRunner(model, spec, len(prompts), max(PROMPT_LENGTHS) + 1)
    first_chunks = [p[: (len(p) + 1) // 2] for p in prompts]
    got = runner.step(first_chunks)
    got = [torch.cat(pair) for pair in zip(got, runner.step([p[len(c):] for p, c in zip(prompts, first_chunks)]))]
    got = [torch.cat(pair) for pair in zip(got, runner.step([[t] for t in next_tokens]))]
    return got, expected


@pytest.mark.parametrize("case", PAGED_CASES)
def test_paged_forward_matches_transformers(checkpoints, case):
    got, expected = _paged_logits(checkpoints[case], "float32", "cpu")
    for b, (ours, theirs) in enumerate(zip(got, expected)):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=lambda m: f"{case}, request {b}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", PAGED_CASES)
def test_paged_forward_matches_transformers_on_gpu(checkpoints, case):
    got, expected = _paged_logits(checkpoints[case], "float32", "cuda")
    for b, (ours, theirs) in enumerate(zip(got, expected)):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0, msg=lambda m: f"{case}, request {b}: {m}")
    got, _ = _paged_logits(checkpoints[case], "bfloat16", "cuda")
    for ours, theirs in zip(got, expected):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        error = (ours - theirs).abs()
        if case in MOE_CASES:  # bf16 rounding flips near-tied expert choices: a few positions move a lot
            assert error.mean() <= 0.02 * theirs.abs().max() + 0.02
        else:
            assert error.max() <= 0.05 * theirs.abs().max() + 0.05


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_pending_and_epilogue_residual_adds_agree(checkpoints, case, monkeypatch):
    """The residual stream with every add in the o / down epilogues and norms folded (what the interpreter's plans
    give with the fold on) and with every add left pending for the fused add + RMSNorm (as under cuBLAS plans, or
    with the fold off, the default): the same logits."""
    from flashserve.kernels import norm_linear

    monkeypatch.setattr(norm_linear, "NORM_MAX_X_BYTES", 32 * 1024)
    folded, _ = _paged_logits(checkpoints[case], "float32", "cpu")
    monkeypatch.setattr(Linear, "adds_residual", lambda self, num_rows: False)
    pending, _ = _paged_logits(checkpoints[case], "float32", "cpu")
    for ours, unfused in zip(folded, pending):
        torch.testing.assert_close(ours, unfused, atol=1e-5, rtol=1e-5)


def test_resident_plans_fold_every_norm_and_add(checkpoints, monkeypatch):
    """With resident plans at few rows (what the H200's table holds at one row) the norms fold and the dense adds
    ride in the o / down epilogues whatever NORM_MAX_X_BYTES says (0: the grid kernel folds nothing): the logits
    of the decoder with every add pending and every norm a launch of its own."""
    from flashserve.kernels import norm_linear, skinny_gemm, skinny_gemm_plans
    from flashserve.kernels.skinny_gemm_plans import GemmConfig

    resident = GemmConfig(8, 0, 1, 4, 1, False, 0, False, True)
    monkeypatch.setattr(skinny_gemm_plans, "default_config", lambda n_out, k, rows, dtype, device, gated=False:
                        resident if rows <= 8 else skinny_gemm_plans.INTERPRETER_CONFIG)
    monkeypatch.setattr(norm_linear, "NORM_MAX_X_BYTES", 0)
    planned = []  # (resident?, normed?) of each launch planned
    plain_plan = skinny_gemm.launch_plan

    def recording_plan(x_rows, weight, has_bias, residual_rows, gated, config, norm=False, eps=0.0):
        planned.append((config.resident, norm, residual_rows is not None))
        return plain_plan(x_rows, weight, has_bias, residual_rows, gated, config, norm, eps)

    monkeypatch.setattr(skinny_gemm, "launch_plan", recording_plan)
    skinny_gemm_plans.reset()
    try:
        folded, _ = _paged_logits(checkpoints["qwen3"], "float32", "cpu")
        resident_launches = {entry for entry in planned if entry[0]}
        assert (True, True, False) in resident_launches and (True, False, True) in resident_launches
        assert not any(norm for is_resident, norm, _ in planned if not is_resident)
        monkeypatch.setattr(Linear, "adds_residual", lambda self, num_rows: False)
        pending, _ = _paged_logits(checkpoints["qwen3"], "float32", "cpu")
    finally:
        skinny_gemm_plans.reset()
    for ours, unfused in zip(folded, pending):
        torch.testing.assert_close(ours, unfused, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["llama", "qwen3", "qwen2-moe"])
def test_folded_norms_and_adds_match_the_unfused_decoder_on_gpu(checkpoints, case, monkeypatch):
    """bf16 with every product on the small-M kernel (the tiny shapes' default plan is cuBLAS): the decoder with
    its RMSNorms in the QKV / gate-up prologues and its residual adds in the o / down epilogues (the steps of few
    tokens) against the same decoder with the norms unfolded: the same logits up to the rare one-ulp flips of a
    normed operand."""
    from flashserve.kernels import norm_linear, skinny_gemm_plans

    monkeypatch.setattr(skinny_gemm_plans, "default_config", lambda n_out, k, rows, dtype, device, gated=False:
                        skinny_gemm_plans.kernel_config(n_out, k, rows, dtype, device))
    skinny_gemm_plans.reset()
    monkeypatch.setattr(norm_linear, "NORM_MAX_X_BYTES", 32 * 1024)
    try:
        folded, expected = _paged_logits(checkpoints[case], "bfloat16", "cuda")
        monkeypatch.setattr(norm_linear, "NORM_MAX_X_BYTES", 0)
        unfolded, _ = _paged_logits(checkpoints[case], "bfloat16", "cuda")
    finally:
        skinny_gemm_plans.reset()
    for ours, unfused, theirs in zip(folded, unfolded, expected):
        assert torch.isfinite(ours).all()
        difference = (ours - unfused).abs()
        if case in MOE_CASES:  # a flipped near-tie of the router moves a few positions a lot (as against HF)
            assert difference.mean() <= 0.01 * theirs.abs().max() + 0.01
        else:
            assert difference.max() <= 0.01 * theirs.abs().max() + 0.01
            assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max() + 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_resident_plans_match_the_unfused_decoder_on_gpu(checkpoints, case, monkeypatch):
    """bf16 with resident plans at <= 8 rows (the grid kernel above): the decoder with its norms folded and its adds
    in the epilogues, weights read before each PDL wait, against the same decoder with every add pending and every
    norm a launch of its own; and both against transformers."""
    from flashserve.kernels import skinny_gemm_plans
    from flashserve.kernels.skinny_gemm_plans import GemmConfig

    resident = GemmConfig(8, 0, 1, 4, 1, False, 0, False, True)
    monkeypatch.setattr(skinny_gemm_plans, "default_config", lambda n_out, k, rows, dtype, device, gated=False:
                        resident if rows <= 8 else skinny_gemm_plans.kernel_config(n_out, k, rows, dtype, device))
    skinny_gemm_plans.reset()
    try:
        folded, expected = _paged_logits(checkpoints[case], "bfloat16", "cuda")
        monkeypatch.setattr(Linear, "adds_residual", lambda self, num_rows: False)
        pending, _ = _paged_logits(checkpoints[case], "bfloat16", "cuda")
    finally:
        skinny_gemm_plans.reset()
    for ours, unfused, theirs in zip(folded, pending, expected):
        assert torch.isfinite(ours).all()
        assert (ours - unfused).abs().max() <= 0.01 * theirs.abs().max() + 0.01
        assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max() + 0.05


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING,
                                          dict(LLAMA3_SCALING, original_max_position_embeddings=8192)])
def test_rotary_frequencies_equal_transformers(rope_scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, rope_scaling=rope_scaling,
                         max_position_embeddings=1024)
    spec = ModelSpec.from_config(dict(config.to_dict(), architectures=["LlamaForCausalLM"]))
    ours = rotary_inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    assert torch.equal(ours, LlamaRotaryEmbedding(config).inv_freq)


def test_spec_reads_both_config_styles():
    old_style = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                 "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "rope_theta": 500000.0,
                 "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192},
                 "torch_dtype": "bfloat16", "eos_token_id": [5, 6]}
    spec = ModelSpec.from_config(old_style, {"eos_token_id": [7, 5]})
    assert spec.rope_theta == 500000.0 and spec.rope_scaling["rope_type"] == "llama3"
    assert spec.head_dim == 16 and spec.num_kv_heads == 4 and spec.torch_dtype == torch.bfloat16
    assert spec.eos_token_ids == (7, 5, 6)
    qwen2 = dict(old_style, architectures=["Qwen2ForCausalLM"], rope_scaling=None, use_sliding_window=True,
                 sliding_window=16, max_window_layers=1)
    spec = ModelSpec.from_config(qwen2)
    assert spec.attention_bias and not spec.o_bias and spec.sliding_windows == (None, 16)
    with pytest.raises(ValueError, match="yarn"):
        ModelSpec.from_config(dict(old_style, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = write_random_checkpoint(str(tmp_path / "single"), "Qwen3ForCausalLM", seed=3)
    sharded = write_random_checkpoint(str(tmp_path / "sharded"), "Qwen3ForCausalLM", seed=3,
                                      max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    a, _ = load_model(single, "float32", "cpu")
    b, _ = load_model(sharded, "float32", "cpu")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_dtype_auto_and_explicit(tmp_path):
    path = write_random_checkpoint(str(tmp_path / "m"), "LlamaForCausalLM", dtype=torch.bfloat16)
    model, spec = load_model(path, "auto", "cpu")
    assert spec.torch_dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    rotary = model.model.layers[0].self_attn.attn.rotary
    assert rotary.cos_sin_cache.dtype == torch.float32
    model, _ = load_model(path, "float16", "cpu")
    assert model.lm_head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        load_model(path, "int8", "cpu")


def test_pickle_weights_refused_unless_allowed(tmp_path):
    path = write_random_checkpoint(str(tmp_path / "m"), "LlamaForCausalLM")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="pickle"):
        load_model(path, "float32", "cpu")
    model, _ = load_model(path, "float32", "cpu", allow_pickle=True)
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_unknown_architecture_raises(tmp_path):
    path = write_random_checkpoint(str(tmp_path / "m"), "LlamaForCausalLM")
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["GPT2LMHeadModel"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_spec(path)
    with pytest.raises(ValueError, match="architecture"):
        write_random_checkpoint(str(tmp_path / "x"), "FalconForCausalLM")


def test_missing_and_unexpected_weights_raise(tmp_path):
    path = write_random_checkpoint(str(tmp_path / "m"), "Qwen2ForCausalLM")
    weights_path = os.path.join(path, "model.safetensors")
    tensors = load_file(weights_path)
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    save_file(missing, weights_path)
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(path, "float32", "cpu")
    save_file(dict(tensors, **{"model.layers.0.extra.weight": torch.zeros(2)}), weights_path)
    with pytest.raises(ValueError, match=r"unexpected weights: model\.layers\.0\.extra\.weight"):
        load_model(path, "float32", "cpu")
    save_file(dict(tensors, **{"model.norm.weight": torch.zeros(3)}), weights_path)
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(path, "float32", "cpu")


def test_demo_model_is_deterministic_and_loads(tmp_path, monkeypatch):
    contents = []
    for run in ("a", "b"):
        monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path / run))
        start = time.perf_counter()
        path = demo_model_path()
        assert time.perf_counter() - start < 30
        assert path == str(tmp_path / run / "demo-llama")
        assert demo_model_path() == path
        assert sorted(os.listdir(tmp_path / run)) == ["demo-llama"]
        contents.append({name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))})
    assert contents[0] == contents[1]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(contents[0])
    model, spec = load_model(path, "auto", "cpu")
    assert spec.architecture == "LlamaForCausalLM" and spec.tie_word_embeddings
    assert spec.torch_dtype == torch.float32 and spec.eos_token_ids
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == spec.vocab_size
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|user|>\nHello</s>\n<|assistant|>\n"
