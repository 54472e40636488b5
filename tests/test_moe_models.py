"""Mixture-of-experts model side: MoeSpec from config.json, and the loader's placement of expert tensors
(per-expert names, Mixtral's w1/w3/w2, stacked tensors saved whole, missing experts). Parity with Hugging Face is in
test_models.py and test_engine_parity.py (the MOE_CASES)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from flashserve.distributed.state import set_tp_group, tp_size
from flashserve.models import DecoderForCausalLM, ModelSpec, load_model, load_spec, write_random_checkpoint
from flashserve.models.loader import iter_checkpoint_tensors, load_weights
from flashserve.models.moe import SparseMoeBlock
from moe_cases import MOE_CASES, write_stacked_copy

QWEN_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, "vocab_size": 100, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    spec = ModelSpec.from_config(dict(QWEN_MOE, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert spec.moe.sparse_layers == (False, True, False, False, False, True)
    assert spec.moe.num_experts == 8 and spec.moe.top_k == 2 and spec.moe.expert_intermediate_size == 32
    assert not spec.moe.renormalize and spec.moe.shared_expert_intermediate_size == 0
    saved_style = dict(QWEN_MOE, num_local_experts=8, norm_topk_prob=True)  # transformers 5 writes this key
    del saved_style["num_experts"]
    assert ModelSpec.from_config(saved_style).moe.num_experts == 8
    assert ModelSpec.from_config(saved_style).moe.renormalize
    assert ModelSpec.from_config(dict(QWEN_MOE, architectures=["Qwen3ForCausalLM"])).moe is None


def test_sliding_window_of_qwen3_moe_needs_use_sliding_window():
    assert ModelSpec.from_config(dict(QWEN_MOE, sliding_window=8)).sliding_windows == (None,) * 6
    assert ModelSpec.from_config(dict(QWEN_MOE, sliding_window=8, use_sliding_window=True)).sliding_windows == (8,) * 6


@pytest.mark.parametrize("overrides,match", [({"num_experts_per_tok": 9}, "num_experts_per_tok"),
                                             ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
                                             ({"decoder_sparse_step": 0}, "decoder_sparse_step")])
def test_invalid_moe_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_config(dict(QWEN_MOE, **overrides))
    with pytest.raises(ValueError, match="qkv_bias"):
        ModelSpec.from_config(dict(QWEN_MOE, architectures=["Qwen2MoeForCausalLM"], qkv_bias=False))


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: write_random_checkpoint(str(root / name), arch, seed=3, **overrides)
            for name, (arch, overrides) in MOE_CASES.items()}


@pytest.mark.parametrize("case", ["qwen2-moe", "mixtral"])
def test_expert_tensors_land_in_their_slices(moe_checkpoints, case):
    model, spec = load_model(moe_checkpoints[case])
    tensors = load_file(f"{moe_checkpoints[case]}/model.safetensors")
    layer = next(i for i, sparse in enumerate(spec.moe.sparse_layers) if sparse)
    block = model.model.layers[layer].mlp
    assert isinstance(block, SparseMoeBlock)
    prefix = f"model.layers.{layer}." + ("block_sparse_moe" if case == "mixtral" else "mlp")
    names = ("w1", "w3", "w2") if case == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for expert in range(spec.moe.num_experts):
        gate, up, down = (tensors[f"{prefix}.experts.{expert}.{name}.weight"] for name in names)
        assert torch.equal(block.experts.gate_up_proj[expert], torch.cat((gate, up)))
        assert torch.equal(block.experts.down_proj[expert], down)
    assert torch.equal(block.gate.weight, tensors[f"{prefix}.gate.weight"])


@pytest.mark.parametrize("rank, size", [(0, 1), (1, 2)])
def test_stacked_expert_tensors_saved_whole_load_the_same(moe_checkpoints, tmp_path, rank, size):
    """transformers 5's in-memory layout (experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I)); also
    rank 1's slices under tensor parallelism (cut from the stacked tensors as from the per-expert ones)."""
    source = moe_checkpoints["qwen3-moe"]
    set_tp_group(rank, size)
    try:
        _compare_stacked_with_per_expert(source, tmp_path)
    finally:
        set_tp_group(0, 1)


def _compare_stacked_with_per_expert(source: str, tmp_path) -> None:
    reference, spec = load_model(source)
    directory = write_stacked_copy(source, str(tmp_path / "stacked"))
    model, _ = load_model(directory)
    local = spec.moe.expert_intermediate_size // tp_size()
    assert model.model.layers[0].mlp.experts.down_proj.shape == (spec.moe.num_experts, spec.hidden_size, local)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(ours, theirs), name


class _RecordingSlice:
    """A safetensors slice that records the number of elements of every read."""

    def __init__(self, inner, reads: list[int]):
        self.inner, self.reads = inner, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        piece = self.inner[index]
        self.reads.append(piece.numel())
        return piece


def test_stacked_experts_are_read_in_rank_slices(moe_checkpoints, tmp_path, monkeypatch):
    """At TP 2, rank 1 reads each stacked tensor through its lazy slice, one expert's half at a time (never
    whole): exactly the elements its parameters hold."""
    from safetensors import safe_open

    import flashserve.models.loader as loader

    directory = write_stacked_copy(moe_checkpoints["qwen3-moe"], str(tmp_path / "stacked"))
    reads: list[int] = []

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, name):
            assert not name.endswith(("experts.gate_up_proj", "experts.down_proj")), f"{name} read whole"
            return self.file.get_tensor(name)

        def get_slice(self, name):
            return _RecordingSlice(self.file.get_slice(name), reads)

    monkeypatch.setattr(loader, "safe_open", RecordingFile)
    set_tp_group(1, 2)
    try:
        model, spec = load_model(directory)
    finally:
        set_tp_group(0, 1)
    local, hidden = spec.moe.expert_intermediate_size // 2, spec.hidden_size
    stacked = [p for name, p in model.named_parameters() if name.endswith(("gate_up_proj", "down_proj"))
               and ".experts." in name]
    assert reads and max(reads) == local * hidden
    assert sum(reads) == sum(p.numel() for p in stacked)


def test_missing_expert_tensor_is_named(moe_checkpoints, tmp_path):
    source = moe_checkpoints["mixtral"]
    tensors = load_file(f"{source}/model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.4.w3.weight"]
    directory = tmp_path / "missing"
    directory.mkdir()
    (directory / "config.json").write_bytes(open(f"{source}/config.json", "rb").read())
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.mlp\.experts\.4\.up_proj\.weight"):
        load_model(str(directory))


def test_experts_load_in_place(moe_checkpoints):
    """Each per-expert tensor is copied into its slice of the preallocated stacked parameter: no parameter is
    replaced or re-stacked (so no second copy of the experts is ever built)."""
    directory = moe_checkpoints["qwen3-moe"]
    model = DecoderForCausalLM(load_spec(directory))
    before = {name: param.data_ptr() for name, param in model.named_parameters()}
    load_weights(model, iter_checkpoint_tensors(directory))
    assert {name: param.data_ptr() for name, param in model.named_parameters()} == before
