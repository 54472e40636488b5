"""Plain-PyTorch attention: the CPU path and the test oracle of the attention kernels.

Everything is written for clarity, not speed. Conventions follow FlashAttention (see SEMANTICS.md in the shared
notes): (seqlen, nheads, headdim) layouts, bottom-right aligned causal masks and windows, softcap on the scaled
scores, ALiBi bias ``-slope * |i + seqlen_k - seqlen_q - j|``, GQA by ``h // (H // Hk)``, and a natural-log LSE in
fp32. Rows that see no key give zeros and LSE ``-inf``.
"""
import math

import torch


def attention_mask(seqlen_q: int, seqlen_k: int, causal: bool, window_size: tuple[int, int], device) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) mask, True where query row ``i`` may see key ``j``.

    Row ``i`` is aligned to key ``i + seqlen_k - seqlen_q`` (bottom right); ``window_size = (left, right)`` bounds
    the visible keys on each side of that diagonal, -1 meaning unbounded; ``causal`` is ``right = 0``.
    """
    left, right = window_size
    if causal:
        right = 0
    row = torch.arange(seqlen_q, device=device).view(-1, 1) + (seqlen_k - seqlen_q)
    col = torch.arange(seqlen_k, device=device).view(1, -1)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= col <= row + right
    if left >= 0:
        visible &= col >= row - left
    return visible


def masked_scores(q: torch.Tensor, k: torch.Tensor, softmax_scale: float | None, causal: bool,
                  window_size: tuple[int, int], softcap: float, alibi_slopes: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """The (B, H, Sq, Sk) attention scores in ``dtype``: scaled, softcapped, ALiBi-biased, -inf where masked.
    q (B, Sq, H, D), k (B, Sk, Hk, D)."""
    seqlen_q, nheads, head_dim = q.shape[1:]
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    qt = q.to(dtype).transpose(1, 2)  # (B, H, Sq, D)
    kt = k.to(dtype).repeat_interleave(nheads // nheads_k, dim=2).transpose(1, 2)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).view(-1, nheads, 1, 1) if alibi_slopes.dim() == 2 else \
            alibi_slopes.to(dtype).view(1, nheads, 1, 1)
        row = torch.arange(seqlen_q, device=q.device).view(-1, 1) + (seqlen_k - seqlen_q)
        col = torch.arange(seqlen_k, device=q.device).view(1, -1)
        scores = scores - slopes * (row - col).abs().to(dtype)
    visible = attention_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    return scores.masked_fill(~visible, float("-inf"))


def attention_batch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over equal-length sequences.

    Args:
        q: (B, Sq, H, D). k, v: (B, Sk, Hk, D) with ``H % Hk == 0``.
        alibi_slopes: None, (H,) or (B, H), fp32.
        upcast: compute in fp32 (the oracle); False keeps the input precision (the "same math in the input
            precision" baseline of FlashAttention's acceptance rule).

    Returns:
        out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32.
    """
    dtype = torch.float32 if upcast else q.dtype
    scores = masked_scores(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, dtype)
    vt = v.to(dtype).repeat_interleave(q.shape[2] // k.shape[2], dim=2).transpose(1, 2)
    lse = torch.logsumexp(scores.float(), dim=-1)  # (B, H, Sq)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    out = torch.matmul(probs.to(dtype), vt).transpose(1, 2)
    return out.to(q.dtype), lse
