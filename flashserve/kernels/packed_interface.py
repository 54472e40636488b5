"""FlashAttention 2's packed forms beside ``flash_attn_qkvpacked_func``: ``flash_attn_kvpacked_func``,
``flash_attn_varlen_kvpacked_func`` and ``flash_attn_varlen_qkvpacked_func``.

Each takes keys and values (and queries) stacked along one dimension of a single tensor, reads them as strided
views of it (never copies) and runs the unpacked function with the same options and semantics.
"""
import torch

from flashserve.kernels import _validate
from flashserve.kernels.flash_attn_interface import flash_attn_func, flash_attn_varlen_func


def _unpack(name: str, packed, ndim: int, parts: int, layout: str) -> tuple[torch.Tensor, ...]:
    """The ``parts`` views of ``packed`` along its dimension ``ndim - 3``; ValueError naming ``name`` otherwise."""
    _validate.check_tensor(name, packed, ndim, _validate.ATTENTION_DTYPES)
    if packed.shape[ndim - 3] != parts:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(ndim - 3)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` with k and v packed in one tensor (MQA/GQA allowed).

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim).
        kv: (batch_size, seqlen_k, 2, nheads_k, headdim): ``kv[:, :, 0]`` are the keys, ``kv[:, :, 1]`` the
            values.
        Other arguments: as in ``flash_attn_func``.

    Return:
        out: (batch_size, seqlen_q, nheads, headdim); with return_attn_probs=True also softmax_lse
            (batch_size, nheads, seqlen_q) fp32 and None.
    """
    k, v = _unpack("kv", kv, 5, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_varlen_func`` with k and v packed in one tensor.

    Arguments:
        q: (total_q, nheads, headdim).
        kv: (total_k, 2, nheads_k, headdim): ``kv[:, 0]`` are the keys, ``kv[:, 1]`` the values.
        cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32 cumulative lengths.
        max_seqlen_q, max_seqlen_k: bounds of the per-sequence lengths.
        Other arguments: as in ``flash_attn_varlen_func``.

    Return:
        out: (total_q, nheads, headdim); with return_attn_probs=True also softmax_lse (nheads, total_q) fp32 and
            None.
    """
    k, v = _unpack("kv", kv, 4, 2, "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn_varlen_func`` for self-attention with q, k and v packed in one tensor (nheads_k = nheads).

    Arguments:
        qkv: (total, 3, nheads, headdim).
        cu_seqlens: (batch_size + 1,) int32 cumulative lengths (of queries and keys alike).
        max_seqlen: a bound of the per-sequence lengths.
        Other arguments: as in ``flash_attn_varlen_func``.

    Return:
        out: (total, nheads, headdim); with return_attn_probs=True also softmax_lse (nheads, total) fp32 and None.
    """
    q, k, v = _unpack("qkv", qkv, 4, 3, "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
