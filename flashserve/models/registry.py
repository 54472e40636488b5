"""What differs between the supported architectures, kept as data for the one decoder in ``decoder.py``.

Keyed by the ``architectures`` entry of a checkpoint's config.json. Every field says where a checkpoint of that
architecture differs from plain Llama; the decoder reads these through ``ModelSpec`` and has no per-model code.
"""
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ArchitectureTraits:
    """Per-architecture facts of the Hugging Face implementation.

    Attributes:
        model_type: config.json's ``model_type`` (used to build random checkpoints with transformers).
        qkv_bias: True/False fixed by the architecture, None = config.json's ``attention_bias`` decides.
        o_bias: the same for the output projection.
        mlp_bias_key: config key that switches on biases of the MLP projections, None when they never exist.
        qk_norm: RMSNorm over each head of q and k before rotary (Qwen3).
        sliding_window: "none" (never), "all" (every layer when ``sliding_window`` is set: Mistral, Mixtral),
            "layer_types" (the layers whose ``layer_types`` entry is "sliding_attention", only when
            ``use_sliding_window`` is true: Qwen2/Qwen3, Qwen2-MoE) or "enabled" (every layer when
            ``use_sliding_window`` is true: Qwen3-MoE).
        moe_style: None for dense models, else how config.json describes the experts ("qwen" or "mixtral",
            see ``moe_spec.parse_moe``).
    """

    model_type: str
    qkv_bias: bool | None
    o_bias: bool | None
    mlp_bias_key: str | None
    qk_norm: bool
    sliding_window: str
    moe_style: str | None = None


ARCHITECTURES: dict[str, ArchitectureTraits] = {
    "LlamaForCausalLM": ArchitectureTraits("llama", None, None, "mlp_bias", False, "none"),
    "Qwen2ForCausalLM": ArchitectureTraits("qwen2", True, False, None, False, "layer_types"),
    "Qwen3ForCausalLM": ArchitectureTraits("qwen3", None, None, None, True, "layer_types"),
    "MistralForCausalLM": ArchitectureTraits("mistral", False, False, None, False, "all"),
    "Qwen2MoeForCausalLM": ArchitectureTraits("qwen2_moe", True, False, None, False, "layer_types", "qwen"),
    "Qwen3MoeForCausalLM": ArchitectureTraits("qwen3_moe", None, None, None, True, "enabled", "qwen"),
    "MixtralForCausalLM": ArchitectureTraits("mixtral", False, False, None, False, "all", "mixtral"),
}


def get_traits(architecture: str) -> ArchitectureTraits:
    """The traits of ``architecture``; raises ValueError naming it (and the supported ones) when unknown."""
    if architecture not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unsupported architecture {architecture!r}; flashserve supports {supported}")
    return ARCHITECTURES[architecture]
