"""``load_model``: a Hugging Face checkpoint directory -> (DecoderForCausalLM, ModelSpec), from local files only.

Weights come from ``model.safetensors`` or the shards listed in ``model.safetensors.index.json`` (any other
``*.safetensors`` files in the directory when there is neither). Each tensor is placed by its parameter's
``weight_loader``; q/k/v and gate/up tensors go into the fused parameters through
``DecoderForCausalLM.packed_modules_mapping``, per-expert tensors of mixture-of-experts checkpoints into their
slices of the stacked expert parameters (``moe_loading``); stacked expert tensors saved whole come as lazy
safetensors slices, so a tensor-parallel rank reads only its part of them. Pickle weights (``*.bin``, ``*.pt``,
``*.pth``) can run arbitrary code when loaded and are refused unless ``allow_pickle=True``.
"""
import glob
import json
import os

import torch
from safetensors import safe_open

from flashserve.models.decoder import DecoderForCausalLM
from flashserve.models.moe_loading import canonical_name, expert_target, is_stacked_experts
from flashserve.models.spec import ModelSpec, load_spec

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, spec: ModelSpec) -> torch.dtype:
    """"auto" (the checkpoint's torch_dtype), a dtype name, or a torch.dtype -> torch.dtype; ValueError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype == "auto":
        return spec.torch_dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r}")


def load_model(model_dir: str, dtype="auto", device="cpu", allow_pickle: bool = False
               ) -> tuple[DecoderForCausalLM, ModelSpec]:
    """Build the decoder described by ``model_dir``/config.json and fill it with the checkpoint's weights.

    Raises ValueError for an unsupported architecture or config, missing or unexpected weights, weights of the
    wrong shape, and pickle-only checkpoints (unless ``allow_pickle``).
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"model_dir {model_dir!r} is not a directory")
    spec = load_spec(model_dir)
    torch_dtype = resolve_dtype(dtype, spec)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = DecoderForCausalLM(spec)
    finally:
        torch.set_default_dtype(default_dtype)
    load_weights(model, iter_checkpoint_tensors(model_dir, allow_pickle))
    return model.eval(), spec


def checkpoint_files(model_dir: str, allow_pickle: bool = False) -> list[str]:
    """The weight files of ``model_dir`` in load order; ValueError when there are none (or only pickle ones)."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        missing = [path for path in files if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"model.safetensors.index.json names missing shard files: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files
    pickles = sorted(path for pattern in _PICKLE_PATTERNS for path in glob.glob(os.path.join(model_dir, pattern)))
    if pickles and not allow_pickle:
        raise ValueError(f"model_dir {model_dir!r} holds only pickle weights ({os.path.basename(pickles[0])}, ...), "
                         "which can run arbitrary code when loaded; convert them to safetensors or pass "
                         "allow_pickle=True if you trust them")
    if pickles:
        return pickles
    raise ValueError(f"model_dir {model_dir!r} has no weight files (*.safetensors)")


def iter_checkpoint_tensors(model_dir: str, allow_pickle: bool = False):
    """Yield (Hugging Face name, CPU tensor) for every tensor of the checkpoint; a stacked expert tensor of a
    safetensors file comes as its lazy slice (``safe_open(...).get_slice``: indexing it reads only the indexed
    part; valid until the next item is drawn)."""
    for path in checkpoint_files(model_dir, allow_pickle):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name) if is_stacked_experts(canonical_name(name)) else f.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True).items()


def load_weights(model: DecoderForCausalLM, tensors) -> None:
    """Place (name, tensor) pairs into ``model``'s parameters; ValueError naming missing or unexpected weights."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if _ignored(name, model):
            continue
        name = canonical_name(name)
        target, shard_id = expert_target(name) or _target_name(name, model.packed_modules_mapping)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        try:
            if shard_id is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
        except ValueError as error:
            raise ValueError(f"checkpoint tensor {name}: {error}") from None
        loaded.add(name)
        if shard_id is None and hasattr(param, "checkpoint_names"):  # a stacked expert tensor saved whole
            loaded.update(_checkpoint_names(target, param))
    if unexpected:
        raise ValueError(f"checkpoint has unexpected weights: {', '.join(sorted(unexpected))}")
    missing = sorted(set(_expected_names(model)) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing)}")


def _ignored(name: str, model: DecoderForCausalLM) -> bool:
    """Tensors some checkpoints carry that the decoder does not need (rotary tables, a tied LM head's copy)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return name == "lm_head.weight" and model.spec.tie_word_embeddings


def _target_name(name: str, mapping: dict) -> tuple[str, object]:
    """Hugging Face tensor name -> (our parameter name, shard id or None)."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part in mapping:
            fused, shard_id = mapping[part]
            return ".".join(parts[:index] + [fused] + parts[index + 1:]), shard_id
    return name, None


def _expected_names(model: DecoderForCausalLM) -> list[str]:
    """The Hugging Face tensor names the model needs (fused parameters expanded into their parts)."""
    fused_parts: dict[str, list[tuple[str, object]]] = {}
    for hf_name, (fused, shard_id) in model.packed_modules_mapping.items():
        fused_parts.setdefault(fused, []).append((hf_name, shard_id))
    names = []
    for name, param in model.named_parameters():
        if hasattr(param, "checkpoint_names"):
            names.extend(_checkpoint_names(name, param))
            continue
        parts = name.split(".")
        fused = next((part for part in parts if part in fused_parts), None)
        if fused is None:
            names.append(name)
            continue
        index = parts.index(fused)
        names.extend(".".join(parts[:index] + [hf_name] + parts[index + 1:]) for hf_name, _ in fused_parts[fused])
    return names


def _checkpoint_names(name: str, param) -> list[str]:
    """The per-tensor checkpoint names of a parameter stacked from several (``param.checkpoint_names``)."""
    prefix = name.rsplit(".", 1)[0]
    return [f"{prefix}.{part}" for part in param.checkpoint_names]
