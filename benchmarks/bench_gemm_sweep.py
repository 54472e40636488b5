"""Sweep of the small-M matrix product's launch configs: each projection shape of bench_gemm (Qwen3-0.6B,
Llama-3.1-8B; bf16 weights (N, K)) and each row bucket M in {1, 2, 4, 8, 16, 32, 64}, every swept config against
cuBLAS and the HBM copy bandwidth, to rewrite the measured plan table (``flashserve/kernels/skinny_gemm_table.py``).

Swept configs: every stream-K config of every tile (``streamk_candidates``: the start-up tuning tries none of
them), the grid kernel's table config (``kernel_config``: the kernel before stream-K) and its tuning
candidates with the first two tiles, the resident configs that fit (``resident_candidates``); ``--all``: every
grid-kernel candidate too (many more compiles).
Each is checked once against the fp32 oracle (FlashAttention's rule: error <= 2x torch's in bf16 + 1e-3; a config
that fails is reported and never chosen) and timed as bench_gemm times: a CUDA graph of back-to-back calls on
rotating weight copies (>= 512 MB, so L2 never holds the next), per call. "cuBLAS" is the engine's fallback
(``F.linear``; gated: ``F.linear`` then the ``silu_and_mul`` kernel); "matmul" is ``x @ w.T`` alone. Also the
launch floor: an empty kernel on every SM, timed the same way: what each call costs before it reads a byte (for an
8 MB weight, 85% of the copy bandwidth leaves ~2.3 µs per call in all). Configs with programmatic dependent launch
("-pdl") overlap each call with the end of the previous one; timed back to back with themselves they gain more
than after the engine's norm or attention kernels (which do not release their dependents early): ``--no-pdl``
keeps them out of the table ("best w/o pdl" shows what remains).

Writes DIR/bench_gemm_sweep.md (the best config per shape and M, % of copy, the bar at M <= 8 for weights >= 8 MB
with the plan the table would choose), DIR/bench_gemm_sweep.json (every timing) and DIR/skinny_gemm_table.py (the
plans: ours where faster than cuBLAS by ``--margin``, else cuBLAS) to copy over flashserve/kernels/.
The kernel variants are compiled first in ``--jobs`` processes at once (into Triton's on-disk cache).
Usage: FLASHSERVE_AUTOTUNE=0 python benchmarks/bench_gemm.py --sweep [--all] [--models ...] [--rows 1,2,4]
       [--margin 0.02] [--jobs 8] [--no-pdl] --out DIR
"""
import concurrent.futures
import dataclasses
import multiprocessing
import time

import torch
import triton
import triton.compiler.errors
import triton.language as tl
import triton.runtime.errors

import bench_gemm
import common
from flashserve.kernels import reference, skinny_gemm, skinny_gemm_plans, skinny_gemm_table

WARMUP_MS, REP_MS = 3, 15  # per timing: ~1,000 timings in a run
FLOOR_CALLS = 256
GRID_TILES = 2  # grid-kernel tiles swept besides the table's (all with --all)
NOT_RUNNABLE = (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError, ValueError)


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 0.0)


def launch_floor_us() -> float:
    """Per-call µs of a graph of FLOOR_CALLS empty launches over every SM."""
    sms = skinny_gemm_plans.num_sms(torch.cuda.current_device())
    out = torch.empty(sms, device="cuda")
    return common.graph_us(lambda: [_empty_kernel[(sms,)](out) for _ in range(FLOOR_CALLS)],
                           WARMUP_MS, REP_MS) / FLOOR_CALLS


def swept_configs(n_out: int, k: int, rows: int, gated: bool, everything: bool) -> list:
    """The configs timed at one shape and row count: every stream-K candidate of every tile, with the grid
    kernel's table config and its candidates of the first GRID_TILES tiles, or (everything) all of its candidates."""
    dtype, device = torch.bfloat16, torch.device("cuda")
    grid = skinny_gemm_plans.candidates(n_out, k, rows, dtype, device, gated)
    if not everything:
        tiles = {tile[:2] for tile in skinny_gemm_plans.TILE_CHOICES[:GRID_TILES]}
        table = skinny_gemm_plans.kernel_config(n_out, k, rows, dtype, device)
        grid = [table] + [c for c in grid if c != table and c.use_dot and (c.block_n, c.block_k) in tiles]
        grid += skinny_gemm_plans.resident_candidates(k, rows, dtype, gated)
    return grid + skinny_gemm_plans.streamk_candidates(k, rows, dtype, device, gated)


def compile_jobs(models: list[str], row_counts: list[int], everything: bool) -> list[tuple]:
    """(N, K, gated, rows, config) for each kernel variant the sweep compiles, once. A variant: the config, the rows
    tile, gating, whether K splits evenly, and how Triton specialises the int arguments (== 1, divisible by 16) —
    for stream-K only N and K (the others are not specialised), for the grid kernel also its split layout."""
    jobs = {}
    for model_name in models:
        for _, n, k, gated in bench_gemm.projections(bench_gemm.MODELS[model_name]):
            n_out = n // 2 if gated else n
            for rows in row_counts:
                for config in swept_configs(n_out, k, rows, gated, everything):
                    tile = skinny_gemm_plans.block_rows(rows) if config.use_dot else rows
                    if config.programs_per_sm or config.resident:
                        ints, even_k = [n_out, k], config.resident or k % config.block_k == 0
                    else:
                        ints = [n_out, k, *skinny_gemm.split_layout(k, config)]
                        even_k = k % ints[3] == 0
                    key = (config, gated, tile, even_k, tuple((v == 1, v % 16 == 0) for v in ints))
                    jobs.setdefault(key, (n, k, gated, rows, config))
    return list(jobs.values())


def _compile(jobs: list[tuple]) -> int:
    """Launch each job once (in a worker process): Triton compiles it into its on-disk cache. Returns failures."""
    failures = 0
    for n, k, gated, rows, config in jobs:
        try:
            weight = torch.zeros(n, k, device="cuda", dtype=torch.bfloat16)
            skinny_gemm.launch(torch.zeros(rows, k, device="cuda", dtype=torch.bfloat16), weight, None, None, gated,
                               config)
        except NOT_RUNNABLE:
            failures += 1
    torch.cuda.synchronize()
    return failures


def precompile(jobs: list[tuple], workers: int) -> None:
    """Compile the sweep's kernel variants in ``workers`` processes at once (Triton's compiler holds the GIL, and
    one variant takes 1-3 s), so that the timed sweep finds them in Triton's cache. Best effort: a variant that
    fails here is compiled (or reported) by the sweep itself."""
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        shares = [jobs[i::workers] for i in range(workers)]
        failures = sum(future.result() for future in [pool.submit(_compile, share) for share in shares if share])
    print(f"compiled {len(jobs)} kernel variants in {workers} processes in {time.perf_counter() - started:.0f} s "
          f"({failures} do not run)", flush=True)


def cublas_path(gated: bool):
    return skinny_gemm._gated_fallback if gated else reference.linear


def sweep_point(weights, rows: int, n_out: int, gated: bool, everything: bool) -> dict:
    """cuBLAS, matmul and every swept config at one shape and row count."""
    k = weights[0].shape[1]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    fallback = cublas_path(gated)
    point = dict(m=rows, cublas_us=bench_gemm.per_call_us(lambda a, w: fallback(a, w, None), weights, x,
                                                          WARMUP_MS, REP_MS),
                 matmul_us=bench_gemm.per_call_us(lambda a, w: a @ w.T, weights, x, WARMUP_MS, REP_MS), configs=[])
    oracle = reference.linear_silu_and_mul if gated else reference.linear
    expected = oracle(x.float(), weights[0].float())
    allowed = 2 * (fallback(x, weights[0], None).float() - expected).abs().max().item() + 1e-3
    for config in swept_configs(n_out, k, rows, gated, everything):
        entry = dict(config=bench_gemm.config_name(config), fields=list(dataclasses.astuple(config)))
        try:
            error = (skinny_gemm.launch(x, weights[0], None, None, gated, config).float() - expected).abs().max()
            entry.update(max_abs_error=error.item(), correct=error.item() <= allowed)
            entry["us"] = bench_gemm.per_call_us(
                lambda a, w: skinny_gemm.launch(a, w, None, None, gated, config), weights, x, WARMUP_MS, REP_MS)
        except NOT_RUNNABLE as failure:
            entry.update(correct=False, error=f"{type(failure).__name__}: {str(failure).splitlines()[0][:120]}")
        point["configs"].append(entry)
    runnable = [c for c in point["configs"] if c["correct"] and c.get("us") == c.get("us")]  # not NaN
    point["best"] = min(runnable, key=lambda c: c["us"]) if runnable else None
    plain = [c for c in runnable if "-pdl" not in c["config"]]
    point["best_without_pdl"] = min(plain, key=lambda c: c["us"]) if plain else None
    point["wrong"] = [c["config"] for c in point["configs"] if not c["correct"]]
    return point


def choose(point: dict, margin: float, pdl: bool) -> dict | None:
    """The best config (of those without programmatic dependent launch unless ``pdl``) where it beats cuBLAS by
    ``margin``, else None (cuBLAS)."""
    best = point["best"] if pdl else point["best_without_pdl"]
    return best if best is not None and best["us"] < (1 - margin) * point["cublas_us"] else None


def table_text(shapes: list[dict], env: dict, margin: float, pdl: bool) -> str:
    """The source of skinny_gemm_table.py holding this sweep's choices."""
    measured = f"{env['date'][:10]}, torch {env['torch']}, triton {env['triton']}, margin {margin}" + (
        "" if pdl else ", no pdl configs")
    lines = [f'"""{skinny_gemm_table.__doc__}"""', f"GPU = {env['gpu']!r}", f"MEASURED = {measured!r}",
             "PLANS: dict[tuple[int, int, int, bool], tuple | None] = {"]
    for shape in shapes:
        for point in shape["points"]:
            chosen = choose(point, margin, pdl)
            key = (shape["n_out"], shape["k"], skinny_gemm_plans.row_bucket(point["m"]), shape["gated"])
            value = "None" if chosen is None else repr(tuple(chosen["fields"]))
            best = f"{point['best']['us']:.1f}" if point["best"] else "-"
            lines.append(f"    # {shape['model']} {shape['proj']}, M {point['m']}: best ours {best} µs, cuBLAS "
                         f"{point['cublas_us']:.1f} µs")
            lines.append(f"    {key!r}: {value},")
    return "\n".join(lines + ["}", ""])


def markdown(shapes: list[dict], copy_tbs: float, floor_us: float, margin: float, pdl: bool) -> str:
    header = ["model", "proj", "N x K", "MB", "M", "ideal µs", "cuBLAS µs", "matmul µs", "best ours µs",
              "best config", "ours % copy", "cuBLAS % copy", "cuBLAS/ours", "best w/o pdl µs", "plan % copy",
              "wrong"]
    body, bar = [], []
    for shape in shapes:
        weight_bytes = shape["weight_bytes"]
        tbs = lambda us: weight_bytes / us / 1e6  # noqa: E731
        for point in shape["points"]:
            best, chosen = point["best"], choose(point, margin, pdl)
            plain = point["best_without_pdl"]
            plan_us = chosen["us"] if chosen else point["cublas_us"]
            body.append([shape["model"], shape["proj"], f"{shape['n']}x{shape['k']}", f"{weight_bytes / 1e6:.1f}",
                         point["m"], f"{weight_bytes / copy_tbs / 1e6:.1f}", f"{point['cublas_us']:.1f}",
                         f"{point['matmul_us']:.1f}", f"{best['us']:.1f}" if best else "-",
                         best["config"] if best else "-", f"{100 * tbs(best['us']) / copy_tbs:.0f}%" if best else "-",
                         f"{100 * tbs(point['cublas_us']) / copy_tbs:.0f}%",
                         f"{point['cublas_us'] / best['us']:.2f}" if best else "-",
                         f"{plain['us']:.1f}" if plain else "-",
                         f"{100 * tbs(plan_us) / copy_tbs:.0f}%", ", ".join(point["wrong"]) or "-"])
            if point["m"] <= bench_gemm.BAR_MAX_ROWS and weight_bytes >= bench_gemm.BAR_MIN_WEIGHT_BYTES:
                passed = tbs(plan_us) >= bench_gemm.BAR_FRACTION * copy_tbs
                bar.append(f"{'PASS' if passed else 'FAIL'} {shape['model']} {shape['proj']} M={point['m']}: "
                           f"{100 * tbs(plan_us) / copy_tbs:.0f}% of copy ({chosen['config'] if chosen else 'cuBLAS'})")
    failed = sum(line.startswith("FAIL") for line in bar)
    bar.append(f"bar (>= {100 * bench_gemm.BAR_FRACTION:.0f}% of copy at M <= {bench_gemm.BAR_MAX_ROWS}, weights "
               f">= 8 MB, with the table's plans): {len(bar) - failed}/{len(bar)} pass")
    return (f"HBM copy bandwidth: {copy_tbs:.2f} TB/s; launch floor (empty kernel on every SM, in a graph): "
            f"{floor_us:.2f} µs per call\n\n" + common.markdown_table(header, body) + "\n\n"
            + "\n".join(f"- {line}" for line in bar))


def main(args) -> None:
    started = time.perf_counter()
    row_counts = [int(m) for m in args.rows.split(",") if m]
    if not all(0 < m <= skinny_gemm.MAX_ROWS for m in row_counts):
        raise ValueError(f"--rows must lie in 1..{skinny_gemm.MAX_ROWS}, got {args.rows}")
    if args.jobs > 0:
        precompile(compile_jobs(args.models.split(","), row_counts, args.all), args.jobs)
    copy_tbs = common.copy_bandwidth_tbs()
    floor_us = launch_floor_us()
    print(f"copy {copy_tbs:.2f} TB/s, launch floor {floor_us:.2f} µs", flush=True)
    shapes = []
    for model_name in args.models.split(","):
        for name, n, k, gated in bench_gemm.projections(bench_gemm.MODELS[model_name]):
            weights = bench_gemm.rotating_weights(n, k)
            shape = dict(model=model_name, proj=name, n=n, k=k, n_out=n // 2 if gated else n, gated=gated,
                         weight_bytes=n * k * 2, points=[])
            for rows in row_counts:
                point = sweep_point(weights, rows, shape["n_out"], gated, args.all)
                shape["points"].append(point)
                best = point["best"]
                print(f"  {model_name} {name} M={rows}: cuBLAS {point['cublas_us']:.1f} µs, best "
                      f"{best['config'] + ' ' + format(best['us'], '.1f') + ' µs' if best else 'none'} "
                      f"[{time.perf_counter() - started:.0f} s]", flush=True)
            shapes.append(shape)
            del weights
            torch.cuda.empty_cache()
    env = common.environment()
    text = common.section_header("Small-M matrix products: config sweep", env)
    text += markdown(shapes, copy_tbs, floor_us, args.margin, not args.no_pdl)
    text += f"\n\nSweep time: {time.perf_counter() - started:.0f} s"
    common.write_results(args.out, "bench_gemm_sweep", text,
                         dict(meta=env, copy_tbs=copy_tbs, launch_floor_us=floor_us, margin=args.margin,
                              shapes=shapes))
    table = table_text(shapes, env, args.margin, not args.no_pdl)
    with open(f"{args.out}/skinny_gemm_table.py", "w") as f:
        f.write(table)
    print(f"\n{args.out}/skinny_gemm_table.py:\n{table}")
