"""``sample``: the batched sampler over given rows of a logits matrix, with per-row temperature, top-k, top-p and
min-p, and the exponential race, without sorting the vocabulary; see ``flashserve.kernels.sampling`` (and
``flashserve.kernels.race`` for the rows without top-k / top-p).

The kept set is today's sort-based one (``reference.sample_sorted``) except where logits tie at the boundary: there
every token tied with the last kept one is kept (the sort kept some of them, in an order it does not define).
"""
import torch

from flashserve.kernels import philox, race, sampling, selection
from flashserve.kernels._launch import upload
from flashserve.kernels.reference import sampling as reference


def sample(logits: torch.Tensor, rows: list[int], temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, truncated: list[bool], streams: torch.Tensor | None = None,
           noise: torch.Tensor | None = None, capacity: int = sampling.DEFAULT_CAPACITY,
           shared: race.SharedStream | None = None) -> torch.Tensor:
    """Sample one token for each of ``rows`` of ``logits``.

    Args:
        logits: (N, V) float32.
        rows: the R rows of ``logits`` to sample (host list).
        temperature, top_k, top_p, min_p: (R,) device tensors (float32; top_k int64, 0 or >= V disables it).
        truncated: per row (host list), whether top-k (< V) or top-p (< 1) is active.
        streams: (R, 4) int64 Philox streams of the rows' noise (``philox.exponential_at``), or None;
        noise: otherwise (R, V) float32 Exp(1) draws, one row per sampled row.
        capacity: candidate slots per row (at most 4096 keeps their sort within one thread block).
        shared: with streams, the rows that draw from one shared ``exponential_`` call (``race.SharedStream``):
            their dense race computes each Philox call once.

    Returns (R,) int64 token ids. Rows with top-k / top-p wait for the device once (a check for the sort fallback);
    batches without them never wait.
    """
    if (streams is None) == (noise is None):
        raise ValueError("sample needs exactly one of streams and noise")
    row_index = upload(rows, torch.int64, logits.device)
    tokens, fallback = sample_without_fallback(logits, row_index, temperature, top_k, top_p, min_p, truncated,
                                               streams, noise, capacity, shared)
    if fallback is not None and bool(fallback.any()):
        where = fallback.nonzero().squeeze(1)
        columns = torch.arange(logits.shape[1], device=logits.device).expand(where.shape[0], -1)
        row_noise = philox.exponential_at(streams[where], columns) if streams is not None else noise[where]
        tokens[where] = reference.sample_sorted(logits[row_index[where]], temperature[where], top_k[where],
                                                top_p[where], min_p[where], row_noise)
    return tokens


def sample_without_fallback(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor,
                            top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                            truncated: list[bool] | None, streams: torch.Tensor | None, noise: torch.Tensor | None,
                            capacity: int = sampling.DEFAULT_CAPACITY, shared: race.SharedStream | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sample`` up to the fallback, on ``row_index`` ((R,) int64 device rows): the tokens, and None or the (R,)
    bool rows whose token must come from the sort instead. Never waits for the device, so it can be captured in a
    CUDA graph (with streams, noise or row_index of fixed addresses). ``truncated`` None (streams only): the host
    does not know which rows are truncated (a graph for any options): every stage runs, and the fallback flags are
    always returned."""
    device, vocab = logits.device, logits.shape[1]
    # the kernels index the per-row options as dense vectors (a no-op for contiguous ones)
    temperature, top_k, top_p, min_p = (t.contiguous() for t in (temperature, top_k, top_p, min_p))
    if truncated is None and streams is None:
        raise ValueError("sample_without_fallback with truncated=None needs streams")
    some_truncated = truncated is None or any(truncated)
    if noise is not None and not some_truncated:
        whole = row_index.shape[0] == logits.shape[0]
        return _race_dense(logits if whole else logits[row_index], temperature, min_p, noise), None
    block_max, block_sum, sub_block_max = sampling.block_stats(logits, row_index, temperature)
    row_max, mass, cutoff = selection.row_cutoffs(block_max, block_sum, top_k, vocab, capacity)
    values, indices, count = sampling.gather_candidates(logits, row_index, temperature, cutoff, sub_block_max,
                                                        capacity)
    tokens, best, floor, bound, fallback = selection.select_candidates(
        values, indices, count, row_max, mass, top_k, top_p, min_p, vocab, streams, noise)
    if truncated is None or not all(truncated):
        if noise is not None:
            dense = _race_dense(logits[row_index], temperature, min_p, noise)
            tokens = torch.where(torch.tensor(truncated, device=device), tokens, dense)
        else:
            tokens = race.race_rest(logits, row_index, temperature, row_max, floor, bound, streams, block_max,
                                    tokens, best, sub_block_max, shared)
    return tokens, fallback if some_truncated else None


def _race_dense(logits, temperature, min_p, noise) -> torch.Tensor:
    """The race over whole rows with drawn noise (rows without top-k / top-p), as the sort-based sampler does it."""
    probs = torch.softmax(logits / temperature.unsqueeze(1), dim=-1)
    probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
    return (probs / noise).argmax(dim=-1)


def agrees_with_the_sort(device: torch.device, vocab: int = 5000) -> bool:
    """Whether ``sample`` gives the sort-based sampler's tokens on ``device`` for a small batch of every kind of
    row (top-p, top-k, both, min-p, temperature only), noise computed from streams and drawn; a start-up check."""
    generator = torch.Generator(device=device).manual_seed(1)
    num_rows = 12
    logits = torch.randn(num_rows, vocab, device=device, generator=generator) * 4
    settings = [(1.0, 0, 0.9, 0.0), (0.7, 20, 0.8, 0.0), (1.0, 50, 1.0, 0.0), (0.8, 0, 1.0, 0.0),
                (1.0, 0, 1.0, 0.1), (1.3, 5, 0.95, 0.05)]
    columns = [[setting[j] for setting in settings] * 2 for j in range(4)]
    temperature, top_p, min_p = (torch.tensor(columns[j], device=device) for j in (0, 2, 3))
    top_k = torch.tensor(columns[1], device=device)
    truncated = [0 < k < vocab or p < 1.0 for k, p in zip(columns[1], columns[2])]
    streams = torch.tensor([[1234 + r, 4 * r, r * vocab, 4096] for r in range(num_rows)], device=device)
    noise = philox.exponential_at(streams, torch.arange(vocab, device=device).expand(num_rows, -1).contiguous())
    expected = reference.sample_sorted(logits, temperature, top_k, top_p, min_p, noise)
    rows = list(range(num_rows))
    return all(torch.equal(sample(logits, rows, temperature, top_k, top_p, min_p, truncated, **source), expected)
               for source in ({"streams": streams}, {"noise": noise}))
