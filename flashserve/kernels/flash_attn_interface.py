"""FlashAttention 2's Python interface for prefill: ``flash_attn_func``, ``flash_attn_qkvpacked_func`` and
``flash_attn_varlen_func`` (with vLLM's paged-KV extensions ``block_table``, ``seqused_k``, ``out`` and
``return_softmax_lse``), running flashserve's Triton kernel or the PyTorch reference (see ``_dispatch``).

Inputs are validated (``ValueError`` naming the argument), never copied: q/k/v and caches may be strided views as
long as their last dimension is contiguous.
"""
import torch

from flashserve.kernels import _validate
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.index_checks import check_varlen_values
from flashserve.kernels.prefill import prefill_attention
from flashserve.kernels.reference.attention import attention_batch
from flashserve.kernels.reference.varlen import attention_varlen

MAX_HEAD_DIM = 256


def check_options(dropout_p, softmax_scale, window_size, softcap):
    _validate.check_dropout(dropout_p)
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    _validate.check_softcap(softcap)
    return _validate.check_window_size(window_size)


def check_qkv(q, k, v, q_ndim, kv_ndim):
    """Rank, dtype, device, last-dim contiguity, head dims and head counts of q, k, v (k and v alike); ``kv_ndim``
    None leaves k's rank to the caller (varlen: packed or paged) and only requires v to have the same."""
    _validate.check_tensor("q", q, q_ndim, _validate.ATTENTION_DTYPES)
    if kv_ndim is None and isinstance(k, torch.Tensor):
        kv_ndim = k.dim()
    for name, tensor in (("k", k), ("v", v)):
        _validate.check_tensor(name, tensor, kv_ndim, (q.dtype,), q.device)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _validate.check_last_dim_contiguous(name, tensor)
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k head dim must equal q's ({head_dim}), got {k.shape[-1]}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"q's head count ({nheads}) must be a multiple of k's ({nheads_k})")


def _check_out(out, q):
    if out is None:
        return
    _validate.check_tensor("out", out, q.dim(), (q.dtype,), q.device)
    _validate.check_shape("out", out, q.shape)
    _validate.check_last_dim_contiguous("out", out)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over a batch of equal-length sequences.

    Supports multi-query and grouped-query attention (MQA/GQA) by passing in k, v with fewer heads than q: the
    number of heads in q must be divisible by the number of heads in k/v; query head ``h`` reads KV head
    ``h // (nheads // nheads_k)``.

    If causal=True, the causal mask is aligned to the bottom right corner of the attention matrix. With
    seqlen_q = 2 and seqlen_k = 5 row 0 sees keys 0..3 and row 1 keys 0..4; with seqlen_q = 5 and seqlen_k = 2
    the first three rows see no key and output zeros.

    If window_size != (-1, -1), sliding-window attention: query i sees keys j with
    ``i + seqlen_k - seqlen_q - window_size[0] <= j <= i + seqlen_k - seqlen_q + window_size[1]``.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), fp16, bf16 or fp32 (fp32 is computed without TF32).
        k: (batch_size, seqlen_k, nheads_k, headdim)
        v: (batch_size, seqlen_k, nheads_k, headdim)
        dropout_p: float. Must be 0.0 (inference library): any other value raises ValueError.
        softmax_scale: float. The scaling of QK^T before applying softmax. Default to 1 / sqrt(headdim).
        causal: bool. Whether to apply a causal attention mask (e.g., for auto-regressive modeling).
        window_size: (left, right). If not (-1, -1), implements sliding window local attention.
        softcap: float. Anything > 0 activates softcapping: scores become softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch_size, nheads), fp32. A bias of
            (-alibi_slope * |i + seqlen_k - seqlen_q - j|) is added to the attention score of query i and key j.
        deterministic: bool. Accepted for compatibility; the forward pass is always deterministic.
        return_attn_probs: bool. Also return the softmax log-sum-exp (the probabilities themselves are not
            materialised: the third element is None).

    Return:
        out: (batch_size, seqlen_q, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q), fp32. The natural-log
            logsumexp of each row of QK^T * scaling (after softcap, bias and mask); -inf for a row with no key.
        S_dmask [optional, if return_attn_probs=True]: None.
    """
    window = check_options(dropout_p, softmax_scale, window_size, softcap)
    check_qkv(q, k, v, 4, 4)
    batch, seqlen_q, nheads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k must have q's batch size {batch}, got shape {tuple(k.shape)}")
    _validate.check_alibi_slopes(alibi_slopes, batch, nheads, q.device)
    if use_triton(q):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
        prefill_attention(q, k, v, out, lse, softmax_scale, causal, window, softcap, alibi_slopes)
    else:
        out, lse = attention_batch(q, k, v, softmax_scale, causal, window, softcap, alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention with q, k and v packed in one tensor (self-attention, nheads_k = nheads).

    Same semantics as ``flash_attn_func``; q, k and v are read in place as strided views of ``qkv``.

    Arguments:
        qkv: (batch_size, seqlen, 3, nheads, headdim).
        Other arguments: as in ``flash_attn_func``.

    Return:
        out: (batch_size, seqlen, nheads, headdim); with return_attn_probs=True also softmax_lse
            (batch_size, nheads, seqlen) fp32 and None.
    """
    _validate.check_tensor("qkv", qkv, 5, _validate.ATTENTION_DTYPES)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def check_varlen_indices(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_table, seqused_k):
    """Index tensors of the varlen call; returns the batch size."""
    device = q.device
    _validate.check_index_tensor("cu_seqlens_q", cu_seqlens_q, 1, device)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q must have at least one element")
    if cu_seqlens_k is not None:
        _validate.check_index_tensor("cu_seqlens_k", cu_seqlens_k, 1, device)
        _validate.check_shape("cu_seqlens_k", cu_seqlens_k, (batch + 1,))
    if seqused_k is not None:
        _validate.check_index_tensor("seqused_k", seqused_k, 1, device)
        _validate.check_shape("seqused_k", seqused_k, (batch,))
    if cu_seqlens_k is None and (seqused_k is None or block_table is None):
        raise ValueError("cu_seqlens_k may only be None with a block_table and seqused_k (paged KV)")
    if block_table is not None:
        _validate.check_index_tensor("block_table", block_table, 2, device)
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows (one per sequence), got {tuple(block_table.shape)}")
        if k.dim() != 4:
            raise ValueError(f"k must be a paged cache (num_blocks, page_size, nheads_k, headdim) with block_table, "
                             f"got shape {tuple(k.shape)}")
        page_size = k.shape[1]
        if page_size < 1:
            raise ValueError(f"k's page size must be >= 1, got {page_size}")
        if block_table.shape[1] * page_size < max_seqlen_k:
            raise ValueError(f"block_table is too short: {block_table.shape[1]} blocks of {page_size} tokens "
                             f"cannot hold max_seqlen_k={max_seqlen_k}")
    elif k.dim() != 3:
        raise ValueError(f"k must have 3 dimensions (total_k, nheads_k, headdim), got shape {tuple(k.shape)}")
    check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table)
    return batch


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, seqused_k=None,
                           out=None, return_softmax_lse=False):
    """Attention over a batch of packed sequences of different lengths, optionally over a paged KV cache.

    Sequence b owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (or the first ``seqused_k[b]`` of them). Masks, GQA, softcap and
    ALiBi are as in ``flash_attn_func``, per sequence (bottom-right aligned with that sequence's lengths).
    Sequences of length zero are allowed.

    Arguments:
        q: (total_q, nheads, headdim), where total_q = total number of query tokens in the batch.
        k: (total_k, nheads_k, headdim), or with block_table a paged cache (num_blocks, page_size, nheads_k,
            headdim), any page_size >= 1; it may be a strided view (e.g. ``kv_buffer[:, 0]``).
        v: like k.
        cu_seqlens_q: (batch_size + 1,), int32. Cumulative query lengths, used to index into q.
        cu_seqlens_k: (batch_size + 1,), int32, cumulative key lengths; may be None when paged with seqused_k.
        max_seqlen_q: int. An upper bound of the query lengths (not checked against them).
        max_seqlen_k: int. An upper bound of the key lengths.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic: as in
            ``flash_attn_func``.
        return_attn_probs: bool. Return ``(out, softmax_lse, None)``.
        block_table: (batch_size, max_num_blocks), int32. Token t of sequence b lives in block
            ``block_table[b, t // page_size]``, row ``t % page_size``.
        seqused_k: (batch_size,), int32. Number of keys of each sequence (vLLM style); overrides cu_seqlens_k's
            lengths.
        out: (total_q, nheads, headdim), q's dtype: written in place and returned.
        return_softmax_lse: bool. Return ``(out, softmax_lse)``.

    The values of the index tensors (cumulative lengths within q and k, ``seqused_k`` within the keys or the
    block table's capacity — that error names ``block_table`` —, block ids within the cache) are checked on the
    host (one synchronisation), except while a CUDA graph is being captured; the kernel clamps lengths to the
    block table and block ids into the cache anyway.

    Return:
        out: (total_q, nheads, headdim).
        softmax_lse [optional]: (nheads, total_q), fp32 natural-log logsumexp of each row (-inf for no key).
    """
    window = check_options(dropout_p, softmax_scale, window_size, softcap)
    check_qkv(q, k, v, 3, None)
    max_seqlen_q = _validate.check_count("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _validate.check_count("max_seqlen_k", max_seqlen_k)
    batch = check_varlen_indices(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_table, seqused_k)
    total_q, nheads, head_dim = q.shape
    _validate.check_alibi_slopes(alibi_slopes, batch, nheads, q.device)
    _check_out(out, q)
    if use_triton(q):
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
        prefill_attention(q, k, v, out, lse, softmax_scale, causal, window, softcap, alibi_slopes,
                          cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, block_table=block_table)
    else:
        result, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window, softcap,
                                       alibi_slopes, block_table, seqused_k)
        if out is None:
            out = result
        else:
            out.copy_(result)
    if return_attn_probs:
        return out, lse, None
    if return_softmax_lse:
        return out, lse
    return out
