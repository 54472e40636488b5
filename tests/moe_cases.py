"""Tiny mixture-of-experts checkpoints of each supported MoE architecture, shared by the parity tests, and
``write_stacked_copy`` (the same weights with each layer's experts in two stacked tensors).

Several experts and top-k >= 2 everywhere; Qwen3-MoE with a dense layer between sparse ones (``mlp_only_layers``)
and renormalised top-k weights, Qwen2-MoE with a shared expert, raw softmax weights and ``decoder_sparse_step``.
"""
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

MOE_CASES = {
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 48, "norm_topk_prob": True,
                                          "mlp_only_layers": [1], "head_dim": 32}),
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 64}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 3,
                                          "moe_intermediate_size": 32, "shared_expert_intermediate_size": 80,
                                          "decoder_sparse_step": 2}),
}


def write_stacked_copy(source: str, directory: str) -> str:
    """Copy the Qwen-style checkpoint ``source`` (one model.safetensors) into ``directory`` with every sparse layer's
    experts stacked as transformers 5 holds them: ``mlp.experts.gate_up_proj`` (E, 2I, H), each expert's gate rows
    then its up rows, and ``mlp.experts.down_proj`` (E, H, I). Returns ``directory``."""
    tensors = load_file(os.path.join(source, "model.safetensors"))
    prefixes = sorted({name.split(".experts.")[0] for name in tensors if ".mlp.experts." in name})
    for prefix in prefixes:
        count = 1 + max(int(name.split(".")[-3]) for name in tensors if name.startswith(prefix + ".experts."))
        part = lambda e, name: tensors.pop(f"{prefix}.experts.{e}.{name}.weight")
        tensors[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat((part(e, "gate_proj"), part(e, "up_proj"))) for e in range(count)])
        tensors[f"{prefix}.experts.down_proj"] = torch.stack([part(e, "down_proj") for e in range(count)])
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(source):
        if name.endswith(".json"):
            shutil.copy(os.path.join(source, name), directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return directory
