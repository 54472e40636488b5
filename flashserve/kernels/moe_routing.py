"""``moe_routing``: the mixture-of-experts router's softmax, top-k and renormalisation in one Triton launch.

Hugging Face's router is five device operations (softmax in fp32, ``torch.topk``, the sum and the division of the
renormalisation, the id cast), each a launch of its own at decode sizes. Here one program routes ``BLOCK_T`` tokens:
it loads their logits (all experts, fp32), takes the top k by k rounds of "largest remaining logit, lowest expert id
among equal ones" (the order of the probabilities, which softmax does not change; exactly equal logits go to the lower
id: ``torch.topk`` does not define an order for ties, and on the CPU it gives others, while the GPU test against it on
tie-heavy bf16 logits found the same expert sets), and writes each choice's softmax probability, divided by the k
probabilities' sum when ``renormalize``.

Numerics: the probabilities are ``exp(x - max) / sum(exp(x - max))`` in fp32 as ``torch.softmax`` computes them,
up to the rounding of ``exp`` and the order of the sum (a few ulps); the chosen experts are the same except where
two logits differ by less than the rounding of their probabilities (then HF may see a tie that is not one here).
Rows of -inf logits are not special-cased beyond giving finite weights (such experts are never preferred to finite
ones). Launched with programmatic dependent launch where ``pdl.enabled``. CUDA-graph safe (no host sync).
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate, pdl
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import cdiv, next_power_of_2
from flashserve.kernels.pdl import wait_for_previous
from flashserve.kernels.reference import moe as reference

_TILE_ELEMENTS = 4096  # logits per program (BLOCK_T tokens x BLOCK_E experts)


@triton.jit(do_not_specialize=["num_tokens"])
def _routing_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_t,
                    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Tokens [pid * BLOCK_T, ...): weights (T, TOP_K) fp32 and ids (T, TOP_K) int32, best choice first."""
    wait_for_previous(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    token_valid = tokens < num_tokens
    expert_valid = experts < num_experts
    rows = tokens.to(tl.int64)
    x = tl.load(logits_ptr + rows[:, None] * stride_t + experts[None, :],
                mask=token_valid[:, None] & expert_valid[None, :], other=float("-inf")).to(tl.float32)
    row_max = tl.max(x, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    exps = tl.where(expert_valid[None, :], tl.exp(x - row_max[:, None]), 0.0)
    total = tl.sum(exps, axis=1)
    choices = tl.arange(0, BLOCK_K)
    chosen_exps = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    chosen_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    available = tl.broadcast_to(expert_valid[None, :], (BLOCK_T, BLOCK_E))
    for choice in tl.static_range(TOP_K):
        best = tl.max(tl.where(available, x, float("-inf")), axis=1)
        expert = tl.min(tl.where(available & (x == best[:, None]), experts[None, :], BLOCK_E), axis=1)
        expert = tl.minimum(expert, num_experts - 1)  # NaN logits match nothing: still an id inside the table
        picked = experts[None, :] == expert[:, None]
        picked_exp = tl.sum(tl.where(picked, exps, 0.0), axis=1)
        chosen_exps = tl.where(choices[None, :] == choice, picked_exp[:, None], chosen_exps)
        chosen_ids = tl.where(choices[None, :] == choice, expert[:, None], chosen_ids)
        available = available & ~picked
    if RENORMALIZE:
        norm = tl.sum(chosen_exps, axis=1)
    else:
        norm = total
    norm = tl.where(norm > 0.0, norm, 1.0)
    out_mask = token_valid[:, None] & (choices < TOP_K)[None, :]
    offsets = rows[:, None] * TOP_K + choices[None, :]
    tl.store(weights_ptr + offsets, chosen_exps / norm[:, None], mask=out_mask)
    tl.store(ids_ptr + offsets, chosen_ids, mask=out_mask)


def moe_routing(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (T, E), any float dtype, last dimension contiguous -> (topk_weights (T, top_k) fp32,
    topk_ids (T, top_k) int32), the best choice first.

    Softmax over the experts in fp32, the ``top_k`` most probable experts (equal logits: the lower expert id
    first), their probabilities, divided by their sum when ``renormalize`` (Qwen's ``norm_topk_prob``; Mixtral
    always renormalises). One Triton launch where ``use_triton`` says so, else ``reference.moe_routing`` (Hugging
    Face's own operations). ValueError on bad input."""
    _validate.check_tensor("router_logits", router_logits, 2, _validate.ATTENTION_DTYPES)
    num_tokens, num_experts = router_logits.shape
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}], got {top_k!r}")
    if not use_triton(router_logits):
        return reference.moe_routing(router_logits, top_k, renormalize)
    _validate.check_last_dim_contiguous("router_logits", router_logits)
    device = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return weights, ids
    block_e = next_power_of_2(num_experts)
    block_t = max(1, min(16, _TILE_ELEMENTS // block_e))
    with_pdl = pdl.enabled(device)
    _routing_kernel[(cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, RENORMALIZE=bool(renormalize), BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(top_k), PDL=with_pdl, num_warps=4, **pdl.launch_options(with_pdl))
    return weights, ids
