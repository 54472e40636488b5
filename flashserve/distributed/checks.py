"""Whether a model can be split over ``tensor_parallel_size`` ranks: checked before any worker starts."""
from flashserve.models.spec import ModelSpec


def check_split(spec: ModelSpec, tensor_parallel_size: int) -> None:
    """ValueError naming the config.json field that ``tensor_parallel_size`` does not divide: query heads and the
    MLP's intermediate size split evenly; KV heads split evenly, or, when there are fewer of them than ranks, the
    ranks must be a multiple of them (each KV head then replicated). The vocabulary is padded, never refused."""
    tp = tensor_parallel_size
    if spec.num_heads % tp:
        raise ValueError(f"num_attention_heads ({spec.num_heads}) is not divisible by tensor_parallel_size ({tp})")
    if tp >= spec.num_kv_heads and tp % spec.num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) is not a multiple of num_key_value_heads "
                         f"({spec.num_kv_heads}): the KV heads cannot be replicated evenly")
    if tp < spec.num_kv_heads and spec.num_kv_heads % tp:
        raise ValueError(f"num_key_value_heads ({spec.num_kv_heads}) is not divisible by tensor_parallel_size ({tp})")
    if spec.intermediate_size % tp:
        raise ValueError(f"intermediate_size ({spec.intermediate_size}) is not divisible by tensor_parallel_size "
                         f"({tp})")
    if tp > 1 and spec.moe is not None:
        raise ValueError(f"tensor_parallel_size ({tp}) > 1 is not supported yet for mixture-of-experts models "
                         f"({spec.architecture}): their experts are not sharded; use tensor_parallel_size=1")
