"""Whether a model can be split over ``tensor_parallel_size`` ranks: checked before any worker starts."""
from flashserve.models.spec import ModelSpec


def check_split(spec: ModelSpec, tensor_parallel_size: int) -> None:
    """ValueError naming the config.json field that ``tensor_parallel_size`` does not divide: query heads and the
    MLP's intermediate size split evenly; KV heads split evenly, or, when there are fewer of them than ranks, the
    ranks must be a multiple of them (each KV head then replicated). Mixture-of-experts models split every expert
    along its intermediate size (``moe_intermediate_size``, Mixtral's ``intermediate_size``) and the shared
    expert's (``shared_expert_intermediate_size``); the dense ``intermediate_size`` counts only when some layer is
    dense. The vocabulary is padded, never refused."""
    tp = tensor_parallel_size
    if spec.num_heads % tp:
        raise ValueError(f"num_attention_heads ({spec.num_heads}) is not divisible by tensor_parallel_size ({tp})")
    if tp >= spec.num_kv_heads and tp % spec.num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) is not a multiple of num_key_value_heads "
                         f"({spec.num_kv_heads}): the KV heads cannot be replicated evenly")
    if tp < spec.num_kv_heads and spec.num_kv_heads % tp:
        raise ValueError(f"num_key_value_heads ({spec.num_kv_heads}) is not divisible by tensor_parallel_size ({tp})")
    for field, size in _intermediate_sizes(spec):
        if size % tp:
            raise ValueError(f"{field} ({size}) is not divisible by tensor_parallel_size ({tp})")


def _intermediate_sizes(spec: ModelSpec) -> list[tuple[str, int]]:
    """(config.json field, size) of every intermediate dimension the model's layers split."""
    moe = spec.moe
    if moe is None:
        return [("intermediate_size", spec.intermediate_size)]
    sizes = [(moe.expert_intermediate_key, moe.expert_intermediate_size)]
    if moe.shared_expert_intermediate_size:
        sizes.append(("shared_expert_intermediate_size", moe.shared_expert_intermediate_size))
    if not all(moe.sparse_layers):
        sizes.append(("intermediate_size", spec.intermediate_size))
    return sizes
