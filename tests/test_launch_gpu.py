"""_launch.CachedLauncher on a CUDA GPU: launches through the compiled kernel's launcher give the results of
Triton's own path for every property Triton specialises on, inside CUDA graphs too, and the library's launchers
take the fast path once a variant is known."""
import pytest
import torch
import triton
import triton.language as tl

from flashserve.kernels import _launch, decode, merge
from test_decode import Case, run_case
from test_merge import check_merge

pytestmark = pytest.mark.gpu


@triton.jit(do_not_specialize=["n"])
def _scaled_sum(x_ptr, y_ptr, out_ptr, n, stride, alpha, BLOCK: tl.constexpr, SCALE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets * stride, mask=mask)
    y = tl.load(y_ptr + offsets * stride, mask=mask)
    tl.store(out_ptr + offsets * stride, ((alpha * x + y) * SCALE).to(out_ptr.dtype.element_ty), mask=mask)


class _Counting:
    """Counts the launches that go through Triton's own path (``kernel[grid]``)."""

    def __init__(self, kernel):
        self.kernel, self.slow_calls = kernel, 0

    def __getitem__(self, grid):
        self.slow_calls += 1
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def _launch_case(launcher, n, stride, offset, scale, dtype, alpha=0.5):
    buffers = [torch.randn(n * stride + offset + 16, device="cuda").to(dtype) for _ in range(3)]
    x, y, out = (b[offset:offset + n * stride] for b in buffers)
    launcher((triton.cdiv(n, 128),), (x, y, out, n, stride, alpha), dict(BLOCK=128, SCALE=scale), num_warps=4)
    expected = ((alpha * x[::stride].float() + y[::stride].float()) * scale).to(dtype)
    torch.testing.assert_close(out[::stride], expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_launches_match_every_specialisation(dtype):
    launcher = _launch.CachedLauncher(_scaled_sum)
    counting = launcher.kernel = _Counting(_scaled_sum)
    cases = [(n, stride, offset, scale) for n in (1, 16, 17, 1000) for stride in (1, 2, 16) for offset in (0, 1, 8)
             for scale in (1, 3)]
    for case in cases:
        _launch_case(launcher, *case, dtype)
    first_round = counting.slow_calls
    for case in cases:  # every key known now: none goes through Triton's path, results still right
        _launch_case(launcher, *case, dtype)
    if launcher._enabled:  # (Triton 3.6-3.9)
        assert counting.slow_calls == first_round
        assert first_round < len(cases)  # n is not specialised: some cases share a variant


def test_fast_launches_inside_a_cuda_graph():
    launcher = _launch.CachedLauncher(_scaled_sum)
    x, y, out = (torch.randn(4096, device="cuda") for _ in range(3))

    def call():
        launcher((32,), (x, y, out, 4096, 1, 2.0), dict(BLOCK=128, SCALE=1), num_warps=4)
    call()
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    x.fill_(1.0)
    y.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert (out == 5.0).all()


def test_library_launchers_take_the_fast_path():
    """Repeated decode and merge calls: after the first, Triton's own path is not taken (Triton 3.6-3.9)."""
    counters = {}
    for name, launcher in (("decode", decode.DECODE_LAUNCHER), ("merge", merge.MERGE_LAUNCHER)):
        counters[name] = launcher.kernel = _Counting(launcher.kernel)
    try:
        case = Case(batch=2, heads=32, heads_k=8, head_dim=128, cache_len=1000, dtype=torch.bfloat16)
        run_case(case, device="cuda")
        check_merge(613, 32, 128, torch.float16, device="cuda")
        before = {name: counter.slow_calls for name, counter in counters.items()}
        for _ in range(2):
            run_case(case, device="cuda")
            check_merge(613, 32, 128, torch.float16, device="cuda")
        if decode.DECODE_LAUNCHER._enabled:
            assert {name: counter.slow_calls for name, counter in counters.items()} == before
    finally:
        for name, launcher in (("decode", decode.DECODE_LAUNCHER), ("merge", merge.MERGE_LAUNCHER)):
            launcher.kernel = counters[name].kernel
