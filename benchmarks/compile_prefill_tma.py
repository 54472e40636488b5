"""Compile the TMA prefill kernel for a GPU target without a GPU: every candidate config, the variants
bench_prefill runs (causal dense d 128 / d 64, causal varlen), through ``triton.compile`` (Triton ships ptxas).

Catches what the interpreter misses (layouts, shared memory, TMA block rules); skips the configs that the
autotuner's pruning drops for the variant.
Usage: ``python benchmarks/compile_prefill_tma.py [--arch 90] [--dtype bf16]``; prints one line per variant and
config (seconds, shared memory, registers per thread, local memory = spills) and exits non-zero if one failed.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget

from flashserve.kernels.kv_layout import KV_DENSE, KV_VARLEN
from flashserve.kernels.prefill_tma import _prefill_tma_kernel
from flashserve.kernels.prefill_tuning import TMA_CONFIGS, prune_tma_configs

POINTERS = {"q_ptr": None, "k_ptr": None, "v_ptr": None, "out_ptr": None, "lse_ptr": "fp32",
            "cu_seqlens_q_ptr": "i32", "cu_seqlens_k_ptr": "i32", "seqused_k_ptr": "i32"}
FLOATS = ("qk_scale",)
# (name, constexprs): the shapes of bench_prefill (H 32 / Hk 8 d 128, H 16 / Hk 8 d 64), dense and varlen.
VARIANTS = [
    ("dense causal d128", dict(NUM_HEADS=32, GROUP=4, HEAD_DIM=128, VARLEN_Q=False, KV_LAYOUT=KV_DENSE)),
    ("dense causal d64", dict(NUM_HEADS=16, GROUP=2, HEAD_DIM=64, VARLEN_Q=False, KV_LAYOUT=KV_DENSE)),
    ("varlen causal d128", dict(NUM_HEADS=32, GROUP=4, HEAD_DIM=128, VARLEN_Q=True, KV_LAYOUT=KV_VARLEN)),
]


def signature(dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton type strings of every kernel argument and the divisibility attributes of pointers and strides
    (what the JIT's specialisation gives aligned, contiguous inputs)."""
    sig, attrs = {}, {}
    for index, name in enumerate(_prefill_tma_kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + (POINTERS[name] or dtype)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def resource_usage(cubin: bytes) -> str:
    """Registers per thread and local memory (spills) of a cubin, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return "regs ?"
    found = re.search(r"REG:(\d+).*LOCAL:(\d+)", text)
    return f"regs {found.group(1)}, local {found.group(2)} B" if found else "regs ?"


def compile_or_report(kernel, name: str, sig: dict, attrs: dict, constexprs: dict, target, options: dict,
                      trace: bool = False):
    """``triton.compile`` one variant; None after a FAIL line (with ``trace``, the failing frame too) when it does
    not compile, so that a sweep reports every failing variant, not only the first."""
    try:
        return triton.compile(triton.compiler.ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
                              target=target, options=options)
    except Exception as error:  # noqa: BLE001 - any compile error is a failing variant
        print(f"FAIL {name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
        if trace:
            traceback.print_exc(limit=1)
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 64 if args.arch >= 90 else 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, {args.dtype}")
    failures = 0
    for name, shape in VARIANTS:
        element = torch.empty(0, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float16)
        kept = prune_tma_configs(TMA_CONFIGS, {"HEAD_DIM": shape["HEAD_DIM"], "q_ptr": element})
        for config in TMA_CONFIGS:
            if config not in kept:
                print(f"pruned {name} {config} (shared memory)")
                continue
            constexprs = {**shape, "HAS_SEQUSED": False, "CAUSAL": True, "DOT_PRECISION": "tf32", **config.kwargs}
            sig, attrs = signature(args.dtype, constexprs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            if config.maxnreg:
                options["maxnreg"] = config.maxnreg
            start = time.perf_counter()
            kernel = compile_or_report(_prefill_tma_kernel, f"{name} {config}", sig, attrs, constexprs, target,
                                       options, trace=True)
            if kernel is None:
                failures += 1
                continue
            print(f"ok   {name} {config}: {time.perf_counter() - start:.1f} s, shared {kernel.metadata.shared} B, "
                  f"{resource_usage(kernel.asm['cubin'])}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
