"""``MoeSpec``: the mixture-of-experts part of a checkpoint's config.json (Qwen2-MoE, Qwen3-MoE, Mixtral).

MoE is a per-layer choice of MLP: ``sparse_layers[i]`` says whether layer i runs the routed experts (else the
dense SwiGLU MLP of ``ModelSpec.intermediate_size``). Config styles, by the architecture's ``moe_style`` trait:

- "qwen": ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``; layer i is
  sparse unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``; Qwen2-MoE also has a
  shared expert of ``shared_expert_intermediate_size`` gated by a sigmoid.
- "mixtral": ``num_local_experts``, ``num_experts_per_tok``, experts of ``intermediate_size``, every layer sparse,
  top-k weights always renormalised.
"""
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MoeSpec:
    """Routed experts of the sparse layers (and the optional shared expert beside them).
    ``expert_intermediate_key`` is the config.json field ``expert_intermediate_size`` comes from (errors name it)."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool
    shared_expert_intermediate_size: int
    sparse_layers: tuple[bool, ...]
    expert_intermediate_key: str


def parse_moe(config: dict, moe_style: str | None, num_layers: int) -> MoeSpec | None:
    """The MoeSpec of a config.json dict (None for a dense architecture); ValueError on an invalid one."""
    if moe_style is None:
        return None
    if moe_style == "mixtral":
        num_experts = int(config["num_local_experts"])
        intermediate, renormalize, shared = int(config["intermediate_size"]), True, 0
        intermediate_key = "intermediate_size"
        sparse_layers = (True,) * num_layers
    else:
        if config.get("qkv_bias", True) is not True:
            raise ValueError("qkv_bias=False is not supported (Qwen2-MoE's q/k/v projections have biases)")
        num_experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        intermediate_key = "moe_intermediate_size"
        intermediate = int(config[intermediate_key])
        renormalize = bool(config.get("norm_topk_prob", False))
        shared = int(config.get("shared_expert_intermediate_size") or 0)
        step = int(config.get("decoder_sparse_step", 1))
        if step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
        mlp_only = set(config.get("mlp_only_layers") or [])
        sparse_layers = tuple(num_experts > 0 and i not in mlp_only and (i + 1) % step == 0
                              for i in range(num_layers))
    top_k = int(config.get("num_experts_per_tok", 0))
    if any(sparse_layers) and not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {top_k}")
    return MoeSpec(num_experts, top_k, intermediate, renormalize, shared, sparse_layers, intermediate_key)
