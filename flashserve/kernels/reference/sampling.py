"""Plain-PyTorch references of the sampling kernels (``flashserve.kernels.sampling``): the CPU path and the oracle.

- ``philox4x32``: the Philox4x32-10 counter-based generator (Salmon et al. 2011), in int64 arithmetic;
- ``exponential_at``: the Exp(1) draws that ``torch.Tensor.exponential_`` on CUDA writes at given positions;
- ``block_stats``: per block of tokens, the largest scaled logit and the softmax sum below it;
- ``gather_candidates``: every token whose scaled logit reaches a per-row cutoff;
- ``row_cutoffs`` and ``select_candidates``: the rows' maxima, normalisers and candidate cutoffs; top-k / top-p /
  min-p on the sorted candidates and the race over the survivors;
- ``race_blocks``: the exponential race ``argmax(p / q)`` within each block of tokens;
- ``sample_sorted``: the sort-based top-k / top-p / min-p sampler the kernels replace, exact by construction.
"""
import math

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_TWO_POW_M32 = 2.0 ** -32
_ONE_MINUS_HALF_EPS = 1.0 - 2.0 ** -24  # float32: 1 - eps / 2, where torch's transform stops taking the log
# tensors of the row streams (see flashserve.kernels.sampling.NoiseStreams): seed, counter, element base, stride
SEED, COUNTER, BASE, STRIDE = range(4)
LOG_WIN_MARGIN = -26 * math.log(2.0)  # a draw is >= 2^-24: a token of weight w * 2^26 < best cannot win


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values ``b`` (int64)."""
    low = (b * a) & _MASK32  # int64 products wrap; the low word is exact
    high = ((b * (a >> 16)) + ((b * (a & 0xFFFF)) >> 16)) >> 16
    return high & _MASK32, low


def philox4x32(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the 64-bit key ``seed`` (all int64 tensors holding
    uint32 words, the seed as a two's-complement uint64); returns the four output words (int64)."""
    key0, key1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        high0, low0 = _mulhilo(_ROUND_A, c0)
        high1, low1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = high1 ^ c1 ^ key0, low1, high0 ^ c3 ^ key1, low0
        key0, key1 = (key0 + _KEY_A) & _MASK32, (key1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def exponential_at(streams: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The Exp(1) draws of ``exponential_`` on CUDA at the given positions of each row's stream.

    Args:
        streams: (R, 4) int64, per row (seed, Philox counter, element base, thread stride): the row's draws are
            elements ``base + token`` of one ``exponential_`` call whose generator had that seed and counter
            (its offset / 4), launched with that many threads (see ``flashserve.kernels.sampling``).
        token_ids: (R, K) int64 positions in the row.

    Returns (R, K) float32: element e of the call is component ``(e // stride) % 4`` of Philox at counter
    ``(counter + e // (4 * stride), thread e % stride)``; u = x * 2^-32 + 2^-33 in (0, 1]; the draw is -log(u)
    (-(-eps/2) for u >= 1 - eps/2), as torch's curand path computes it.
    """
    streams = streams.to(torch.int64)
    element = streams[:, BASE:BASE + 1] + token_ids.to(torch.int64)
    stride = streams[:, STRIDE:STRIDE + 1]
    thread, quotient = element % stride, element // stride
    counter = streams[:, COUNTER:COUNTER + 1] + quotient // 4
    seed = streams[:, SEED:SEED + 1].expand_as(element)
    words = philox4x32(seed, counter & _MASK32, (counter >> 32) & _MASK32, thread & _MASK32, thread >> 32)
    component = quotient % 4
    bits = torch.where(component == 0, words[0], torch.where(component == 1, words[1],
                                                             torch.where(component == 2, words[2], words[3])))
    uniform = bits.to(torch.float32) * _TWO_POW_M32 + _TWO_POW_M32 / 2
    log = torch.where(uniform >= _ONE_MINUS_HALF_EPS, torch.full_like(uniform, -2.0 ** -24), torch.log(uniform))
    return -log


def block_stats(logits: torch.Tensor, temperature: torch.Tensor, block: int,
                sub_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of ``block`` consecutive tokens of each row: the largest scaled logit ``x = logits / temperature``
    and the sum of exp(x - that largest); (R, V) -> two (R, ceil(V / block)) float32. Third, the largest x of each
    sub-block of ``sub_block`` tokens (a divisor of ``block``), (R, ceil(V / block) * block / sub_block) float32,
    -inf past the vocabulary."""
    scaled = logits.float() / temperature.unsqueeze(1)
    num_blocks = -(-scaled.shape[1] // block)
    padded = torch.nn.functional.pad(scaled, (0, num_blocks * block - scaled.shape[1]), value=float("-inf"))
    sub_block_max = padded.view(scaled.shape[0], -1, sub_block).amax(dim=2)
    padded = padded.view(scaled.shape[0], num_blocks, block)
    block_max = padded.amax(dim=2)
    return block_max, torch.exp(padded - block_max.unsqueeze(2)).sum(dim=2), sub_block_max


def gather_candidates(logits: torch.Tensor, temperature: torch.Tensor, cutoff: torch.Tensor, capacity: int):
    """Tokens whose scaled logit ``x = logits / temperature`` is >= the row's ``cutoff`` ((R,) float32).

    Returns values (R, capacity) float32 (the candidates' x, -inf past the count), indices (R, capacity) int64
    (their token ids, 0 past the count) and count (R,) int32 (how many tokens qualified, possibly > capacity: then
    the buffers hold an arbitrary subset). The order of the candidates within a row is unspecified.
    """
    scaled = logits.float() / temperature.unsqueeze(1)
    qualifies = scaled >= cutoff.unsqueeze(1)
    count = qualifies.sum(dim=1).to(torch.int32)
    keyed = torch.where(qualifies, scaled, torch.full_like(scaled, float("-inf")))
    width = min(capacity, scaled.shape[1])
    values, indices = keyed.topk(width, dim=1)
    values = torch.nn.functional.pad(values, (0, capacity - width), value=float("-inf"))
    indices = torch.nn.functional.pad(indices, (0, capacity - width))
    return values, torch.where(values == float("-inf"), torch.zeros_like(indices), indices), count


def race_blocks(logits: torch.Tensor, temperature: torch.Tensor, row_max: torch.Tensor, floor: torch.Tensor,
                bound: torch.Tensor, streams: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential race per block: for each block of ``block`` tokens, the largest ``exp(x - row_max) / q`` over
    its tokens with ``x >= floor`` and ``x >= bound`` (q from ``exponential_at``; -1 where none) and the token that
    has it; (R, V) -> two (R, ceil(V / block)) tensors (float32, int64). (The kernel skips only whole blocks below
    ``bound``: tokens below it, which cannot win, may still count there.)"""
    scaled = logits.float() / temperature.unsqueeze(1)
    vocab = scaled.shape[1]
    columns = torch.arange(vocab, device=logits.device).expand(scaled.shape[0], -1)
    ratio = torch.exp(scaled - row_max.unsqueeze(1)) / exponential_at(streams, columns)
    eligible = (scaled >= floor.unsqueeze(1)) & (scaled >= bound.unsqueeze(1))
    ratio = torch.where(eligible, ratio, torch.full_like(ratio, -1.0))
    num_blocks = -(-vocab // block)
    ratio = torch.nn.functional.pad(ratio, (0, num_blocks * block - vocab), value=-1.0)
    best, where = ratio.view(scaled.shape[0], num_blocks, block).max(dim=2)
    return best, where + torch.arange(num_blocks, device=logits.device) * block


def row_cutoffs(block_max: torch.Tensor, block_sum: torch.Tensor, top_k: torch.Tensor, vocab: int, capacity: int):
    """From ``block_stats``: each row's largest scaled logit and softmax sum, and its candidate cutoff — for a
    top-k row (0 < k <= number of blocks) the k-th largest block maximum (at least k tokens reach it), otherwise
    the scaled logit of probability 1 / capacity (at most ``capacity`` tokens reach it), never above the maximum.
    Returns three (R,) float32: row_max, mass, cutoff."""
    row_max = block_max.amax(dim=1)
    mass = (block_sum * torch.exp(block_max - row_max.unsqueeze(1))).sum(dim=1)
    num_blocks = block_max.shape[1]
    k = top_k.clamp(min=1, max=num_blocks)
    kth = block_max.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
    by_mass = torch.minimum(row_max + torch.log(mass / capacity), row_max)
    return row_max, mass, torch.where((top_k > 0) & (top_k < vocab) & (top_k <= num_blocks), kth, by_mass)


def select_candidates(values: torch.Tensor, indices: torch.Tensor, count: torch.Tensor, row_max: torch.Tensor,
                      mass: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                      draws: torch.Tensor, vocab: int):
    """Top-k, top-p and min-p on each row's candidates sorted in descending order (``values``/``indices``
    (R, C), ``count`` valid), then the race over the survivors with the Exp(1) ``draws`` at the candidates.

    A row is truncated when 0 < top_k < vocab or top_p < 1; every token tied with its last kept candidate is kept.
    Returns token (R,) int64 (the race's winner), best (R,) float32 (its ratio), floor (R,) (min-p: x >= floor is
    kept), bound (R,) (untruncated rows: tokens with x < bound cannot beat ``best``; +inf for truncated rows) and
    fallback (R,) bool (truncated rows whose boundary the candidates do not determine).
    """
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
    truncated = top_k_active | (top_p < 1.0)
    boundary = torch.where(truncated, torch.where(kept, values, torch.full_like(values, float("inf"))).amin(dim=1),
                           torch.full_like(row_max, float("-inf")))
    floor = row_max + torch.log(min_p)
    survivors = valid & (values >= boundary.unsqueeze(1)) & (values >= floor.unsqueeze(1))
    best, choice = torch.where(survivors, weights / draws, torch.full_like(weights, -1.0)).max(dim=1)
    token = indices.gather(1, choice.unsqueeze(1)).squeeze(1)
    bound = torch.where(truncated, torch.full_like(best, float("inf")), row_max + torch.log(best) + LOG_WIN_MARGIN)
    candidate_mass = (weights * valid).sum(dim=1)
    fallback = truncated & ((count > values.shape[1]) | (top_k_active & (count < k))
                            | (~top_k_active & (count < vocab) & (candidate_mass < top_p * mass)))
    return token, best, floor, bound, fallback


def sample_sorted(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The sort-based sampler: divide by the temperature, keep each row's ``top_k`` largest (0: all) and its
    smallest prefix whose softmax mass reaches ``top_p``, drop tokens below ``min_p`` times the largest
    probability, and race ``argmax(p / noise)``. (R, V) float32 logits and (R, V) Exp(1) noise -> (R,) int64."""
    vocab = logits.shape[1]
    logits = logits / temperature.unsqueeze(1)
    if bool(((top_k > 0) & (top_k < vocab)).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        p = top_p.unsqueeze(1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill((mass_before >= p) & (ranks > 0) & (p < 1.0), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
    return (probs / noise).argmax(dim=-1)
