"""Tiny mixture-of-experts checkpoints of each supported MoE architecture, shared by the parity tests.

Several experts and top-k >= 2 everywhere; Qwen3-MoE with a dense layer between sparse ones (``mlp_only_layers``)
and renormalised top-k weights, Qwen2-MoE with a shared expert, raw softmax weights and ``decoder_sparse_step``.
"""
MOE_CASES = {
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 48, "norm_topk_prob": True,
                                          "mlp_only_layers": [1], "head_dim": 32}),
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 64}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 3,
                                          "moe_intermediate_size": 32, "shared_expert_intermediate_size": 80,
                                          "decoder_sparse_step": 2}),
}
