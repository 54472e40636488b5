"""Plain-PyTorch reference of the fused mixture-of-experts layer (``flashserve.kernels.moe``).

Same contracts as the kernels: ``moe_routing`` is softmax then ``torch.topk`` (exactly Hugging Face's router, so
ties break the same way), ``fused_experts`` loops over the experts that received tokens, as Hugging Face's
``Qwen3MoeExperts`` does, but with the kernel's numerics: products accumulated in fp32, ``silu(gate) * up``
rounded once to the input dtype, the k weighted contributions of a token summed in fp32 and rounded once.
``moe_align_block_size`` is the token permutation of ``flashserve.kernels.moe_align`` in device ops (a stable sort).
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
                  topk_ids: torch.Tensor, compute_dtype: torch.dtype = torch.float32,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, j], plus
    ``residual`` (T, H) when given (the sum rounded to hidden_states' dtype, then the add in fp32, rounded).

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
    out = out.to(hidden_states.dtype)
    if residual is None:
        return out
    return (out.float() + residual.float()).to(hidden_states.dtype)


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the padded permutation of ``num_pairs`` pairs can need (each expert that gets a pair adds at
    most ``block_m - 1`` padding rows), rounded up to a multiple of ``block_m``."""
    return -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``moe_align.moe_align_block_size`` in device ops of static shape (a stable sort by
    expert): the same outputs.

    Groups the (token, expert) pairs by expert and pads each expert's run to a multiple of ``block_m``.

    topk_ids (T, k) int -> (sorted_pair_ids (R,) int32, block_experts (R / block_m,) int32,
    num_padded (1,) int32). Pair p is (token p // k, its j = p % k choice); sorted_pair_ids lists the pairs of
    expert 0, then of expert 1, ..., each run padded with -1 to a multiple of block_m; block_experts[b] is the
    expert of rows [b * block_m, (b + 1) * block_m); num_padded the padded total. R, a multiple of block_m, is the
    worst case over all routings of T * k pairs (shapes never depend on the data: no host sync); rows past
    num_padded are -1 and their blocks' expert ids are num_experts. Experts without pairs get no rows.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0)
    padded_starts = padded_ends - padded_counts
    starts = torch.cumsum(counts, 0) - counts
    order = torch.sort(flat, stable=True).indices
    sorted_experts = flat[order]
    destinations = padded_starts[sorted_experts] + torch.arange(num_pairs, device=device) - starts[sorted_experts]
    max_rows = max_sorted_rows(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.full((max_rows,), -1, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, destinations, order.to(torch.int32))
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return sorted_pair_ids, block_experts, padded_ends[-1:].to(torch.int32)
