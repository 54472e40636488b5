"""Plain-PyTorch references of the sampling kernels (``flashserve.kernels.sampling``): the CPU path and the oracle.

- ``philox4x32``: the Philox4x32-10 counter-based generator (Salmon et al. 2011), in int64 arithmetic;
- ``exponential_at``: the Exp(1) draws that ``torch.Tensor.exponential_`` on CUDA writes at given positions;
- ``gather_candidates``: every token whose scaled logit is within ``depth`` of the row's maximum, and the row's
  softmax normaliser;
- ``race_full_rows``: the exponential race ``argmax(p / q)`` over whole rows (no top-k / top-p);
- ``sample_sorted``: the sort-based top-k / top-p / min-p sampler the kernels replace, exact by construction.
"""
import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_TWO_POW_M32 = 2.0 ** -32
_ONE_MINUS_HALF_EPS = 1.0 - 2.0 ** -24  # float32: 1 - eps / 2, where torch's transform stops taking the log
# tensors of the row streams (see flashserve.kernels.sampling.NoiseStreams): seed, counter, element base, stride
SEED, COUNTER, BASE, STRIDE = range(4)


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


def gather_candidates(logits: torch.Tensor, temperature: torch.Tensor, depth: float, capacity: int):
    """Tokens whose scaled logit ``x = logits / temperature`` is >= max(x) - ``depth``, and each row's softmax sum.

    Args:
        logits: (R, V) float.
        temperature: (R,) float32 > 0.
        depth: how far below the row's maximum (in scaled-logit units) candidates reach.
        capacity: columns of the candidate buffers.

    Returns:
        values (R, capacity) float32 (the candidates' x, -inf past the count), indices (R, capacity) int64 (their
        token ids, 0 past the count), count (R,) int32 (how many tokens qualified, possibly > capacity: then the
        buffers hold an arbitrary subset), row_max (R,) float32 (max x) and mass (R,) float32 (sum of exp(x - max)).
        The order of the candidates within a row is unspecified (the kernel's depends on scheduling).
    """
    scaled = logits.float() / temperature.unsqueeze(1)
    row_max = scaled.amax(dim=1)
    mass = torch.exp(scaled - row_max.unsqueeze(1)).sum(dim=1)
    qualifies = scaled >= (row_max - depth).unsqueeze(1)
    count = qualifies.sum(dim=1).to(torch.int32)
    keyed = torch.where(qualifies, scaled, torch.full_like(scaled, float("-inf")))
    width = min(capacity, scaled.shape[1])
    values, indices = keyed.topk(width, dim=1)
    values, indices = torch.nn.functional.pad(values, (0, capacity - width), value=float("-inf")), \
        torch.nn.functional.pad(indices, (0, capacity - width))
    indices = torch.where(values == float("-inf"), torch.zeros_like(indices), indices)
    return values, indices, count, row_max, mass


def race_full_rows(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor,
                   streams: torch.Tensor) -> torch.Tensor:
    """argmax over every token of ``exp(x - max x) / q`` with q from ``exponential_at`` (tokens with exp(x - max)
    below ``min_p`` excluded); (R, V) -> (R,) int64."""
    scaled = logits.float() / temperature.unsqueeze(1)
    weight = torch.exp(scaled - scaled.amax(dim=1, keepdim=True))
    weight = weight.masked_fill(weight < min_p.unsqueeze(1), 0.0)
    columns = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return (weight / exponential_at(streams, columns)).argmax(dim=1)


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
