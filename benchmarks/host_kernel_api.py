"""Host time per eager call of the kernel API's entry points, the Triton launches themselves stubbed out (CPU).

What a call spends in Python before its kernels start: argument checks, launch arithmetic, buffer allocations and
the index-value checks — everything but Triton's C launcher (``CompiledKernel.run``; the GPU figures are the
benchmarks' "wall µs" columns). The Triton path is forced on CPU tensors and every kernel of the path is replaced
by a stub that accepts its arguments and does nothing (the index-check kernel's stub reports "all values fine"),
so the tensors are CPU tensors and the device synchronisation of the index check (GPU only) is not in the figure.
Entry points: ``flash_attn_with_kvcache`` (paged, B1 L4096, H 32 / KVH 8, d 128, the same (B,) length tensor every
call, a fresh length tensor per call, or an int length), ``paged_attention.decode`` (the engine's unchecked
decode, same shape) and ``merge_attn_states`` (T 4096, H 32, d 128); the layer kernels of a Qwen3-0.6B B1 decode
step (bf16): ``linear`` (skinny GEMM, M 1: the qkv 4096x1024 and o 1024x2048 projections, with the H200 plans of
``skinny_gemm_table``: both resident), ``linear_silu_and_mul`` (gate/up 6144x1024), ``rms_norm`` and
``fused_add_rms_norm`` (1 x 1024), and the q/k-norm + rotary + cache write as the engine calls it
(``paged_attention.qk_norm_rope_cache``: q/k/v views of the qkv output, H 16 / KVH 8, d 128) and through the
checked ``qk_norm_rope_and_cache``. Medians and minima over ``--rounds`` rounds
of ``--calls`` calls, µs per call (on a shared machine the minima are the steadier figure).
Where a ``_launch.CachedLauncher`` launches a kernel, the stub stands for the compiled kernel that Triton's path
returns: the library's fast paths run in full (launcher state, stream, argument tuple) and only the C launcher
itself (``CompiledKernel.run``, a C function that ignores its arguments) does nothing. A second table times, on the
first recorded call of each kernel, the part of Triton's ``JITFunction.run`` that the launcher skips (binder and
cache key, for a CUDA sm_90 target) and the launcher's generic key (the entry points' repeated calls launch
through per-geometry plans, ``_launch.LaunchPlan`` and ``decode_launch.DecodePlan``, which skip that key too:
their cost is in the first table).
Usage: python benchmarks/host_kernel_api.py [--out DIR] [--rounds 30] [--calls 300]
"""
import contextlib
import ctypes
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import argument_parser, markdown_table, write_results  # noqa: E402
from flashserve.kernels import (decode, fused_add_rms_norm, index_checks, kvcache_interface, linear,  # noqa: E402
                                linear_silu_and_mul, merge, norm, paged_attention, qk_norm_rope_and_cache,
                                qk_rope_cache, rms_norm, skinny_gemm, skinny_gemm_plans, skinny_gemm_resident,
                                skinny_gemm_streamk, skinny_gemm_table)
from flashserve.kernels.skinny_gemm_plans import GemmConfig  # noqa: E402

HEADS, HEADS_K, HEAD_DIM, PAGE, SEQLEN = 32, 8, 128, 16, 4096
HIDDEN, QWEN_HEADS, QWEN_HEADS_K, INTERMEDIATE = 1024, 16, 8, 3072  # Qwen3-0.6B


class _StubCompiled:
    """Stands in for the compiled kernel Triton returns: ``run`` (the C launcher) does nothing but hand the kernel's
    arguments (and the grid's first size) to ``on_launch``; without one it is a C function that ignores its
    arguments (an empty string's ``format``: what remains of the launch in the figure is passing the arguments,
    which the real launch pays too, without a Python frame, which it does not)."""
    function = packed_metadata = None

    def __init__(self, on_launch):
        self.on_launch = on_launch
        if on_launch is None:
            self.run = "".format

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        self.on_launch(args, grid_0)


class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` keeps the first arguments, lets
    ``on_launch`` act on them (the index check writes its flags) and returns a ``_StubCompiled``."""
    pre_run_hooks = ()

    def __init__(self, on_launch=None):
        self.on_launch = on_launch
        self.first_call = None
        self.compiled = _StubCompiled(on_launch)

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        if self.first_call is None:
            self.first_call = (args, dict(meta))
        if self.on_launch is not None:
            self.on_launch(args, None)
        return self.compiled


class _FakeDriver:
    """Triton's ``driver`` as the launchers see it on a GPU machine: device 0 (no CUDA driver on the CPU)."""

    class active:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 0


# (module, kernel attribute, launcher attribute or None, what the stub does with the arguments)
_KERNELS = [(merge, "_merge_kernel", "MERGE_LAUNCHER", None), (decode, "_decode_kernel", "DECODE_LAUNCHER", None),
            (decode, "_combine_splits_kernel", "COMBINE_LAUNCHER", None),
            (index_checks, "_kvcache_check_kernel", "KVCACHE_CHECK_LAUNCHER", lambda args, programs: _clear_flags(
                args[4], programs)),
            (skinny_gemm, "_skinny_gemm_kernel", "GEMM_LAUNCHER", None),
            (skinny_gemm_streamk, "_streamk_kernel", "STREAMK_LAUNCHER", None),
            (skinny_gemm_resident, "_resident_gemm_kernel", "LAUNCHER", None),
            (norm, "_rms_norm_kernel", "RMS_NORM_LAUNCHER", None),
            (qk_rope_cache, "_qk_norm_rope_cache_kernel", "QK_NORM_ROPE_CACHE_LAUNCHER", None)]


def _table_config(n_out, k, rows, dtype, device, gated=False):
    """``skinny_gemm_plans.default_config`` as on the H200: the measured table's plan of the shape."""
    return GemmConfig(*skinny_gemm_table.PLANS[(n_out, k, skinny_gemm_plans.row_bucket(rows), gated)])


def _clear_flags(flags, programs) -> None:
    """The index check's stub result, "every value fine": its int32 flags (a tensor, or the data pointer a
    ``LaunchPlan`` passes, one flag per program) set to 0."""
    if isinstance(flags, torch.Tensor):
        flags.zero_()
    else:
        ctypes.memset(flags, 0, 4 * programs)


@contextlib.contextmanager
def stubbed_launches():
    """Force the Triton path on CPU tensors with every kernel of the measured entry points stubbed: where a
    ``_launch.CachedLauncher`` launches it, the launcher's kernel (the launcher, with a fresh cache, then runs its
    fast path as on the GPU), else the module's kernel."""
    patches = [(module, "use_triton", lambda tensor: True)
               for module in (kvcache_interface, paged_attention, merge, index_checks, skinny_gemm, norm,
                              qk_rope_cache)]
    patches.append((skinny_gemm_plans, "default_config", _table_config))
    for module, kernel_name, launcher_name, on_launch in _KERNELS:
        launcher = getattr(module, launcher_name, None)
        if launcher is None:
            patches.append((module, kernel_name, _StubKernel(on_launch)))
        else:
            patches.append((launcher, "kernel", _StubKernel(on_launch)))
            patches.append((launcher, "_entries", {}))
            patches.append((sys.modules[type(launcher).__module__], "_triton_driver", lambda: _FakeDriver))
    saved = [(target, name, getattr(target, name)) for target, name, _ in patches]
    try:
        for target, name, value in patches:
            setattr(target, name, value)
        skinny_gemm_plans.reset()
        yield {kernel_name: value for (_, kernel_name, _, _), (_, name, value) in
               zip(_KERNELS, [p for p in patches if isinstance(p[2], _StubKernel)])}
    finally:
        for target, name, value in reversed(saved):
            setattr(target, name, value)
        skinny_gemm_plans.reset()


def binding_us(kernel, call, rounds: int, calls: int) -> dict:
    """Per-launch Python of the argument handling, on one recorded call of ``kernel``: Triton's ``JITFunction.run``
    (its binder and cache key, for a CUDA sm_90 target) and ``_launch.CachedLauncher``'s key (when present)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    args, meta = call
    options = {name: meta.pop(name) for name in ("num_warps", "num_stages") if name in meta}
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    key_cache = {}

    def triton_binding():
        bound, specialization, opts = binder(*args, **meta, **options, debug=False, instrumentation_mode="")
        return compute_cache_key(key_cache, specialization, opts), tuple(bound.values())
    result = {"triton": per_call_us(triton_binding, rounds, calls)}
    try:
        from flashserve.kernels._launch import CachedLauncher
    except ImportError:
        return result
    launcher = CachedLauncher(kernel)
    entries = {launcher._key(args, meta, options): None}
    result["cached_launcher"] = per_call_us(lambda: entries.get(launcher._key(args, meta, options)), rounds, calls)
    return result


def per_call_us(fn, rounds: int, calls: int) -> tuple[float, float]:
    """(median, min) over ``rounds`` of the mean µs per call of ``calls`` back-to-back calls."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples), min(samples)


def entry_points() -> dict:
    """name -> a no-argument call of one entry point on CPU tensors."""
    dtype = torch.bfloat16
    blocks = SEQLEN // PAGE
    k_cache = torch.zeros(blocks, PAGE, HEADS_K, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    table = torch.arange(blocks, dtype=torch.int32).view(1, blocks)
    seqlens = torch.full((1,), SEQLEN, dtype=torch.int32)
    q = torch.zeros(1, 1, HEADS, HEAD_DIM, dtype=dtype)
    q_rows = q[:, 0]  # the engine's (B, H, D) query (made once: slicing costs ~1 µs of the benchmark's own Python)
    tokens = 4096
    states = [torch.zeros(tokens, HEADS, HEAD_DIM, dtype=dtype) for _ in range(3)]
    lses = [torch.zeros(HEADS, tokens) for _ in range(3)]

    layer = _qwen3_layer(dtype)

    def kvcache(lengths):
        return kvcache_interface.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                         block_table=table, causal=True)
    return {
        "flash_attn_with_kvcache (same index tensors)": lambda: kvcache(seqlens),
        "flash_attn_with_kvcache (a new length tensor per call)": lambda: kvcache(seqlens.clone()),
        "flash_attn_with_kvcache (int cache_seqlens)": lambda: kvcache(SEQLEN),
        "paged_attention.decode": lambda: paged_attention.decode(q_rows, k_cache, v_cache, seqlens, table,
                                                                 HEAD_DIM ** -0.5),
        "merge_attn_states": lambda: merge.merge_attn_states(states[0], states[1], lses[0], states[2], lses[1],
                                                             lses[2]),
        "linear (qkv 4096x1024, M 1)": lambda: linear(layer["x"], layer["qkv"]),
        "linear (o 1024x2048, M 1)": lambda: linear(layer["attn_out"], layer["o"]),
        "linear_silu_and_mul (gate/up 6144x1024, M 1)": lambda: linear_silu_and_mul(layer["x"], layer["gate_up"]),
        "rms_norm (1 x 1024)": lambda: rms_norm(layer["x"], layer["norm"], 1e-6),
        "fused_add_rms_norm (1 x 1024)": lambda: fused_add_rms_norm(layer["x"], layer["residual"], layer["norm"],
                                                                    1e-6),
        "paged_attention.qk_norm_rope_cache (engine)": lambda: paged_attention.qk_norm_rope_cache(
            *layer["rope_args"], 1e-6),
        "qk_norm_rope_and_cache": lambda: qk_norm_rope_and_cache(*layer["rope_args"], 1e-6),
    }


def _qwen3_layer(dtype) -> dict:
    """The inputs of one Qwen3-0.6B decoder layer at B1: hidden row, weights, the q/k/v views of the qkv output
    and the arguments of the q/k-norm + rotary + cache write."""
    qkv_rows = (QWEN_HEADS + 2 * QWEN_HEADS_K) * HEAD_DIM
    qkv_out = torch.zeros(1, qkv_rows, dtype=dtype)
    q, k, v = qkv_out.split([QWEN_HEADS * HEAD_DIM, QWEN_HEADS_K * HEAD_DIM, QWEN_HEADS_K * HEAD_DIM], dim=-1)
    q, k, v = q.view(1, QWEN_HEADS, HEAD_DIM), k.view(1, QWEN_HEADS_K, HEAD_DIM), v.view(1, QWEN_HEADS_K, HEAD_DIM)
    k_cache = torch.zeros(256, PAGE, QWEN_HEADS_K, HEAD_DIM, dtype=dtype)
    head_norm = torch.ones(HEAD_DIM, dtype=dtype)
    return {
        "x": torch.zeros(1, HIDDEN, dtype=dtype), "residual": torch.zeros(1, HIDDEN, dtype=dtype),
        "attn_out": torch.zeros(1, QWEN_HEADS * HEAD_DIM, dtype=dtype),
        "qkv": torch.zeros(qkv_rows, HIDDEN, dtype=dtype), "o": torch.zeros(HIDDEN, QWEN_HEADS * HEAD_DIM, dtype=dtype),
        "gate_up": torch.zeros(2 * INTERMEDIATE, HIDDEN, dtype=dtype), "norm": torch.ones(HIDDEN, dtype=dtype),
        "rope_args": (q, k, v, torch.zeros(4096, HEAD_DIM), torch.zeros(1, dtype=torch.int64), k_cache,
                      torch.zeros_like(k_cache), torch.zeros(1, dtype=torch.int64), head_norm, head_norm),
    }


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with stubbed_launches() as stubs:
        timings = {name: per_call_us(fn, args.rounds, args.calls) for name, fn in entry_points().items()}
    with _patched(sys.modules["flashserve.kernels._launch"], "_triton_driver", lambda: _FakeDriver):
        binding = {name: binding_us(getattr(module, name), stubs[name].first_call, args.rounds, args.calls)
                   for module, name, _, _ in _KERNELS if stubs[name].first_call is not None}
    text = (f"host µs per eager call, launches stubbed ({os.cpu_count()} CPUs, torch {torch.__version__})\n\n"
            + markdown_table(["entry point", "median µs", "min µs"],
                             [[name, f"{median:.1f}", f"{low:.1f}"] for name, (median, low) in timings.items()])
            + "\n\nPython per launch of the argument binding, on the first recorded call of each kernel (median / min "
            "µs): Triton's JITFunction.run (binder + cache key) and CachedLauncher's key\n\n"
            + markdown_table(["kernel", "JITFunction.run binding", "CachedLauncher key"],
                             [[name, "%.1f / %.1f" % r["triton"],
                               "%.1f / %.1f" % r["cached_launcher"] if "cached_launcher" in r else "-"]
                              for name, r in binding.items()]))
    write_results(args.out, "host_kernel_api", text, dict(per_call_us=timings, binding_us=binding))


@contextlib.contextmanager
def _patched(target, name, value):
    saved = getattr(target, name, None)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, saved)


if __name__ == "__main__":
    main()
