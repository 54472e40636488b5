"""Where the loader puts mixture-of-experts checkpoint tensors.

Checkpoints name each expert's projections separately: Qwen2/Qwen3-MoE
``model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight``, Mixtral
``model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`` (gate, up, down) and
``block_sparse_moe.gate.weight``. ``canonical_name`` turns Mixtral's names into the Qwen ones (so error messages
name those); ``expert_target`` maps a per-expert name to its stacked parameter and the shard id its weight loader
takes. Stacked tensors saved whole (``mlp.experts.gate_up_proj``, transformers 5's in-memory layout) load as they
are.
"""
import re

_MIXTRAL_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_STACKED_WHOLE = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def canonical_name(name: str) -> str:
    """Mixtral's MoE tensor names in Qwen's spelling; every other name unchanged."""
    if ".block_sparse_moe." not in name:
        return name
    name = _MIXTRAL_EXPERT.sub(lambda m: f".block_sparse_moe.experts.{m.group(1)}.{_MIXTRAL_PARTS[m.group(2)]}.",
                               name)
    return name.replace(".block_sparse_moe.", ".mlp.")


def expert_target(name: str) -> tuple[str, tuple[int, str]] | None:
    """(stacked parameter name, (expert, part)) for a per-expert tensor name in canonical form, else None."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    prefix, expert, part = match.groups()
    return f"{prefix}.{_STACKED[part]}", (int(expert), part)


def is_stacked_experts(name: str) -> bool:
    """Whether a tensor name in canonical form is a stacked tensor of all of a layer's experts."""
    return _STACKED_WHOLE.search(name) is not None
