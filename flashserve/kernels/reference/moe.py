"""Plain-PyTorch reference of the fused mixture-of-experts layer (``flashserve.kernels.fused_moe``).

Same contracts as the kernels: ``moe_routing`` is softmax then ``torch.topk`` (exactly Hugging Face's router, so
ties break the same way), ``fused_experts`` loops over the experts that received tokens, as Hugging Face's
``Qwen3MoeExperts`` does, but with the kernel's numerics: products accumulated in fp32, ``silu(gate) * up``
rounded once to the input dtype, the k weighted contributions of a token summed in fp32 and rounded once.
"""
import torch
import torch.nn.functional as F


def moe_routing(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (T, E) -> (topk_weights (T, top_k) fp32, topk_ids (T, top_k) int32).

    Softmax over the experts in fp32, the ``top_k`` largest probabilities (``torch.topk``: ties go to the lower
    expert id as Hugging Face's router gets them), divided by their sum when ``renormalize`` (Qwen's
    ``norm_topk_prob``; Mixtral always renormalises)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids.to(torch.int32)


def fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, j].

    hidden_states (T, H); w13 (E, 2I, H): gate rows then up rows of each expert; w2 (E, H, I); returns (T, H) in
    hidden_states' dtype. ``compute_dtype`` is the precision of the matmuls and of the sum (fp32 gives the
    kernels' numerics; the input dtype gives plain PyTorch in that precision, the error bar of the tests).
    """
    num_tokens, top_k = topk_ids.shape
    intermediate = w2.shape[2]
    x = hidden_states.to(compute_dtype)
    out = torch.zeros(num_tokens, hidden_states.shape[1], dtype=compute_dtype, device=hidden_states.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1).to(compute_dtype)
    for expert in torch.unique(flat_ids).tolist():
        rows = (flat_ids == expert).nonzero().squeeze(1)
        tokens = rows // top_k
        gate_up = F.linear(x[tokens], w13[expert].to(compute_dtype))
        activated = (F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]).to(hidden_states.dtype)
        down = F.linear(activated.to(compute_dtype), w2[expert].to(compute_dtype))
        out.index_add_(0, tokens, down * flat_weights[rows, None])
    return out.to(hidden_states.dtype)
