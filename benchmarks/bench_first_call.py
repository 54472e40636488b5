"""Benchmark: the first call of each kernel variant in a new process — cold (empty caches: Triton compiles, the
prefill autotunes) and warm (a second process over the same on-disk caches: Triton's kernel cache and
flashserve's autotuning cache, ``kernels/tuning_cache.py``) — and how many distinct variants a FlashAttention-style
sweep compiles, with our ``do_not_specialize`` lists and with every int argument specialised (as before them).

Every measurement runs in a child process of its own with ``TRITON_CACHE_DIR`` and ``FLASHSERVE_CACHE_DIR`` in a
fresh temporary folder (the machine's own caches are never read or touched). A first call is timed on the host
(synchronised before and after: Python, compile or cache load, tuning, launch and the kernel); the steady call
after it is timed the same way, so "first - steady" is the start-up cost. Variants counted = compiled kernels
(``*.cubin`` files) in the child's Triton cache. The first variant timed is a trivial Triton kernel: what a
process pays once for Triton itself (driver and launcher set-up; cold: its compile too), so that the next variant's
figure is its own.
``--profile paged,append`` also runs the variants whose names contain one of those words under cProfile (first and
steady call, in the warm process) and adds the top functions by cumulative time: where a slow first call goes.
Usage: python benchmarks/bench_first_call.py [--out DIR] [--skip-sweep] [--profile WORD,...]
"""
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections import Counter

import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))


def _variants():
    """name -> a function that makes the inputs and returns the call to time (imports inside: child only)."""
    import torch

    from flashserve.kernels import (attention_scores_from_lse, flash_attn_func, flash_attn_varlen_func,
                                    flash_attn_with_kvcache, fused_add_rms_norm, merge_attn_states,
                                    paged_attention, qk_norm_rope_and_cache, reshape_and_cache_flash, rms_norm,
                                    silu_and_mul)
    cuda, bf16 = "cuda", torch.bfloat16

    def randn(*shape, dtype=bf16):
        return torch.randn(*shape, device=cuda, dtype=dtype)

    def paged(tokens, page=16):
        blocks = -(-tokens // page)
        cache = randn(blocks + 4, 2, page, 8, 128)
        table = torch.randperm(blocks + 4, device=cuda, dtype=torch.int32)[:blocks].view(1, blocks)
        return cache[:, 0], cache[:, 1], table

    def prefill_dense():
        q, k = randn(1, 1024, 32, 128), randn(1, 1024, 8, 128)
        return lambda: flash_attn_func(q, k, k, causal=True)

    def prefill_varlen_paged():
        k_cache, v_cache, table = paged(2048)
        q = randn(512, 32, 128)
        cu = torch.tensor([0, 512], device=cuda, dtype=torch.int32)
        used = torch.tensor([2048], device=cuda, dtype=torch.int32)
        return lambda: flash_attn_varlen_func(q, k_cache, v_cache, cu, None, 512, 2048, causal=True,
                                              block_table=table, seqused_k=used)

    def engine_prefill():
        k_cache, v_cache, table = paged(2048)
        q = randn(512, 32, 128)
        cu = torch.tensor([0, 512], device=cuda, dtype=torch.int32)
        used = torch.tensor([2048], device=cuda, dtype=torch.int32)
        return lambda: paged_attention.prefill(q, k_cache, v_cache, cu, used, table, 512, 2048, 0.088)

    def engine_decode():
        k_cache, v_cache, table = paged(4096)
        q, used = randn(1, 32, 128), torch.tensor([4096], device=cuda, dtype=torch.int32)
        return lambda: paged_attention.decode(q, k_cache, v_cache, used, table, 0.088)

    def kvcache_append_rotary():
        k_cache, v_cache, table = paged(4096)
        q, k, v = randn(1, 1, 32, 128), randn(1, 1, 8, 128), randn(1, 1, 8, 128)
        cos, sin = randn(table.shape[1] * 16, 64), randn(table.shape[1] * 16, 64)
        seqlens = torch.tensor([3000], device=cuda, dtype=torch.int32)
        return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens,
                                               block_table=table, causal=True, rotary_interleaved=False)

    def merge():
        out, lse = randn(4096, 32, 128), torch.randn(32, 4096, device=cuda)
        return lambda: merge_attn_states(torch.empty_like(out), out, lse, out, lse)

    def cache_write():
        k_cache, v_cache, _ = paged(4096)
        key = randn(256, 8, 128)
        slots = torch.randperm(4096, device=cuda)[:256]
        return lambda: reshape_and_cache_flash(key, key, k_cache, v_cache, slots)

    def qk_rope_cache():
        k_cache, v_cache, _ = paged(4096)
        q, k, v = randn(256, 32, 128), randn(256, 8, 128), randn(256, 8, 128)
        cos_sin, positions = randn(8192, 128), torch.arange(256, device=cuda)
        weight = randn(128)
        slots = torch.randperm(4096, device=cuda)[:256]
        return lambda: qk_norm_rope_and_cache(q, k, v, cos_sin, positions, k_cache, v_cache, slots, weight, weight)

    def layer_helpers():
        x, residual, weight, gate_up = randn(256, 4096), randn(256, 4096), randn(4096), randn(256, 2 * 14336)
        return lambda: (rms_norm(x, weight, 1e-6), fused_add_rms_norm(x, residual, weight, 1e-6),
                        silu_and_mul(gate_up))

    def scores():
        q, k = randn(1, 1024, 32, 128), randn(1, 1024, 8, 128)
        _, lse, _ = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
        return lambda: attention_scores_from_lse(q, k, lse, causal=True)

    def trivial_kernel():
        out = torch.empty(16, device=cuda)
        return lambda: _fill_kernel[(1,)](out, 1.0)

    return {"a trivial Triton kernel (Triton's set-up in a process)": trivial_kernel,
            "prefill dense (flash_attn_func)": prefill_dense, "prefill paged (flash_attn_varlen_func)":
            prefill_varlen_paged, "engine prefill (paged_attention.prefill)": engine_prefill,
            "engine decode (paged_attention.decode)": engine_decode,
            "kv-cache append + rotary + decode": kvcache_append_rotary, "merge_attn_states": merge,
            "reshape_and_cache_flash": cache_write, "qk_norm_rope_and_cache": qk_rope_cache,
            "rms_norm + fused_add_rms_norm + silu_and_mul": layer_helpers, "attention_scores_from_lse": scores}


@triton.jit
def _fill_kernel(out_ptr, value):
    tl.store(out_ptr + tl.arange(0, 16), tl.full((16,), value, tl.float32))


def _timed(call) -> float:
    import torch
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _profiled(call, top: int = 25) -> tuple[float, str]:
    """(ms, the ``top`` functions by cumulative time) of one synchronised call under cProfile."""
    profile = cProfile.Profile()
    ms = _timed(lambda: profile.runcall(call))
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(top)
    return ms, text.getvalue()


def child_first_calls(profile_words: list[str]) -> dict:
    """The first and the steady call of every variant, in this (fresh) process; variants whose name holds one of
    ``profile_words`` run under cProfile (their times include its overhead). The scores variant runs a forward
    first for its LSE: its first-call time is the scores kernel's alone."""
    import torch
    torch.randn(1, device="cuda")  # CUDA context and allocator start-up, not a kernel's cost
    rows = {}
    for name, make in _variants().items():
        call = make()
        if any(word in name for word in profile_words):
            first, first_profile = _profiled(call)
            steady, steady_profile = _profiled(call)
            rows[name] = dict(first_ms=first, steady_ms=steady, profile_first=first_profile,
                              profile_steady=steady_profile)
        else:
            first = _timed(call)
            rows[name] = dict(first_ms=first, steady_ms=_timed(call))
    return rows


def child_sweep(specialize_all: bool) -> dict:
    """A FlashAttention-style sweep (FA2's head dims, (sq, sk) pairs, causal, MHA/GQA; kv-cache decode shapes) with
    autotuning off; returns the compiled variants per kernel (``*.cubin`` files of this process's Triton cache)."""
    import torch
    os.environ["FLASHSERVE_AUTOTUNE"] = "0"
    from flashserve.kernels import attention_scores, cache, decode, prefill, rotary
    from flashserve.kernels import flash_attn_func, flash_attn_with_kvcache
    if specialize_all:  # what the kernels compiled before their do_not_specialize lists
        for kernel in (prefill._prefill_kernel, decode._decode_kernel, cache._cache_write_kernel,
                       rotary._rotary_kernel, attention_scores._scores_kernel):
            for param in getattr(kernel, "params", []):
                param.do_not_specialize = False
    for head_dim in (64, 128):
        for seqlen_q, seqlen_k in ((1, 239), (3, 799), (113, 203), (127, 513), (1023, 1024), (1024, 1023)):
            for heads_k in (8, 2):
                for causal in (False, True):
                    q = torch.randn(1, seqlen_q, 8, head_dim, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(1, seqlen_k, heads_k, head_dim, device="cuda", dtype=torch.bfloat16)
                    flash_attn_func(q, k, k, causal=causal)
        for seqlen_q, seqlen_k in ((1, 128), (1, 339), (3, 1024), (64, 800), (16, 2000)):
            for page_size in (None, 16, 256):
                q = torch.randn(2, seqlen_q, 6, head_dim, device="cuda", dtype=torch.bfloat16)
                new = torch.randn(2, seqlen_q, 3, head_dim, device="cuda", dtype=torch.bfloat16)
                if page_size is None:
                    k_cache = torch.randn(2, seqlen_k, 3, head_dim, device="cuda", dtype=torch.bfloat16)
                    table = None
                else:
                    blocks = -(-seqlen_k // page_size)
                    k_cache = torch.randn(2 * blocks, page_size, 3, head_dim, device="cuda", dtype=torch.bfloat16)
                    table = torch.randperm(2 * blocks, device="cuda", dtype=torch.int32).view(2, blocks)
                seqlens = torch.randint(0, seqlen_k - seqlen_q + 1, (2,), device="cuda", dtype=torch.int32)
                flash_attn_with_kvcache(q, k_cache, k_cache.clone(), new, new, cache_seqlens=seqlens,
                                        block_table=table, causal=True)
    torch.cuda.synchronize()
    counts = Counter()
    for _, _, files in os.walk(os.environ["TRITON_CACHE_DIR"]):
        counts.update(name[:-len(".cubin")] for name in files if name.endswith(".cubin"))
    return dict(counts)


def run_child(args: list[str], cache_dir: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"),
               FLASHSERVE_CACHE_DIR=os.path.join(cache_dir, "flashserve"), PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(cold: dict, warm: dict, sweeps: dict) -> str:
    from common import markdown_table
    rows = [[name, f"{cold[name]['first_ms']:.0f}", f"{warm[name]['first_ms']:.1f}",
             f"{warm[name]['steady_ms']:.2f}"] for name in cold]
    text = markdown_table(["variant", "cold first call ms", "warm first call ms (disk caches)", "steady call ms"],
                          rows)
    for name, row in warm.items():
        for key in ("profile_first", "profile_steady"):
            if key in row:
                text += f"\n\nWarm process, {name}, {key.split('_')[1]} call under cProfile:\n\n```\n{row[key]}```"
    if sweeps:
        names = sorted(set(sweeps["specialised"]) | set(sweeps["ours"]))
        text += "\n\nDistinct variants compiled by the FA-style sweep (autotuning off):\n\n" + markdown_table(
            ["kernel", "every int specialised", "with do_not_specialize"],
            [[name, sweeps["specialised"].get(name, 0), sweeps["ours"].get(name, 0)] for name in names]
            + [["total", sum(sweeps["specialised"].values()), sum(sweeps["ours"].values())]])
    return text


def main():
    if "--child" in sys.argv:
        sys.path.insert(0, os.path.dirname(HERE))
        what = sys.argv[sys.argv.index("--child") + 1]
        words = [word for word in sys.argv[sys.argv.index("--child") + 2:] if word]
        result = child_first_calls(words) if what == "first-calls" else child_sweep(what == "sweep-specialised")
        print(json.dumps(result))
        return
    sys.path.insert(0, HERE)
    from common import argument_parser, environment, section_header, write_results
    parser = argument_parser(__doc__)
    parser.add_argument("--skip-sweep", action="store_true", help="only the first-call timings")
    parser.add_argument("--profile", default="", help="comma-separated words: profile the warm first and steady "
                                                      "calls of the variants whose names contain one")
    args = parser.parse_args()
    words = [word for word in args.profile.split(",") if word]
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = run_child(["first-calls"], cache_dir)
        warm = run_child(["first-calls", *words], cache_dir)
    sweeps = {}
    if not args.skip_sweep:
        for label, child in (("specialised", "sweep-specialised"), ("ours", "sweep")):
            with tempfile.TemporaryDirectory() as cache_dir:
                sweeps[label] = run_child([child], cache_dir)
    env = environment()
    write_results(args.out, "bench_first_call", section_header("First call per kernel variant", env)
                  + markdown(cold, warm, sweeps), dict(meta=env, cold=cold, warm=warm, sweeps=sweeps))


if __name__ == "__main__":
    main()
