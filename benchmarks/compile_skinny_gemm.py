"""Compile the small-M matrix product's stream-K kernel for a GPU target without a GPU: every stream-K candidate
config at each rows tile, plain and gated, through ``triton.compile`` (Triton ships ptxas); then the grid kernel's
RMSNorm-prologue variants without PDL (every tile, plain and gated, with and without split-K, at each row count
that ``norm_linear.max_fused_rows`` folds at the models' K; ``compile_pdl.py`` compiles the PDL ones).

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

from compile_pdl import gemm_variants, signature
from compile_prefill_tma import compile_or_report, resource_usage
from flashserve.kernels import skinny_gemm_plans
from flashserve.kernels.skinny_gemm_streamk import _streamk_kernel


def report(kernel, name: str, constexprs: dict, target, options: dict) -> bool:
    """Compile one variant and print its line (seconds, shared memory, registers, spills, cp.async count);
    whether it compiled."""
    sig, attrs = signature(kernel, constexprs)
    start = time.perf_counter()
    compiled = compile_or_report(kernel, name, sig, attrs, constexprs, target, options)
    if compiled is None:
        return False
    copies = compiled.asm["ptx"].count("cp.async.cg") + compiled.asm["ptx"].count("cp.async.ca")
    print(f"ok   {name}: {time.perf_counter() - start:.1f} s, shared {compiled.metadata.shared} B, "
          f"{resource_usage(compiled.asm['cubin'])}, cp.async {copies}", flush=True)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--rows", default="1,2,4,16,32,64", help="row counts (each gives its rows tile)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 64 if args.arch >= 90 else 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, bf16")
    failures = 0
    rows_list = [int(r) for r in args.rows.split(",")]
    for rows in rows_list:
        for gated in (False, True):
            configs = {c for c in skinny_gemm_plans.ALL_CONFIGS if c.programs_per_sm and (
                c.use_dot or rows <= skinny_gemm_plans.STREAMK_FMA_MAX_ROWS)}
            tiles = {(c.block_n, c.block_k, c.num_warps, c.num_stages, c.use_dot, c.pdl) for c in configs}
            for block_n, block_k, warps, stages, use_dot, pdl in sorted(tiles):
                block_m = skinny_gemm_plans.block_rows(rows) if use_dot else triton.next_power_of_2(rows)
                constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=True, HAS_BIAS=False,
                                  HAS_RESIDUAL=False, GATED=gated, USE_DOT=use_dot, DOT_PRECISION="tf32", PDL=pdl)
                name = f"streamk {'dot' if use_dot else 'fma'}{'-pdl' if pdl else ''} n{block_n}k{block_k}" \
                    f"w{warps}st{stages} M{block_m}{' gated' if gated else ''}"
                failures += not report(_streamk_kernel, name, constexprs, target,
                                       {"num_warps": warps, "num_stages": stages, "launch_pdl": pdl})
    for name, kernel, constexprs, warps, stages, _ in gemm_variants(rows_list, pdl=False):
        if constexprs["NORM"]:
            failures += not report(kernel, name, constexprs, target, {"num_warps": warps, "num_stages": stages})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
