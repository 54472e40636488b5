"""CPU tests of the TMA prefill kernel (``flashserve.kernels.prefill_tma``) through Triton's interpreter, which
runs tensor descriptors (``FLASHSERVE_PREFILL_KERNEL=tma`` forces the kernel onto the CPU), and of the choice
between it and the portable kernel. fp16/fp32, tiny shapes; the GPU file checks bf16 at real sizes."""
import pytest
import torch

from flashserve.kernels import prefill, prefill_tma
from test_flash_attn import check_dense, check_varlen, cu_seqlens

DTYPES = [torch.float16, torch.float32]


def force_tma_kernel(monkeypatch) -> list:
    """Force the TMA kernel and count its launches (so a test fails if the portable kernel ran instead): returns
    the list that receives each launch's q shape."""
    monkeypatch.setenv("FLASHSERVE_PREFILL_KERNEL", "tma")
    calls = []
    launch = prefill.tma_prefill_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)
    monkeypatch.setattr(prefill, "tma_prefill_attention", counted)
    torch.manual_seed(0)
    return calls


@pytest.fixture
def tma_calls(monkeypatch):
    """The TMA kernel forced on, launches counted (``force_tma_kernel``)."""
    return force_tma_kernel(monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlens", [(70, 70), (70, 113), (113, 70), (64, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense(tma_calls, dtype, seqlens, causal):
    """Several query and key tiles, tails, sq > sk (rows that see no key), GQA."""
    seqlen_q, seqlen_k = seqlens
    q = torch.randn(2, seqlen_q, 4, 32, dtype=dtype)
    k = torch.randn(2, seqlen_k, 2, 32, dtype=dtype)
    v = torch.randn(2, seqlen_k, 2, 32, dtype=dtype)
    check_dense(q, k, v, causal=causal)
    assert len(tma_calls) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_and_scale(tma_calls, dtype):
    """q/k/v as views of one packed (B, S, 3, H, D) tensor, and a softmax scale of its own."""
    qkv = torch.randn(2, 90, 3, 2, 16, dtype=dtype)
    q, k, v = qkv.unbind(2)
    check_dense(q, k, v, causal=True, softmax_scale=0.3)
    assert len(tma_calls) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(tma_calls, dtype, causal):
    """Mixed lengths: an empty query sequence, an empty key sequence, sq > sk."""
    lengths_q, lengths_k = [70, 0, 5, 66, 9], [70, 3, 0, 100, 4]
    q = torch.randn(sum(lengths_q), 4, 16, dtype=dtype)
    k = torch.randn(sum(lengths_k), 1, 16, dtype=dtype)
    v = torch.randn(sum(lengths_k), 1, 16, dtype=dtype)
    check_varlen(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), causal=causal)
    assert len(tma_calls) == 1


def test_varlen_seqused_k(tma_calls):
    lengths_q, lengths_k, used_k = [65, 8], [90, 12], [80, 12]
    q = torch.randn(sum(lengths_q), 2, 16, dtype=torch.float16)
    k = torch.randn(sum(lengths_k), 2, 16, dtype=torch.float16)
    v = torch.randn(sum(lengths_k), 2, 16, dtype=torch.float16)
    check_varlen(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), causal=True,
                 seqused_k=torch.tensor(used_k, dtype=torch.int32))
    assert len(tma_calls) == 1


def test_persistent_grid(tma_calls, monkeypatch):
    """The persistent variant (a few programs walking all work items) gives the same result."""
    q = torch.randn(3, 100, 4, 16, dtype=torch.float16)
    k = torch.randn(3, 100, 2, 16, dtype=torch.float16)
    v = torch.randn(3, 100, 2, 16, dtype=torch.float16)
    expected = check_dense(q, k, v, causal=True)
    default = prefill_tma.default_tma_config
    monkeypatch.setattr(prefill_tma, "default_tma_config", lambda *a: {**default(*a), "PERSISTENT": 1})
    assert torch.equal(check_dense(q, k, v, causal=True), expected)
    assert len(tma_calls) == 2


@pytest.mark.parametrize("options", [dict(softcap=5.0), dict(window_size=(8, 0)), dict(window_size=(-1, 3)),
                                     dict(alibi_slopes=True), dict(softmax_scale=-0.1)])
def test_unsupported_options_run_portable_kernel(tma_calls, options):
    if options.get("alibi_slopes"):
        options = dict(alibi_slopes=torch.rand(4))
    q = torch.randn(1, 66, 4, 16, dtype=torch.float16)
    k = torch.randn(1, 66, 2, 16, dtype=torch.float16)
    v = torch.randn(1, 66, 2, 16, dtype=torch.float16)
    check_dense(q, k, v, **options)
    assert tma_calls == []


def _applies(q, k, **changes):
    args = dict(softmax_scale=None, window_size=(-1, 0), softcap=0.0, alibi_slopes=None, block_table=None,
                max_seqlen_q=q.shape[1], heads_per_tile=1)
    args.update(changes)
    return prefill_tma.tma_applies(q, k, k, q, **args)


def test_tma_applies():
    q, k = torch.empty(1, 64, 4, 64, dtype=torch.float16), torch.empty(1, 64, 2, 64, dtype=torch.float16)
    assert _applies(q, k) and _applies(q, k, window_size=(-1, -1))
    assert not _applies(q, k, heads_per_tile=2)  # GQA head packing of short queries: the portable kernel
    assert not _applies(q, k, block_table=torch.zeros(1, 1, dtype=torch.int32))
    for head_dim in (8, 40, 256):
        assert not _applies(torch.empty(1, 64, 4, head_dim, dtype=torch.float16),
                            torch.empty(1, 64, 2, head_dim, dtype=torch.float16))
    odd = torch.empty(1, 64, 4, 65, dtype=torch.float16)[..., :64]  # token and head strides not 16-byte multiples
    assert not _applies(odd, k)


def test_kernel_choice(monkeypatch):
    q, k = torch.empty(1, 64, 4, 64, dtype=torch.float16), torch.empty(1, 64, 2, 64, dtype=torch.float16)
    args = (q, k, k, q, None, (-1, 0), 0.0, None, None, 64, 1)
    monkeypatch.setenv("FLASHSERVE_PREFILL_KERNEL", "auto")
    assert not prefill_tma.use_tma(*args)  # auto: Hopper GPUs only
    monkeypatch.setenv("FLASHSERVE_PREFILL_KERNEL", "TMA")
    assert prefill_tma.use_tma(*args)
    monkeypatch.setenv("FLASHSERVE_PREFILL_KERNEL", "portable")
    assert not prefill_tma.use_tma(*args)
    monkeypatch.setenv("FLASHSERVE_PREFILL_KERNEL", "fast")
    with pytest.raises(ValueError, match="FLASHSERVE_PREFILL_KERNEL"):
        prefill_tma.use_tma(*args)
