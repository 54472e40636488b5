"""Launch plans and per-stream scratch memory on a CUDA GPU: calls on two streams at once, and a CUDA graph
replayed after eager calls grew (and freed) the stream's scratch buffer."""
import pytest
import torch

from flashserve.kernels import flash_attn_with_kvcache, paged_attention
from test_decode import Case, make_inputs

pytestmark = pytest.mark.gpu


def _decode_args(seed, batch=1, cache_len=4000):
    args = make_inputs(Case(batch=batch, heads=32, heads_k=8, head_dim=128, cache_len=cache_len, seqlen_new=0,
                            dtype=torch.bfloat16), device="cuda", seed=seed)
    return {name: value for name, value in args.items() if value is not None}


def _engine_call(args):
    q = args["q"]
    return lambda: paged_attention.decode(q[:, 0], args["k_cache"], args["v_cache"], args["cache_seqlens"],
                                          args["block_table"], q.shape[-1] ** -0.5)


def test_calls_on_two_streams_at_once():
    """Split-KV calls queued on two streams without waiting: each stream has its own partial-state buffer."""
    inputs = [_decode_args(seed) for seed in range(2)]
    calls = [[lambda a=a: flash_attn_with_kvcache(**a), _engine_call(a)] for a in inputs]
    expected = [[call() for call in pair] for pair in calls]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in inputs]
    results = [[], []]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for index, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                results[index].append([call() for call in calls[index]])
    torch.cuda.synchronize()
    for index, runs in enumerate(results):
        for outs in runs:
            assert all(torch.equal(out, want) for out, want in zip(outs, expected[index]))


def test_graph_replay_after_the_scratch_buffer_was_replaced():
    """A captured decode uses memory of the graph's pool, not the capture stream's scratch buffer: replacing that
    buffer (a larger split layout on the same stream) and reusing the freed memory leaves the replays right."""
    args = _decode_args(0)
    call = _engine_call(args)
    expected = call().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # the side stream's scratch buffer exists now
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = call()
    bigger = _engine_call(_decode_args(1, batch=2, cache_len=16000))
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        bigger()  # grows (replaces) the side stream's buffer
        garbage = torch.full((1 << 22,), float("nan"), device="cuda")  # may take the freed memory
        for _ in range(3):
            graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    del garbage
