"""``moe_align_block_size``: the fused-MoE token permutation, in three small Triton launches and no host sync.

The T * k (token, expert) pairs of a routing are listed expert by expert, each expert's run padded to a multiple of
the grouped GEMM's BLOCK_M; within a run the pairs keep their order (a stable sort by expert). Pairs are cut into
chunks of BLOCK_P:

1. ``_count_kernel`` (one program per chunk): the chunk's pairs per expert (a one-hot sum).
2. ``_offsets_kernel`` (one program): per chunk and expert, the pairs of that expert in earlier chunks; per expert
   its padded start; the expert of every BLOCK_M-row block; the padded total; every row set to -1 first.
3. ``_scatter_kernel`` (one program per chunk): each pair's row = its expert's padded start + the expert's pairs in
   earlier chunks + those before it in its chunk (a cumulative sum of the one-hot).

Every size a launch depends on comes from T * k and the model's shape, never from the routing, so the calls can
be captured in a CUDA graph; the per-step counts are not specialised on (``do_not_specialize``).
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import cdiv, next_power_of_2
from flashserve.kernels.reference import moe as reference

_ONE_HOT_ELEMENTS = 16384  # BLOCK_P * BLOCK_E of the one-hot tiles


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, chunk_counts_ptr, num_pairs, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + chunk * BLOCK_E + experts, counts)


@triton.jit(do_not_specialize=["num_chunks", "max_rows", "num_blocks"])
def _offsets_kernel(chunk_counts_ptr, chunk_offsets_ptr, padded_starts_ptr, block_experts_ptr, num_padded_ptr,
                    sorted_ids_ptr, num_chunks, max_rows, num_blocks, num_experts,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for chunk in range(0, num_chunks):
        tl.store(chunk_offsets_ptr + chunk * BLOCK_E + experts, counts)
        counts += tl.load(chunk_counts_ptr + chunk * BLOCK_E + experts)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(padded_starts_ptr + experts, ends - padded)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    real_expert = experts < num_experts
    for block_start in range(0, num_blocks, BLOCK_R):
        blocks = block_start + tl.arange(0, BLOCK_R)
        rows = blocks * BLOCK_M
        finished = (ends[None, :] <= rows[:, None]) & real_expert[None, :]
        block_experts = tl.sum(finished.to(tl.int32), axis=1)
        tl.store(block_experts_ptr + blocks, block_experts, mask=blocks < num_blocks)
    for row_start in range(0, max_rows, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        tl.store(sorted_ids_ptr + rows, tl.full((BLOCK_R,), -1, tl.int32), mask=rows < max_rows)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(ids_ptr, chunk_offsets_ptr, padded_starts_ptr, sorted_ids_ptr, num_pairs,
                    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = offs_p < num_pairs
    ids = tl.load(ids_ptr + offs_p, mask=valid, other=-1)
    experts = tl.arange(0, BLOCK_E)
    one_hot = ids[:, None] == experts[None, :]
    ranks_inclusive = tl.cumsum(one_hot.to(tl.int32), axis=0)
    rank = tl.sum(tl.where(one_hot, ranks_inclusive - 1, 0), axis=1)
    safe_ids = tl.where(valid, ids, 0)
    base = tl.load(padded_starts_ptr + safe_ids) + tl.load(chunk_offsets_ptr + chunk * BLOCK_E + safe_ids)
    tl.store(sorted_ids_ptr + base + rank, offs_p.to(tl.int32), mask=valid)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, expert) pairs by expert and pad each expert's run to a multiple of ``block_m``.

    topk_ids (T, k) int32/int64 with ids in [0, num_experts) -> (sorted_pair_ids (R,) int32, block_experts
    (R / block_m,) int32, num_padded (1,) int32). Pair p is (token p // k, its choice p % k); sorted_pair_ids lists
    the pairs of expert 0 in order, then those of expert 1, ..., each run padded with -1 to a multiple of block_m;
    block_experts[b] is the expert of rows [b * block_m, (b + 1) * block_m); num_padded is the padded total. R is
    the worst case over all routings of T * k pairs (``reference.max_sorted_rows``: shapes never depend on the
    routing); rows past num_padded are -1 and their blocks' expert ids are num_experts. Experts without pairs get
    no rows. Runs the Triton kernels where ``use_triton`` says so, else ``reference.moe_align_block_size``.
    """
    if not use_triton(topk_ids):
        return reference.moe_align_block_size(topk_ids, block_m, num_experts)
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int32)
    num_pairs = ids.numel()
    max_rows = reference.max_sorted_rows(num_pairs, num_experts, block_m)
    num_blocks = max_rows // block_m
    block_e = next_power_of_2(num_experts)
    block_p = max(16, min(256, _ONE_HOT_ELEMENTS // block_e))  # one variant per model, whatever T is
    num_chunks = cdiv(num_pairs, block_p)
    chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)
    padded_starts = torch.empty(block_e, dtype=torch.int32, device=device)
    sorted_pair_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    block_experts = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_pair_ids, block_experts, num_padded.zero_()
    _count_kernel[(num_chunks,)](ids, chunk_counts, num_pairs, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4)
    _offsets_kernel[(1,)](chunk_counts, chunk_offsets, padded_starts, block_experts, num_padded, sorted_pair_ids,
                          num_chunks, max_rows, num_blocks, num_experts, BLOCK_M=block_m, BLOCK_E=block_e,
                          BLOCK_R=max(16, min(1024, _ONE_HOT_ELEMENTS // block_e)), num_warps=4)
    _scatter_kernel[(num_chunks,)](ids, chunk_offsets, padded_starts, sorted_pair_ids, num_pairs,
                                   BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4)
    return sorted_pair_ids, block_experts, num_padded
