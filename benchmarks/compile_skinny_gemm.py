"""Compile the small-M matrix product's stream-K kernel for a GPU target without a GPU: every stream-K candidate
config at each rows tile, plain and gated, through ``triton.compile`` (Triton ships ptxas).

Catches what the interpreter misses (layouts, shared memory, register spills) and shows whether Triton's software
pipeline took the main loop (``cp.async`` copies in the PTX: the weight tiles are prefetched ``num_stages - 1``
ahead). Usage: ``python benchmarks/compile_skinny_gemm.py [--arch 90] [--rows 1,2,4,16,32,64]``; one line per
variant (seconds, shared memory, registers, local memory = spills, cp.async count); exits non-zero if one failed.
"""
import argparse
import sys
import time

import triton
from triton.backends.compiler import GPUTarget

from compile_prefill_tma import compile_or_report, resource_usage
from flashserve.kernels import skinny_gemm_plans
from flashserve.kernels.skinny_gemm_streamk import _streamk_kernel

POINTERS = {"x_ptr": "bf16", "w_ptr": "bf16", "bias_ptr": "bf16", "residual_ptr": "bf16", "out_ptr": "bf16",
            "partial_ptr": "fp32", "counter_ptr": "i32"}
DIVISIBLE = ("n_out", "K", "stride_xm", "stride_wn", "stride_om")  # what the decode shapes give (multiples of 16)


def signature(constexprs: dict) -> tuple[dict, dict]:
    """Triton type strings of the kernel's arguments and the divisibility the JIT would find at the real shapes."""
    sig, attrs = {}, {}
    for index, name in enumerate(_streamk_kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + POINTERS[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in DIVISIBLE:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--rows", default="1,2,4,16,32,64", help="row counts (each gives its rows tile)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 64 if args.arch >= 90 else 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, bf16")
    failures = 0
    for rows in [int(r) for r in args.rows.split(",")]:
        for gated in (False, True):
            configs = {c for c in skinny_gemm_plans.ALL_CONFIGS if c.programs_per_sm and (
                c.use_dot or rows <= skinny_gemm_plans.STREAMK_FMA_MAX_ROWS)}
            tiles = {(c.block_n, c.block_k, c.num_warps, c.num_stages, c.use_dot, c.pdl) for c in configs}
            for block_n, block_k, warps, stages, use_dot, pdl in sorted(tiles):
                block_m = skinny_gemm_plans.block_rows(rows) if use_dot else triton.next_power_of_2(rows)
                constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=True, HAS_BIAS=False,
                                  HAS_RESIDUAL=False, GATED=gated, USE_DOT=use_dot, DOT_PRECISION="tf32", PDL=pdl)
                sig, attrs = signature(constexprs)
                name = f"{'dot' if use_dot else 'fma'}{'-pdl' if pdl else ''} n{block_n}k{block_k}w{warps}" \
                    f"st{stages} M{block_m}{' gated' if gated else ''}"
                start = time.perf_counter()
                kernel = compile_or_report(_streamk_kernel, name, sig, attrs, constexprs, target,
                                           {"num_warps": warps, "num_stages": stages, "launch_pdl": pdl})
                if kernel is None:
                    failures += 1
                    continue
                copies = kernel.asm["ptx"].count("cp.async.cg") + kernel.asm["ptx"].count("cp.async.ca")
                print(f"ok   {name}: {time.perf_counter() - start:.1f} s, shared {kernel.metadata.shared} B, "
                      f"{resource_usage(kernel.asm['cubin'])}, cp.async {copies}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
