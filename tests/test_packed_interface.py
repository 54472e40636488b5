"""The packed forms (kv packed, varlen kv packed, varlen qkv packed) equal their unpacked functions on views of the
packed tensor, and refuse a packed tensor of the wrong shape naming it."""
import pytest
import torch

from flashserve.kernels import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)


def _cu_seqlens(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_forms_equal_the_unpacked_calls(dtype, causal):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 19, 4, 32, generator=generator).to(dtype)
    kv = torch.randn(2, 23, 2, 2, 32, generator=generator).to(dtype)
    out, lse, _ = flash_attn_kvpacked_func(q, kv, causal=causal, window_size=(8, 0), return_attn_probs=True)
    expected, expected_lse, _ = flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=causal, window_size=(8, 0),
                                                return_attn_probs=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)

    lengths_q, lengths_k = [5, 0, 11], [7, 3, 11]
    q_packed = torch.randn(sum(lengths_q), 4, 32, generator=generator).to(dtype)
    kv_packed = torch.randn(sum(lengths_k), 2, 2, 32, generator=generator).to(dtype)
    args = (_cu_seqlens(lengths_q), _cu_seqlens(lengths_k), max(lengths_q), max(lengths_k))
    out = flash_attn_varlen_kvpacked_func(q_packed, kv_packed, *args, causal=causal, softcap=5.0)
    expected = flash_attn_varlen_func(q_packed, kv_packed[:, 0], kv_packed[:, 1], *args, causal=causal, softcap=5.0)
    assert torch.equal(out, expected)

    qkv = torch.randn(sum(lengths_k), 3, 4, 32, generator=generator).to(dtype)
    cu = _cu_seqlens(lengths_k)
    out, lse, _ = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths_k), causal=causal, return_attn_probs=True)
    q, k, v = qkv.unbind(1)
    expected, expected_lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths_k), max(lengths_k),
                                                       causal=causal, return_attn_probs=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


@pytest.mark.parametrize("name, call", [
    ("kv", lambda: flash_attn_kvpacked_func(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 3, 2, 16))),
    ("kv", lambda: flash_attn_kvpacked_func(torch.randn(1, 4, 2, 16), torch.randn(4, 2, 2, 16))),
    ("kv", lambda: flash_attn_varlen_kvpacked_func(torch.randn(4, 2, 16), torch.randn(4, 1, 2, 16),
                                                   _cu_seqlens([4]), _cu_seqlens([4]), 4, 4)),
    ("qkv", lambda: flash_attn_varlen_qkvpacked_func(torch.randn(4, 2, 2, 16), _cu_seqlens([4]), 4)),
    ("qkv", lambda: flash_attn_varlen_qkvpacked_func(torch.randn(4, 3, 2, 16).int(), _cu_seqlens([4]), 4)),
])
def test_wrong_packing_names_the_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()
