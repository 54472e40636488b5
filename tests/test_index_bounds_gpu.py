"""Out-of-range index values on the GPU: far outside every tensor (2**30 block ids, 10**6 lengths, 10**9 slots).

Each public call raises ValueError naming the tensor and leaves the CUDA context usable; with the host checks off
(as during graph capture) the kernels bound the values (no illegal address, guards intact, finite outputs); a
real CUDA graph captured with such values replays cleanly; and afterwards ordinary calls still match the reference.
"""
import pytest
import torch

from flashserve.kernels import flash_attn_with_kvcache, index_checks, paged_attention
from test_decode import Case, run_case
from test_index_bounds import CASES, Guarded, check_guards, make_case

pytestmark = pytest.mark.gpu


def _still_usable():
    torch.cuda.synchronize()  # an illegal access from an earlier launch would surface here
    run_case(Case(batch=3, heads=8, heads_k=2, head_dim=64, cache_len=500, dtype=torch.bfloat16), device="cuda")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", list(CASES))
def test_out_of_range_index_raises_and_the_context_survives(name):
    _, call = make_case(name, "cuda", big=True)
    with pytest.raises(ValueError, match=CASES[name][1]):
        call()
    _still_usable()


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_bound_far_out_of_range_indices(name, monkeypatch):
    monkeypatch.setattr(index_checks, "capturing", lambda: True)
    guarded, call = make_case(name, "cuda", big=True)
    outputs = call()
    torch.cuda.synchronize()
    check_guards(guarded, outputs)
    monkeypatch.undo()
    _still_usable()


def test_graph_capture_with_out_of_range_values():
    """flash_attn_with_kvcache and paged_attention.decode captured in a CUDA graph (no check may synchronise
    there), replayed with a block table and lengths far outside the cache."""
    g = Guarded("cuda")
    k_cache, v_cache, table = g.paged()
    q = g.randn(2, 1, 2, 16)
    seqlens = g.index((3, 5))
    calls = [lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                             causal=True),
             lambda: paged_attention.decode(q[:, 0], k_cache, v_cache, seqlens, table, 0.25).unsqueeze(1)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [call() for call in calls]
    table[1, 0] = 2 ** 30
    table[0, 0] = -(2 ** 30)
    seqlens.copy_(g.index((10 ** 6, -(10 ** 6))))
    graph.replay()
    torch.cuda.synchronize()
    check_guards(g, outputs)
    _still_usable()
