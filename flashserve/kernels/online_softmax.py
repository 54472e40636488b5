"""The online-softmax update of FlashAttention's forward pass, one key tile at a time, in base 2: the step the
portable prefill kernel (``prefill``) and the Hopper TMA one (``prefill_tma``) share."""
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, qk_scale, RAW_SCORES: tl.constexpr, MASKED: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running state of a block of query rows.

    acc (BLOCK_M, D) float32 the unnormalised output, l_i (BLOCK_M,) the softmax denominators, m_i (BLOCK_M,) the
    running row maxima, all in log2 units; s (BLOCK_M, BLOCK_N) the tile's scores, -inf where a key is masked:
    raw q·k with ``RAW_SCORES`` (scaled by ``qk_scale`` = softmax scale * log2(e) inside the exponent's FMA), else
    already scaled; v (BLOCK_N, D) the tile's values. ``MASKED``: a row may have seen no key yet (its maximum still
    -inf), so the exponents are taken against 0 instead. Returns the new (acc, l_i, m_i).
    """
    if RAW_SCORES:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    if RAW_SCORES:
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new
