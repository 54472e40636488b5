"""``sample``: the batched sampler over given rows of a logits matrix, with per-row temperature, top-k, top-p and
min-p, and the exponential race, without sorting the vocabulary; see ``flashserve.kernels.sampling``.

The kept set is today's sort-based one (``reference.sample_sorted``) except where logits tie at the boundary: there
every token tied with the last kept one is kept (the sort kept some of them, in an order it does not define).
"""
import math

import torch

from flashserve.kernels import sampling
from flashserve.kernels._launch import upload
from flashserve.kernels.reference import sampling as reference

_LOG_WIN_MARGIN = -26 * math.log(2.0)  # an Exp(1) draw of torch's is >= 2^-24: weight * 2^26 < best cannot win


def sample(logits: torch.Tensor, rows: list[int], temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, truncated: list[bool], streams: torch.Tensor | None = None,
           noise: torch.Tensor | None = None, capacity: int = sampling.DEFAULT_CAPACITY) -> torch.Tensor:
    """Sample one token for each of ``rows`` of ``logits``.

    Args:
        logits: (N, V) float32.
        rows: the R rows of ``logits`` to sample (host list).
        temperature, top_k, top_p, min_p: (R,) device tensors (float32; top_k int64, 0 or >= V disables it).
        truncated: per row (host list), whether top-k (< V) or top-p (< 1) is active.
        streams: (R, 4) int64 Philox streams of the rows' noise (``sampling.exponential_at``), or None;
        noise: otherwise (R, V) float32 Exp(1) draws, one row per sampled row.
        capacity: candidate slots per row (at most 4096 keeps their sort within one thread block).

    Returns (R,) int64 token ids. Waits for the device only when some truncated row needs the sort fallback.
    """
    if (streams is None) == (noise is None):
        raise ValueError("sample needs exactly one of streams and noise")
    device, vocab = logits.device, logits.shape[1]
    if noise is not None and not any(truncated):
        return _race_dense(logits[rows] if len(rows) < logits.shape[0] else logits, temperature, min_p, noise)
    row_index = upload(rows, torch.int64, device)
    block_max, block_sum = sampling.block_stats(logits, row_index, temperature)
    row_max = block_max.amax(dim=1)
    mass = (block_sum * torch.exp(block_max - row_max.unsqueeze(1))).sum(dim=1)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    top_k_active = k < vocab
    # Candidates: for top-k rows every token >= the k-th largest block maximum (at least k tokens, the top k among
    # them); for the others every token of probability >= 1 / capacity (at most capacity of them).
    num_blocks = block_max.shape[1]
    kth_block_max = block_max.sort(dim=1, descending=True).values.gather(
        1, (k.clamp(max=num_blocks) - 1).unsqueeze(1)).squeeze(1)
    cutoff = torch.where(top_k_active & (k <= num_blocks), kth_block_max,
                         torch.minimum(row_max + torch.log(mass / capacity), row_max))  # the top token always
    values, indices, count = sampling.gather_candidates(logits, row_index, temperature, cutoff, block_max, capacity)
    values, order = values.sort(dim=1, descending=True)
    indices = indices.gather(1, order)
    weights = torch.exp(values - row_max.unsqueeze(1))
    ranks = torch.arange(capacity, device=device).unsqueeze(0)
    valid = ranks < count.unsqueeze(1)
    in_k = valid & (ranks < k.unsqueeze(1))
    kept_weights = weights * in_k
    normaliser = torch.where(top_k_active, kept_weights.sum(dim=1), mass).unsqueeze(1)
    mass_before = (kept_weights.cumsum(dim=1) - kept_weights) / normaliser
    p = top_p.unsqueeze(1)
    kept = in_k & ((mass_before < p) | (ranks == 0) | (p >= 1.0))
    is_truncated = top_k_active | (top_p < 1.0)
    boundary = torch.where(is_truncated.unsqueeze(1), values.gather(1, (kept.sum(dim=1, keepdim=True) - 1)),
                           torch.full_like(row_max, float("-inf")).unsqueeze(1))
    floor = row_max + torch.log(min_p)  # min-p keeps x >= max + log(min_p), i.e. p >= min_p * max p
    survivors = valid & (values >= boundary) & (values >= floor.unsqueeze(1))
    draws = sampling.exponential_at(streams, indices) if streams is not None else noise.gather(1, indices)
    best, choice = torch.where(survivors, weights / draws, torch.full_like(weights, -1.0)).max(dim=1)
    tokens = indices.gather(1, choice.unsqueeze(1)).squeeze(1)
    if not all(truncated):
        tokens = _race_rest(logits, row_index, temperature, row_max, floor, best, tokens, block_max, is_truncated,
                            streams, noise, min_p)
    candidate_mass = (weights * valid).sum(dim=1)
    fallback = is_truncated & ((count > capacity) | (top_k_active & (count < k))
                               | (~top_k_active & (count < vocab) & (candidate_mass < top_p * mass)))
    if bool(fallback.any()):
        where = fallback.nonzero().squeeze(1)
        columns = torch.arange(vocab, device=device).expand(where.shape[0], -1)
        row_noise = sampling.exponential_at(streams[where], columns) if streams is not None else noise[where]
        tokens[where] = reference.sample_sorted(logits[row_index[where]], temperature[where], top_k[where],
                                                top_p[where], min_p[where], row_noise)
    return tokens


def _race_dense(logits, temperature, min_p, noise) -> torch.Tensor:
    """The race over whole rows with drawn noise (rows without top-k / top-p), as the sort-based sampler does it."""
    probs = torch.softmax(logits / temperature.unsqueeze(1), dim=-1)
    probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
    return (probs / noise).argmax(dim=-1)


def _race_rest(logits, row_index, temperature, row_max, floor, best, tokens, block_max, is_truncated, streams,
               noise, min_p) -> torch.Tensor:
    """Rows without top-k / top-p: every token may win, so beyond the candidates (whose best ratio is ``best``)
    race the blocks holding a token that could beat it; truncated rows keep ``tokens``."""
    if noise is not None:
        dense = _race_dense(logits[row_index], temperature, min_p, noise)
        return torch.where(is_truncated, tokens, dense)
    bound = torch.where(is_truncated, torch.full_like(best, float("inf")),
                        row_max + torch.log(best) + _LOG_WIN_MARGIN)
    block_best, block_token = sampling.race_blocks(logits, row_index, temperature, row_max, floor, streams,
                                                   block_max, bound)
    rest_best, where = block_best.max(dim=1)
    return torch.where(rest_best > best, block_token.gather(1, where.unsqueeze(1)).squeeze(1), tokens)
