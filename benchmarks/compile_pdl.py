"""Compile the programmatic-dependent-launch variants (``PDL=True``) of the decode step's kernels for a GPU target
without a GPU, through ``triton.compile`` (Triton ships ptxas): the skinny-GEMM grid kernel (every tile of the
tuning's choices, with and without split-K: plain, gated, with the residual add and, for the rows
``norm_linear.max_fused_rows`` allows at the two models' K, with the RMSNorm prologue, plain and gated), the
resident kernel (each tile that fits the table's resident products: its PTX must load before its wait), RMSNorm
(with and without the residual add), the fused q/k norm + rotary + KV write, the decode kernel and its split
combine, at the Qwen3-0.6B and Llama-3.1-8B shapes; the fused-MoE kernels (the token permutation's four, both
grouped GEMMs in each output mode, the pair sum) at the Qwen3-30B-A3B shape.

Catches what the interpreter misses (it never runs the PDL branches) and checks the PTX: every variant must hold
``griddepcontrol.wait`` and ``griddepcontrol.launch_dependents``, the GEMM's its L2 weight prefetch. Usage:
``python benchmarks/compile_pdl.py [--arch 90] [--rows 1,64] [--only PREFIX]``; one line per variant (seconds,
shared memory, registers, local memory = spills); exits non-zero if one failed.
"""
import argparse
import itertools
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

from compile_prefill_tma import compile_or_report, resource_usage
from flashserve.kernels import norm_linear, skinny_gemm_plans
from flashserve.kernels.decode import _combine_splits_kernel, _decode_kernel, launch_config, merge_tile
from flashserve.kernels.moe import _grouped_gemm_kernel, _sum_pairs_kernel
from flashserve.kernels.moe_routing import _routing_kernel
from flashserve.kernels.moe_align import _align_single_kernel, _count_kernel, _offsets_kernel, _scatter_kernel
from flashserve.kernels.norm import _rms_norm_kernel
from flashserve.kernels.qk_rope_cache import _qk_norm_rope_cache_kernel, _tiles
from flashserve.kernels.skinny_gemm import _skinny_gemm_kernel
from flashserve.kernels.skinny_gemm_resident import _resident_gemm_kernel
from flashserve.kernels.skinny_gemm_prologue import prepass_tile

# Pointer arguments whose element type is not the activations' (bf16); every other ``*_ptr`` argument is bf16.
POINTER_TYPES = {"partial_ptr": "fp32", "counter_ptr": "i32", "cos_sin_ptr": "fp32", "positions_ptr": "i64",
                 "slot_mapping_ptr": "i64", "out_ptr@decode": "fp32", "lse_ptr": "fp32", "part_ptr": "fp32",
                 "block_table_ptr": "i32", "batch_idx_ptr": "i32", "seqlens_k_ptr": "i32", "alibi_ptr": "fp32",
                 "leftpad_ptr": "i32", "key_start_ptr": "i32", "final_lse_ptr": "fp32", "weights_ptr": "fp32",
                 "sorted_ids_ptr": "i32", "block_experts_ptr": "i32", "num_padded_ptr": "i32", "clear_ptr": "fp32",
                 "out_ptr@moe_atomic": "fp32", "ids_ptr": "i64", "padded_starts_ptr": "i32",
                 "chunk_counts_ptr": "i32", "chunk_offsets_ptr": "i32"}
FLOATS = ("eps", "sm_scale", "softcap")
DIVISIBLE = ("n_out", "K", "hidden")  # ints the real shapes make multiples of 16 (strides too)
SHAPES = {"qwen3-0.6b": dict(hidden=1024, heads=16, kv_heads=8, head_dim=128, qk_norm=True),
          "llama-3.1-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, qk_norm=False)}
PAGE, CAPACITY = 16, 4096


def signature(kernel, constexprs: dict, tag: str = "") -> tuple[dict, dict]:
    """Triton type strings of ``kernel``'s arguments and the 16-divisibility the JIT finds at aligned shapes."""
    sig, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + POINTER_TYPES.get(f"{name}@{tag}", POINTER_TYPES.get(name, "bf16"))
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in DIVISIBLE or name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


# (gated, RMSNorm prologue, residual add) of the grid kernel's variants: what the decoder's products use.
GEMM_EPILOGUES = ((False, False, False), (True, False, False), (False, False, True), (False, True, False),
                  (True, True, False))


def _prepass_tiles(rows: int, norm: bool, warps: int) -> set[tuple[int, int]]:
    """(NORM_ROWS, NORM_K) of the pre-pass at the models' K where ``norm`` and the rows fold; (0, 0) otherwise."""
    if not norm:
        return {(0, 0)}
    hiddens = {shape["hidden"] for shape in SHAPES.values()}
    return {prepass_tile(rows, k, warps) for k in hiddens if rows <= norm_linear.max_fused_rows(k, 2)}


def gemm_variants(rows_list: list[int], pdl: bool = True):
    """(name, kernel, constexprs, num_warps, num_stages, tag) of the grid kernel's tiles (with PDL unless told),
    each with and without split-K, in each of GEMM_EPILOGUES (the normed ones with each pre-pass tile of the
    models' K that folds that many rows)."""
    for rows in rows_list:
        tiles = [(tile, True) for tile in skinny_gemm_plans.TILE_CHOICES]
        tiles += [(tile, False) for tile in skinny_gemm_plans.FMA_TILE_CHOICES if rows == 1]
        for (block_n, block_k, warps, stages), use_dot in tiles:
            block_m = skinny_gemm_plans.block_rows(rows) if use_dot else 1
            for gated, norm, residual in GEMM_EPILOGUES:
                for (norm_rows, norm_k), split in itertools.product(sorted(_prepass_tiles(rows, norm, warps)),
                                                                    (False, True)):
                    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, EVEN_K=True,
                                      HAS_BIAS=False, HAS_RESIDUAL=residual, GATED=gated, NORM=norm,
                                      NORM_ROWS=norm_rows, NORM_K=norm_k, USE_DOT=use_dot, DOT_PRECISION="tf32",
                                      PDL=pdl, PREFETCH_K=1024 if pdl else 0)
                    name = (f"gemm {'dot' if use_dot else 'fma'} n{block_n}k{block_k}w{warps}st{stages} M{block_m}"
                            f"{f' norm {norm_rows}x{norm_k}' if norm else ''}{' gated' if gated else ''}"
                            f"{' +residual' if residual else ''}{' split' if split else ''}")
                    yield name, _skinny_gemm_kernel, constexprs, warps, stages, ""


# (n_out, K, gated, norm, residual) of the resident plans in the H200 table: Qwen3-0.6B qkv (normed), o (+residual),
# gate/up (normed), down (+residual); Llama-3.1-8B qkv, o, gate/up at K 4096.
RESIDENT_PRODUCTS = ((4096, 1024, False, True, False), (1024, 2048, False, False, True),
                     (3072, 1024, True, True, False), (1024, 3072, False, False, True),
                     (6144, 4096, False, True, False), (4096, 4096, False, False, True),
                     (14336, 4096, True, True, False))


def resident_variants(rows_list: list[int]):
    """(name, kernel, constexprs, num_warps, num_stages, tag) of the resident kernel (``skinny_gemm_resident``)
    for each resident candidate whose tile fits each of RESIDENT_PRODUCTS at each row count."""
    for rows, (n_out, k, gated, norm, residual) in itertools.product(rows_list, RESIDENT_PRODUCTS):
        for config in skinny_gemm_plans.resident_candidates(k, rows, torch.bfloat16, gated):
            block_n, warps, use_dot = config.block_n, config.num_warps, config.use_dot
            k_pad = triton.next_power_of_2(k)
            block_m = skinny_gemm_plans.block_rows(rows) if use_dot else triton.next_power_of_2(rows)
            constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, K_PAD=k_pad, EVEN_K=k == k_pad, HAS_BIAS=False,
                              HAS_RESIDUAL=residual, GATED=gated, NORM=norm, USE_DOT=use_dot, DOT_PRECISION="tf32",
                              PDL=True)
            name = (f"resident {'dot' if use_dot else 'fma'} n{block_n}w{warps} M{block_m} K{k}"
                    f"{' norm' if norm else ''}{' gated' if gated else ''}{' +residual' if residual else ''}")
            yield name, _resident_gemm_kernel, constexprs, warps, 1, ""


def weights_load_before_the_wait(ptx: str) -> bool:
    """Whether the PTX issues a global load before its first ``griddepcontrol.wait`` (the resident kernel's
    point: its weight tile is in flight while the previous kernel ends)."""
    wait = ptx.find("griddepcontrol.wait")
    return 0 <= ptx.find("ld.global") < wait


def layer_variants():
    """(name, kernel, constexprs, num_warps, num_stages, tag) of the other decode-step kernels with PDL."""
    for shape_name, shape in SHAPES.items():
        block = triton.next_power_of_2(shape["hidden"])
        for add in (False, True):
            yield (f"rms_norm {shape_name}{' +residual' if add else ''}", _rms_norm_kernel,
                   dict(ADD_RESIDUAL=add, BLOCK=block, PDL=True), min(16, max(1, block // 256)), 3, "")
        _, tiles = _tiles(shape["heads"], shape["kv_heads"], shape["head_dim"], shape["head_dim"])
        yield (f"qk_norm_rope_cache {shape_name}", _qk_norm_rope_cache_kernel,
               dict(tiles, CACHE_BLOCK_SIZE=PAGE, NORM=shape["qk_norm"], WRITE_CACHE=True, INTERLEAVED=False,
                    PDL=True), 4, 3, "")
        grid, splits, block_m, block_n, block_d, _, block_h, block_s, combine_warps = launch_config(
            1, 1, shape["heads"], shape["kv_heads"], shape["head_dim"], CAPACITY, 0, torch.device("cpu"))
        merge_rows, merge_splits = merge_tile(shape["heads"] // shape["kv_heads"], block_m, block_s, block_d)
        for fused in (False, True):
            yield (f"decode {shape_name} B1 splits {splits}{' fused combine' if fused else ''}", _decode_kernel,
                   dict(GROUP=shape["heads"] // shape["kv_heads"], BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_D=block_d, PAGE_SIZE=PAGE, PAGED=True, HAS_BATCH_IDX=False, HAS_LEFTPAD=False,
                        HAS_KEY_START=False, HAS_LEFT=False, HAS_RIGHT=True, HAS_SOFTCAP=False, HAS_ALIBI=False,
                        UPCAST=False, DOT_PRECISION="tf32", FUSED_COMBINE=fused, BLOCK_S=block_s,
                        MERGE_ROWS=merge_rows if fused else 1, MERGE_SPLITS=merge_splits if fused else 1, PDL=True),
                   4, 3, "decode")
        yield (f"combine {shape_name} B1 splits {splits}", _combine_splits_kernel,
               dict(NUM_HEADS=shape["heads"], HEAD_DIM=shape["head_dim"], WRITE_LSE=False, BLOCK_H=block_h,
                    BLOCK_S=block_s, BLOCK_D=block_d, PDL=True), combine_warps, 3, "")


def moe_variants():
    """(name, kernel, constexprs, num_warps, num_stages, tag) of the fused-MoE kernels with PDL (Qwen3-30B-A3B's
    128 experts: decode and prefill tiles of its tuned table)."""
    for experts, top_k in ((128, 8), (8, 2), (60, 4)):
        block_e = 1 << (experts - 1).bit_length()
        yield (f"moe routing E{experts} k{top_k}", _routing_kernel,
               dict(TOP_K=top_k, RENORMALIZE=True, BLOCK_T=max(1, min(16, 4096 // block_e)), BLOCK_E=block_e,
                    BLOCK_K=1 << (top_k - 1).bit_length(), PDL=True), 4, 1, "")
    align = dict(BLOCK_E=128, PDL=True)
    yield "moe align single", _align_single_kernel, dict(align, BLOCK_M=16, BLOCK_P=32, BLOCK_R=128,
                                                          FILL_BLOCK=4096), 8, 1, ""
    yield "moe align count", _count_kernel, dict(align, BLOCK_P=128), 4, 1, ""
    yield "moe align offsets", _offsets_kernel, dict(align, BLOCK_M=128, BLOCK_R=128, BLOCK_C=128,
                                                      FILL_BLOCK=4096), 4, 1, ""
    yield "moe align scatter", _scatter_kernel, dict(align, BLOCK_P=128), 4, 1, ""
    gemm = dict(DOT_PRECISION="tf32", SPLIT_K=1, PDL=True)
    yield ("moe gate/up 16x32x128 +clear", _grouped_gemm_kernel,
           dict(gemm, GATED=True, PAIR_OUTPUTS=False, CLEAR=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128), 4, 3, "")
    yield ("moe gate/up 128x128x64", _grouped_gemm_kernel,
           dict(gemm, GATED=True, PAIR_OUTPUTS=False, CLEAR=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 4, "")
    yield ("moe down 16x64x128 atomic", _grouped_gemm_kernel,
           dict(gemm, GATED=False, PAIR_OUTPUTS=False, CLEAR=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), 4, 2,
           "moe_atomic")
    yield ("moe down 128x256x64 pair outputs", _grouped_gemm_kernel,
           dict(gemm, GATED=False, PAIR_OUTPUTS=True, CLEAR=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 8, 4, "")
    for has_residual in (False, True):
        yield (f"moe pair sum{' + residual' if has_residual else ''}", _sum_pairs_kernel,
               dict(BLOCK_N=1024, HAS_RESIDUAL=has_residual, PDL=True), 4, 1, "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, >= 90 (PDL needs Hopper)")
    parser.add_argument("--rows", default="1,64", help="GEMM row counts (each gives its rows tile)")
    parser.add_argument("--only", default="", help="compile only the variants whose name starts with this")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 64)
    print(f"triton {triton.__version__}, target sm_{args.arch}, bf16, PDL variants")
    failures = 0
    rows_list = [int(r) for r in args.rows.split(",")]
    variants = list(layer_variants()) + list(gemm_variants(rows_list)) + list(resident_variants(rows_list))
    variants += list(moe_variants())
    for name, kernel, constexprs, warps, stages, tag in variants:
        if not name.startswith(args.only):
            continue
        sig, attrs = signature(kernel, constexprs, tag)
        start = time.perf_counter()
        compiled = compile_or_report(kernel, name, sig, attrs, constexprs, target,
                                     {"num_warps": warps, "num_stages": stages, "launch_pdl": True})
        if compiled is None:
            failures += 1
            continue
        ptx = compiled.asm["ptx"]
        wanted = ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]
        wanted += ["prefetch.global.L2"] if kernel is _skinny_gemm_kernel else []
        missing = [text for text in wanted if text not in ptx]
        if kernel is _resident_gemm_kernel and not weights_load_before_the_wait(ptx):
            missing.append("a global load before griddepcontrol.wait")
        failures += bool(missing)
        print(f"{'FAIL' if missing else 'ok  '} {name}: {time.perf_counter() - start:.1f} s, shared "
              f"{compiled.metadata.shared} B, {resource_usage(compiled.asm['cubin'])}"
              f"{', PTX lacks ' + ', '.join(missing) if missing else ''}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
