"""Fused mixture-of-experts: routing, token permutation on the device, and two grouped-GEMM launches.

``fused_moe(hidden_states, w13, w2, router_logits, top_k, renormalize)`` computes, for every token t,
``sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` over its ``top_k`` experts e (Qwen2/Qwen3-MoE, Mixtral):

1. ``moe_routing`` (``moe_routing.py``, one launch): softmax over the router logits in fp32, the top k (Hugging
   Face's choices, equal logits to the lower expert id), optional renormalisation (``norm_topk_prob``).
2. ``moe_align_block_size`` (``moe_align``, three small launches): the T * top_k (token, expert) pairs
   sorted by expert, each expert's run padded to a multiple of the GEMM's BLOCK_M, on the device with shapes that
   never depend on the routing (no host sync: CUDA-graph safe). The GEMMs' grids cover the worst case; programs
   past the padded total exit at once.
3. Gate/up grouped GEMM: each program takes BLOCK_M rows of one expert, multiplies the gathered hidden states by
   that expert's gate and up rows and stores ``silu(gate) * up`` (fp32 epilogue, rounded once) per pair. The
   column tiles of a row block are launched one after another (L2 reuse of the gathered rows and weight tiles).
4. Down grouped GEMM: the same walk over the activations, the product scaled by the pair's routing weight, then
   either added atomically into the token's fp32 output row (the k contributions of a token meet there, and the
   K shares of a split-K config's programs; the gate/up launch clears the rows, a rounding to the input dtype
   follows), or
   (``pair_outputs`` configs: many pairs, short K, where atomics dominate) stored per pair in the input dtype and
   summed per token in fp32 by ``_sum_pairs_kernel``, which writes the output once. That launch also adds the
   layer's residual stream when the caller passes it (``residual``; the atomic mode's fp32 rows go through it
   too, as their rounding to the input dtype): the decoder's residual add, which a layer needs anyway, carries
   the pair sum, so the expert part itself stays two launches.

Every Triton launch here uses programmatic dependent launch where ``pdl.enabled`` says so (Hopper): each kernel
waits for the previous one before touching memory, but its launch overlaps that kernel's tail.

Weights are stacked per expert: ``w13`` (E, 2I, H) holds each expert's gate rows then its up rows (Hugging Face's
``experts.gate_up_proj``), ``w2`` (E, H, I) its down projection. Tiles come from ``moe_configs``.
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import _validate, pdl
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import cdiv
from flashserve.kernels.moe_align import moe_align_block_size
from flashserve.kernels.moe_configs import MoeGemmConfig, moe_configs
from flashserve.kernels.moe_routing import moe_routing
from flashserve.kernels.pdl import wait_for_previous
from flashserve.kernels.reference import moe as reference

_CLEAR_BLOCK = tl.constexpr(1024)  # fp32 values a gate/up program clears per step (CLEAR)


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr,
                         clear_ptr, clear_numel, N, K, top_k, a_rows_per_pair_divisor, up_offset,
                         stride_am, stride_be, stride_bn, stride_om,
                         GATED: tl.constexpr, PAIR_OUTPUTS: tl.constexpr, CLEAR: tl.constexpr, PDL: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One (BLOCK_M pairs of one expert) x (BLOCK_N output columns) tile of ``a[rows] @ b[expert].T``.

    GATED: b rows [n] and [up_offset + n] give gate and up; stores silu(gate) * up at the pair's row of out.
    Else: scales by the pair's routing weight and, PAIR_OUTPUTS, stores it at the pair's row of out, or atomically
    adds it into out's row of the pair's token; there SPLIT_K > 1 (few rows, long K) gives SPLIT_K programs per
    tile, each over its share of K (whole BLOCK_K steps), each adding its partial product.

    One program per tile (and K share) on a 1-D grid, the column tiles of a row block consecutive: the programs that
    run at the same time share their row block's gathered rows in L2, and an expert's row blocks (adjacent) its
    weight tiles. CLEAR (the gate/up launch before an atomic down launch): the programs first set the clear_numel
    fp32 values at clear_ptr to zero between them (the down launch's output: no memset launch). PDL: waits for the
    previous kernel before any memory access (which expert's weights to read comes from the permutation)."""
    wait_for_previous(PDL)
    if CLEAR:
        offs_clear = tl.arange(0, _CLEAR_BLOCK)
        for start in range(tl.program_id(0) * _CLEAR_BLOCK, clear_numel, tl.num_programs(0) * _CLEAR_BLOCK):
            tl.store(clear_ptr + start + offs_clear, tl.zeros((_CLEAR_BLOCK,), tl.float32),
                     mask=start + offs_clear < clear_numel)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0) // SPLIT_K
    pid_m = tile // num_n_tiles
    pid_n = tile % num_n_tiles
    if SPLIT_K == 1:
        k_begin = 0
        k_end = K
    else:
        k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = (tl.program_id(0) % SPLIT_K) * k_share
        k_end = tl.minimum(K, k_begin + k_share)
    num_padded = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M >= num_padded:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_ids = tl.load(sorted_ids_ptr + offs_m)
    valid = pair_ids >= 0
    pairs = tl.where(valid, pair_ids, 0).to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    a_rows = pairs // a_rows_per_pair_divisor
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_begin + offs_k)[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + (k_begin + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        k_mask = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & n_mask[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + up_offset * stride_bn, mask=b_mask, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out_mask = valid[:, None] & n_mask[None, :]
    if GATED:
        activated = acc / (1.0 + tl.exp(-acc)) * acc_up
        out_ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, activated.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        routing_weights = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
        weighted = acc * routing_weights[:, None]
        if PAIR_OUTPUTS:
            out_ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :]
            tl.store(out_ptrs, weighted.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tokens = pairs // top_k
            out_ptrs = out_ptr + tokens[:, None] * stride_om + offs_n[None, :]
            tl.atomic_add(out_ptrs, weighted, mask=out_mask, sem="relaxed")


@triton.jit
def _sum_pairs_kernel(pair_out_ptr, residual_ptr, out_ptr, N, rows_per_token, BLOCK_N: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """out[t, n] = sum over j < rows_per_token of pair_out[t * rows_per_token + j, n] in fp32, rounded once to
    out's dtype; HAS_RESIDUAL: then plus residual[t, n] in fp32, rounded again (the unfused ``residual + moe``).
    One program per (token, BLOCK_N columns). pair_out holds the pair rows (pair_outputs) or, one row per token,
    the atomic mode's fp32 sums."""
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for choice in range(rows_per_token):
        acc += tl.load(pair_out_ptr + (token * rows_per_token + choice) * N + offs_n, mask=mask,
                       other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(residual_ptr + token * N + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


_SUM_BLOCK_N = 1024


def _launch(a, b, out, topk_weights, top_k, gated, config: MoeGemmConfig, alignment,
            clear: torch.Tensor | None = None) -> None:
    """One grouped-GEMM launch (the kernel's docstring); ``clear``: an fp32 tensor the gate/up launch zeroes."""
    sorted_pair_ids, block_experts, num_padded = alignment
    n = b.shape[1] // 2 if gated else b.shape[1]
    grid = (block_experts.numel() * cdiv(n, config.block_n) * config.split_k,)
    with_pdl = pdl.enabled(a.device)
    _grouped_gemm_kernel[grid](
        a, b, out, topk_weights, sorted_pair_ids, block_experts, num_padded,
        out if clear is None else clear, 0 if clear is None else clear.numel(),
        n, b.shape[2], top_k, top_k if gated else 1, n if gated else 0,
        a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        GATED=gated, PAIR_OUTPUTS=config.pair_outputs, CLEAR=clear is not None, PDL=with_pdl,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_options(with_pdl),
    )


def down_projection(activated: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, top_k: int,
                    config: MoeGemmConfig, alignment, out_dtype: torch.dtype,
                    cleared: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The down half of ``fused_experts``: (T * k, I) activations (pair rows) -> (T, H) in ``out_dtype``, the
    weighted sum of each token's k down products (atomics into fp32, or per-pair rows and a sum: ``config``),
    plus ``residual`` (T, H) when given (added by the launch that sums, after rounding the sum to ``out_dtype``).
    ``cleared``: for the atomic mode, a zeroed (T, H) fp32 tensor to add into (else one is made here)."""
    num_pairs, hidden = activated.shape[0], w2.shape[1]
    num_tokens = num_pairs // top_k
    if config.pair_outputs:
        summed = torch.empty(num_pairs, hidden, dtype=activated.dtype, device=activated.device)
        _launch(activated, w2, summed, topk_weights, top_k, False, config, alignment)
        rows_per_token = top_k
    else:
        summed = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=activated.device) if cleared is None \
            else cleared
        _launch(activated, w2, summed, topk_weights, top_k, False, config, alignment)
        rows_per_token = 1
        if residual is None and out_dtype == torch.float32:
            return summed
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=activated.device)
    with_pdl = pdl.enabled(out.device)
    _sum_pairs_kernel[(num_tokens, cdiv(hidden, _SUM_BLOCK_N))](
        summed, summed if residual is None else residual, out, hidden, rows_per_token, BLOCK_N=_SUM_BLOCK_N,
        HAS_RESIDUAL=residual is not None, PDL=with_pdl, num_warps=4, **pdl.launch_options(with_pdl))
    return out


def _check(hidden_states, w13, w2, topk_weights, topk_ids, residual) -> None:
    _validate.check_tensor("hidden_states", hidden_states, 2, _validate.ATTENTION_DTYPES)
    device, dtype = hidden_states.device, hidden_states.dtype
    if residual is not None:
        _validate.check_tensor("residual", residual, 2, (dtype,), device)
        _validate.check_shape("residual", residual, hidden_states.shape)
    _validate.check_tensor("w13", w13, 3, (dtype,), device)
    _validate.check_tensor("w2", w2, 3, (dtype,), device)
    num_experts, hidden = w13.shape[0], hidden_states.shape[1]
    if w13.shape[1] % 2 or w13.shape[2] != hidden:
        raise ValueError(f"w13 must have shape (E, 2I, {hidden}), got {tuple(w13.shape)}")
    _validate.check_shape("w2", w2, (num_experts, hidden, w13.shape[1] // 2))
    for name, tensor in (("hidden_states", hidden_states), ("w13", w13), ("w2", w2), ("residual", residual)):
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _validate.check_tensor("topk_ids", topk_ids, 2, (torch.int32, torch.int64), device)
    _validate.check_tensor("topk_weights", topk_weights, 2, (torch.float32,), device)
    if topk_ids.shape[0] != hidden_states.shape[0] or not 1 <= topk_ids.shape[1] <= num_experts:
        raise ValueError(f"topk_ids must have shape ({hidden_states.shape[0]}, k) with 1 <= k <= {num_experts}, "
                         f"got {tuple(topk_ids.shape)}")
    _validate.check_shape("topk_weights", topk_weights, topk_ids.shape)


def fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, configs: tuple[MoeGemmConfig, MoeGemmConfig] | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' part of the layer for routed tokens, in two grouped-GEMM launches (and, for pair_outputs
    configs or when ``residual`` is given, the launch that sums each token's rows and adds the residual).

    Args:
        hidden_states: (T, H) fp16/bf16/fp32, contiguous.
        w13: (E, 2I, H), each expert's gate rows then up rows; w2: (E, H, I); both of hidden_states' dtype.
        topk_weights: (T, k) fp32 routing weights; topk_ids: (T, k) int32/int64 expert ids in [0, E).
        configs: (gate/up, down) tiles; default from ``moe_configs.moe_configs`` (for this device). Only the down
            GEMM may split K (the gate/up epilogue needs whole sums) or store pair outputs (not both).
        residual: optional (T, H) of hidden_states' dtype, contiguous: the layer's residual stream, added to the
            result (the pre-norm decoder's ``residual + moe(x)``, with the rounding of those two unfused steps)
            by the launch that sums, so the add costs no launch of its own.
    Returns (T, H) in hidden_states' dtype: the weighted sum of each token's k expert outputs (products in fp32,
    the activation rounded once to the input dtype, the sum in fp32 then rounded once; pair_outputs: each weighted
    product rounded to the input dtype before that sum), plus ``residual``. ValueError on bad input.
    """
    _check(hidden_states, w13, w2, topk_weights, topk_ids, residual)
    if not use_triton(hidden_states):
        return reference.fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, residual=residual)
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, intermediate = w2.shape
    if num_tokens == 0:
        return hidden_states.new_zeros(0, hidden)
    up_config, down_config = configs or moe_configs(num_tokens, num_experts, hidden, intermediate, top_k,
                                                    hidden_states.element_size(), device=hidden_states.device)
    if up_config.split_k != 1 or up_config.pair_outputs:
        raise ValueError(f"configs: the gate/up GEMM has neither split_k nor pair_outputs, got {up_config}")
    if down_config.split_k != 1 and down_config.pair_outputs:
        raise ValueError(f"configs: a pair_outputs down GEMM cannot split K, got {down_config}")
    topk_weights = topk_weights.contiguous()
    activated = torch.empty(num_tokens * top_k, intermediate, dtype=hidden_states.dtype,
                            device=hidden_states.device)
    cleared = None if down_config.pair_outputs else torch.empty(num_tokens, hidden, dtype=torch.float32,
                                                                 device=hidden_states.device)
    alignment = moe_align_block_size(topk_ids, up_config.block_m, num_experts)
    _launch(hidden_states, w13, activated, topk_weights, top_k, True, up_config, alignment, clear=cleared)
    if down_config.block_m != up_config.block_m:
        alignment = moe_align_block_size(topk_ids, down_config.block_m, num_experts)
    return down_projection(activated, w2, topk_weights, top_k, down_config, alignment, hidden_states.dtype,
                           cleared, residual)


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor,
              top_k: int, renormalize: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Route (``moe_routing``) then run the experts (``fused_experts``): (T, H) -> (T, H).

    router_logits: (T, E) in any float dtype; top_k in [1, E]; renormalize: divide the top-k probabilities by
    their sum (Qwen's ``norm_topk_prob``, always true for Mixtral); residual: see ``fused_experts``."""
    _validate.check_tensor("router_logits", router_logits, 2, _validate.ATTENTION_DTYPES, hidden_states.device)
    if router_logits.shape != (hidden_states.shape[0], w13.shape[0]):
        raise ValueError(f"router_logits must have shape ({hidden_states.shape[0]}, {w13.shape[0]}), "
                         f"got {tuple(router_logits.shape)}")
    topk_weights, topk_ids = moe_routing(router_logits, top_k, renormalize)
    return fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, residual=residual)
