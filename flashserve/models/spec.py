"""``ModelSpec``: everything the decoder, the loader and the engine need from a checkpoint's config.json.

Reads both config styles in the wild: ``rope_theta`` + ``rope_scaling`` (transformers 4) and ``rope_parameters``
(transformers 5), ``torch_dtype`` and ``dtype``. End-of-sequence ids come from config.json and
generation_config.json together.
"""
import json
import os
from dataclasses import dataclass

import torch

from flashserve.models.moe_spec import MoeSpec, parse_moe
from flashserve.models.registry import get_traits

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class ModelSpec:
    """The shape and numerics of one decoder-only checkpoint.

    ``rope_scaling`` is None for plain rotary, else a dict with ``rope_type`` ("linear" or "llama3") and its
    parameters (``factor``; for llama3 also ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). ``sliding_windows`` holds one entry per layer: None for full attention,
    else the Hugging Face window ``w`` (a query sees itself and the ``w - 1`` keys before it). ``moe`` describes
    the routed experts of mixture-of-experts checkpoints (None for dense ones).
    """

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    attention_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    tie_word_embeddings: bool
    torch_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    moe: MoeSpec | None = None

    @classmethod
    def from_config(cls, config: dict, generation_config: dict | None = None) -> "ModelSpec":
        """Parse a config.json dict (and optionally generation_config.json's); ValueError on anything unsupported."""
        architectures = config.get("architectures") or []
        if len(architectures) != 1:
            raise ValueError(f"config.json must name exactly one architecture, got {architectures!r}")
        architecture = architectures[0]
        traits = get_traits(architecture)
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {hidden_act!r}")
        num_heads = int(config["num_attention_heads"])
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads})")
        hidden_size = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden_size // num_heads)
        num_layers = int(config["num_hidden_layers"])
        max_position_embeddings = int(config.get("max_position_embeddings", 2048))
        rope_theta, rope_scaling = _parse_rope(config, max_position_embeddings)
        config_bias = bool(config.get("attention_bias", False))
        return cls(
            architecture=architecture,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
            attention_bias=config_bias if traits.qkv_bias is None else traits.qkv_bias,
            o_bias=config_bias if traits.o_bias is None else traits.o_bias,
            mlp_bias=bool(config.get(traits.mlp_bias_key, False)) if traits.mlp_bias_key else False,
            qk_norm=traits.qk_norm,
            sliding_windows=_parse_sliding_windows(config, traits.sliding_window, num_layers),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            torch_dtype=_parse_dtype(config.get("torch_dtype") or config.get("dtype") or "float32"),
            eos_token_ids=_eos_ids(generation_config or {}, config),
            bos_token_id=config.get("bos_token_id"),
            moe=parse_moe(config, traits.moe_style, num_layers),
        )


def load_spec(model_dir: str) -> ModelSpec:
    """Read ``model_dir``/config.json (and generation_config.json when present) into a ModelSpec."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model_dir {model_dir!r} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    generation_config = None
    generation_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(generation_path):
        with open(generation_path) as f:
            generation_config = json.load(f)
    return ModelSpec.from_config(config, generation_config)


def _parse_rope(config: dict, max_position_embeddings: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config style; rope_scaling None for plain rotary."""
    parameters = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = float(parameters.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
    rope_type = parameters.pop("rope_type", None) or parameters.pop("type", None) or "default"
    parameters.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    partial = float(parameters.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor must be 1.0, got {partial}")
    if rope_type == "default":
        return rope_theta, None
    scaling = {"rope_type": rope_type, "factor": float(parameters["factor"])}
    if rope_type == "llama3":
        scaling["low_freq_factor"] = float(parameters["low_freq_factor"])
        scaling["high_freq_factor"] = float(parameters["high_freq_factor"])
        scaling["original_max_position_embeddings"] = int(
            config.get("original_max_position_embeddings")
            or parameters.get("original_max_position_embeddings")
            or max_position_embeddings)
    return rope_theta, scaling


def _parse_sliding_windows(config: dict, mode: str, num_layers: int) -> tuple[int | None, ...]:
    """The attention window of each layer (None = full), following the Hugging Face implementation of the mode."""
    window = config.get("sliding_window")
    if mode == "none" or window is None:
        return (None,) * num_layers
    if mode == "all":
        return (int(window),) * num_layers
    if mode == "enabled":
        return (int(window) if config.get("use_sliding_window", False) else None,) * num_layers
    if not config.get("use_sliding_window", False):
        return (None,) * num_layers
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i >= int(config.get("max_window_layers", 0)) else "full_attention"
        for i in range(num_layers)]
    return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)


def _parse_dtype(name) -> torch.dtype:
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"torch_dtype must be one of {tuple(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _eos_ids(*configs: dict) -> tuple[int, ...]:
    """EOS ids of all given configs, in order, without repeats."""
    ids: list[int] = []
    for config in configs:
        value = config.get("eos_token_id")
        for token_id in (value if isinstance(value, list) else [value]):
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)
