"""``moe_align_block_size``: the fused-MoE token permutation, in one to three small Triton launches, no host sync.

The T * k (token, expert) pairs of a routing are listed expert by expert, each expert's run padded to a multiple of
the grouped GEMM's BLOCK_M; within a run the pairs keep their order (a stable sort by expert). Pairs are cut into
chunks of BLOCK_P:

1. ``_count_kernel`` (one program per chunk): the chunk's pairs per expert (a one-hot sum).
2. ``_offsets_kernel`` (one program): per chunk and expert, the pairs of that expert in earlier chunks; per expert
   its padded start; the expert of every BLOCK_M-row block; the padded total; every row set to -1 first.
3. ``_scatter_kernel`` (one program per chunk): each pair's row = its expert's padded start + the expert's pairs in
   earlier chunks + those before it in its chunk (a cumulative sum of the one-hot).

When all pairs fit one chunk (decode: up to 32768 / next_power_of_2(E) pairs), one program does all three steps
(``_align_single_kernel``, its chunk the next power of two of the pair count: one variant per power of two, so a
decode step of few tokens scans a small one-hot). Every size a launch depends on comes from T * k and the model's
shape, never from the routing, so the calls can be captured in a CUDA graph; the per-step counts are not
specialised on (``do_not_specialize``). Launched with programmatic dependent launch where ``pdl.enabled``.
"""
import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels._launch import cdiv, next_power_of_2
from flashserve.kernels.pdl import wait_for_previous
from flashserve.kernels.reference import moe as reference

_ONE_HOT_ELEMENTS = 16384  # BLOCK_P * BLOCK_E of the one-hot tiles of the chunked path
_SINGLE_ONE_HOT_ELEMENTS = 32768  # ... and of the single-launch path (8 warps)
_FILL_BLOCK = 4096  # rows set to -1 per step


@triton.jit
def _chunk_one_hot(ids_ptr, chunk, num_pairs, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """The pair indices of a chunk, which are real, their experts (-1 past the end) and the (BLOCK_P, BLOCK_E)
    one-hot of the experts."""
    offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = offs_p < num_pairs
    ids = tl.load(ids_ptr + offs_p, mask=valid, other=-1).to(tl.int32)
    one_hot = ids[:, None] == tl.arange(0, BLOCK_E)[None, :]
    return offs_p, valid, ids, one_hot


@triton.jit
def _write_layout(counts, padded_starts_ptr, block_experts_ptr, num_padded_ptr, sorted_ids_ptr, max_rows,
                  num_blocks, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
                  FILL_BLOCK: tl.constexpr):
    """From the pairs per expert: each expert's padded start, the padded total, every block's expert, and every
    row of sorted_ids set to -1."""
    experts = tl.arange(0, BLOCK_E)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(padded_starts_ptr + experts, ends - padded)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    real_expert = experts < num_experts
    for block_start in range(0, num_blocks, BLOCK_R):
        blocks = block_start + tl.arange(0, BLOCK_R)
        finished = (ends[None, :] <= blocks[:, None] * BLOCK_M) & real_expert[None, :]
        tl.store(block_experts_ptr + blocks, tl.sum(finished.to(tl.int32), axis=1), mask=blocks < num_blocks)
    for row_start in range(0, max_rows, FILL_BLOCK):
        rows = row_start + tl.arange(0, FILL_BLOCK)
        tl.store(sorted_ids_ptr + rows, tl.full((FILL_BLOCK,), -1, tl.int32), mask=rows < max_rows)


@triton.jit
def _scatter_chunk(offs_p, valid, ids, one_hot, expert_bases_ptr, padded_starts_ptr, sorted_ids_ptr,
                   HAS_BASES: tl.constexpr):
    """Store each pair of a chunk at its expert's padded start + (HAS_BASES) expert_bases[expert] (the expert's
    pairs in earlier chunks) + its rank among the chunk's pairs of that expert."""
    ranks_inclusive = tl.cumsum(one_hot.to(tl.int32), axis=0)
    rank = tl.sum(tl.where(one_hot, ranks_inclusive - 1, 0), axis=1)
    safe_ids = tl.where(valid, ids, 0)
    base = tl.load(padded_starts_ptr + safe_ids)
    if HAS_BASES:
        base += tl.load(expert_bases_ptr + safe_ids)
    tl.store(sorted_ids_ptr + base + rank, offs_p.to(tl.int32), mask=valid)


@triton.jit(do_not_specialize=["num_pairs", "max_rows", "num_blocks"])
def _align_single_kernel(ids_ptr, padded_starts_ptr, block_experts_ptr, num_padded_ptr, sorted_ids_ptr,
                         num_pairs, max_rows, num_blocks, num_experts,
                         BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
                         FILL_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """All pairs in one chunk: the whole permutation in one program."""
    wait_for_previous(PDL)
    offs_p, valid, ids, one_hot = _chunk_one_hot(ids_ptr, 0, num_pairs, BLOCK_P, BLOCK_E)
    counts = tl.sum(one_hot.to(tl.int32), axis=0)
    _write_layout(counts, padded_starts_ptr, block_experts_ptr, num_padded_ptr, sorted_ids_ptr, max_rows,
                  num_blocks, num_experts, BLOCK_M, BLOCK_E, BLOCK_R, FILL_BLOCK)
    tl.debug_barrier()  # the padded starts and the -1 rows are written before any thread scatters
    _scatter_chunk(offs_p, valid, ids, one_hot, padded_starts_ptr, padded_starts_ptr, sorted_ids_ptr, False)


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, chunk_counts_ptr, num_pairs, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                  PDL: tl.constexpr):
    wait_for_previous(PDL)
    chunk = tl.program_id(0)
    _, _, _, one_hot = _chunk_one_hot(ids_ptr, chunk, num_pairs, BLOCK_P, BLOCK_E)
    counts = tl.sum(one_hot.to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + chunk * BLOCK_E + tl.arange(0, BLOCK_E), counts)


@triton.jit(do_not_specialize=["num_chunks", "max_rows", "num_blocks"])
def _offsets_kernel(chunk_counts_ptr, chunk_offsets_ptr, padded_starts_ptr, block_experts_ptr, num_padded_ptr,
                    sorted_ids_ptr, num_chunks, max_rows, num_blocks, num_experts,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    FILL_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Exclusive prefix sums of the chunk counts over the chunks (BLOCK_C chunks a step), then the layout."""
    wait_for_previous(PDL)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for chunk_start in range(0, num_chunks, BLOCK_C):
        chunks = chunk_start + tl.arange(0, BLOCK_C)
        offsets = chunks[:, None] * BLOCK_E + experts[None, :]
        real = (chunks < num_chunks)[:, None]
        tile = tl.load(chunk_counts_ptr + offsets, mask=real, other=0)
        tl.store(chunk_offsets_ptr + offsets, counts[None, :] + tl.cumsum(tile, axis=0) - tile, mask=real)
        counts += tl.sum(tile, axis=0)
    _write_layout(counts, padded_starts_ptr, block_experts_ptr, num_padded_ptr, sorted_ids_ptr, max_rows,
                  num_blocks, num_experts, BLOCK_M, BLOCK_E, BLOCK_R, FILL_BLOCK)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(ids_ptr, chunk_offsets_ptr, padded_starts_ptr, sorted_ids_ptr, num_pairs,
                    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    chunk = tl.program_id(0)
    offs_p, valid, ids, one_hot = _chunk_one_hot(ids_ptr, chunk, num_pairs, BLOCK_P, BLOCK_E)
    _scatter_chunk(offs_p, valid, ids, one_hot, chunk_offsets_ptr + chunk * BLOCK_E, padded_starts_ptr,
                   sorted_ids_ptr, True)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, expert) pairs by expert and pad each expert's run to a multiple of ``block_m``.

    topk_ids (T, k) int32/int64 (read as they are: no cast launch) with ids in [0, num_experts) ->
    (sorted_pair_ids (R,) int32, block_experts
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
    ids = topk_ids.reshape(-1)
    num_pairs = ids.numel()
    max_rows = reference.max_sorted_rows(num_pairs, num_experts, block_m)
    num_blocks = max_rows // block_m
    block_e = next_power_of_2(num_experts)
    padded_starts = torch.empty(block_e, dtype=torch.int32, device=device)
    sorted_pair_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    block_experts = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_pair_ids, block_experts, num_padded.zero_()
    block_r = max(16, min(1024, _ONE_HOT_ELEMENTS // block_e))
    single_block_p = max(16, min(1024, _SINGLE_ONE_HOT_ELEMENTS // block_e))
    with_pdl = pdl.enabled(device)
    options = dict(PDL=with_pdl, **pdl.launch_options(with_pdl))
    if num_pairs <= single_block_p:  # decode-sized routings: one launch, a one-hot no larger than needed
        _align_single_kernel[(1,)](ids, padded_starts, block_experts, num_padded, sorted_pair_ids, num_pairs,
                                   max_rows, num_blocks, num_experts, BLOCK_M=block_m,
                                   BLOCK_P=max(16, next_power_of_2(num_pairs)),
                                   BLOCK_E=block_e, BLOCK_R=block_r, FILL_BLOCK=_FILL_BLOCK, num_warps=8, **options)
        return sorted_pair_ids, block_experts, num_padded
    block_p = max(16, min(256, _ONE_HOT_ELEMENTS // block_e))  # one variant per model, whatever T is
    num_chunks = cdiv(num_pairs, block_p)
    chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)
    _count_kernel[(num_chunks,)](ids, chunk_counts, num_pairs, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4,
                                 **options)
    _offsets_kernel[(1,)](chunk_counts, chunk_offsets, padded_starts, block_experts, num_padded, sorted_pair_ids,
                          num_chunks, max_rows, num_blocks, num_experts, BLOCK_M=block_m, BLOCK_E=block_e,
                          BLOCK_R=block_r, BLOCK_C=block_r, FILL_BLOCK=_FILL_BLOCK, num_warps=4, **options)
    _scatter_kernel[(num_chunks,)](ids, chunk_offsets, padded_starts, sorted_pair_ids, num_pairs,
                                   BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4, **options)
    return sorted_pair_ids, block_experts, num_padded
