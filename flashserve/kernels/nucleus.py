"""``sample``: the batched sampler over given rows of a logits matrix, with per-row temperature, top-k, top-p and
min-p, and the exponential race; see ``flashserve.kernels.sampling`` for the method.

Rows with top-k or top-p ("truncated") take the candidate path: the candidates are sorted (a few thousand per row
at most), the boundary found on them, and the race run over the survivors. The other rows race over the whole row.
The kept set is today's sort-based one (``reference.sample_sorted``) except where logits tie at the boundary: there
every token tied with the last kept one is kept (the sort kept some of them, in an order it does not define).
"""
import torch

from flashserve.kernels import sampling
from flashserve.kernels._launch import upload
from flashserve.kernels.reference import sampling as reference


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

    Returns (R,) int64 token ids. Waits for the device only when some truncated row needs the sort fallback.
    """
    if (streams is None) == (noise is None):
        raise ValueError("sample needs exactly one of streams and noise")
    device = logits.device
    num_rows = len(rows)
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    full = [i for i, t in enumerate(truncated) if not t]
    cut = [i for i, t in enumerate(truncated) if t]
    for part, run in ((full, _race_rows), (cut, _truncated_rows)):
        if not part:
            continue
        everything = len(part) == num_rows
        index = None if everything else upload(part, torch.int64, device)

        def pick(tensor, index=index):
            return tensor if index is None else tensor[index]

        part_rows = upload([rows[i] for i in part], torch.int64, device)
        chosen = run(logits, part_rows, pick(temperature), pick(top_k), pick(top_p), pick(min_p),
                     None if streams is None else pick(streams), None if noise is None else pick(noise),
                     capacity)
        if everything:
            return chosen
        tokens[index] = chosen
    return tokens


def _race_rows(logits, rows, temperature, top_k, top_p, min_p, streams, noise, capacity) -> torch.Tensor:
    """Rows without top-k / top-p: the race over every token (min-p applied)."""
    if streams is not None:
        return sampling.race_full_rows(logits, rows, temperature, min_p, streams)
    probs = torch.softmax(logits[rows] / temperature.unsqueeze(1), dim=-1)
    probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
    return (probs / noise).argmax(dim=-1)


def _truncated_rows(logits, rows, temperature, top_k, top_p, min_p, streams, noise, capacity) -> torch.Tensor:
    """Rows with top-k or top-p: the candidate path, and the sort for the rows it cannot decide."""
    vocab = logits.shape[1]
    values, indices, count, row_max, mass = sampling.gather_candidates(logits, rows, temperature, capacity)
    values, order = values.sort(dim=1, descending=True)
    indices = indices.gather(1, order)
    weights = torch.exp(values - row_max.unsqueeze(1))
    ranks = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    valid = ranks < count.unsqueeze(1)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    top_k_active = k < vocab
    in_k = valid & (ranks < k.unsqueeze(1))
    kept_weights = weights * in_k
    normaliser = torch.where(top_k_active, kept_weights.sum(dim=1), mass).unsqueeze(1)
    mass_before = (kept_weights.cumsum(dim=1) - kept_weights) / normaliser
    p = top_p.unsqueeze(1)
    kept = in_k & ((mass_before < p) | (ranks == 0) | (p >= 1.0))
    boundary = values.gather(1, (kept.sum(dim=1, keepdim=True) - 1).clamp(min=0))
    survivors = valid & (values >= boundary) & (weights >= min_p.unsqueeze(1))
    draws = sampling.exponential_at(streams, indices) if streams is not None else noise.gather(1, indices)
    ratio = torch.where(survivors, weights / draws, torch.zeros_like(weights))
    tokens = indices.gather(1, ratio.argmax(dim=1, keepdim=True)).squeeze(1)
    candidate_mass = (weights * valid).sum(dim=1)
    fallback = (count > values.shape[1]) | (top_k_active & (count < k)) | \
        (~top_k_active & (count < vocab) & (candidate_mass < top_p * mass))
    if bool(fallback.any()):
        where = fallback.nonzero().squeeze(1)
        columns = torch.arange(vocab, device=logits.device).expand(where.shape[0], -1)
        row_noise = sampling.exponential_at(streams[where], columns) if streams is not None else noise[where]
        tokens[where] = reference.sample_sorted(logits[rows[where]], temperature[where], top_k[where],
                                                top_p[where], min_p[where], row_noise)
    return tokens
