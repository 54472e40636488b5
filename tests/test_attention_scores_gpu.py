"""attention_scores_from_lse at real sizes in bf16/fp16 on a CUDA GPU (skipped without one)."""
import pytest
import torch

from test_attention_scores import check_dense, check_varlen
from test_flash_attn import cu_seqlens, make_paged

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _default_config(monkeypatch):
    monkeypatch.setenv("FLASHSERVE_AUTOTUNE", "0")
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("head_dim, heads, options", [
    (128, (32, 8), dict(causal=True)),
    (64, (16, 16), dict()),
    (128, (32, 8), dict(window_size=(300, 0))),
    (256, (8, 1), dict(causal=True, softcap=30.0)),
    (80, (12, 4), dict(causal=True, alibi_slopes=True)),
])
def test_dense_gpu(dtype, reduce, head_dim, heads, options):
    options = dict(options)
    if options.pop("alibi_slopes", False):
        options["alibi_slopes"] = torch.rand(heads[0], device="cuda") * 0.3
    q = torch.randn(2, 1000, heads[0], head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, 1500, heads[1], head_dim, device="cuda", dtype=dtype)
    check_dense(q, k, reduce, **options)


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_varlen_and_paged_gpu(reduce):
    lengths_q, lengths_k = [1, 300, 77, 1024], [900, 300, 2000, 1024]
    q = torch.randn(sum(lengths_q), 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lengths_k), 8, 128, device="cuda", dtype=torch.bfloat16)
    check_varlen(q, k, cu_seqlens(lengths_q, "cuda"), cu_seqlens(lengths_k, "cuda"), max(lengths_k), reduce,
                 causal=True)
    k_cache, _, block_table = make_paged(lengths_k, 16, 8, 128, torch.bfloat16, device="cuda")
    check_varlen(q, k_cache, cu_seqlens(lengths_q, "cuda"), None, max(lengths_k), reduce, block_table=block_table,
                 seqused_k=torch.tensor(lengths_k, dtype=torch.int32, device="cuda"), causal=True)
