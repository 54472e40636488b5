"""Benchmark: small-M matrix products (flashserve.kernels.linear / linear_silu_and_mul) vs torch.matmul.

The projection shapes of Qwen3-0.6B and Llama-3.1-8B (qkv, o, gate_up, down, lm_head; weights (N, K) bf16) for
M in {1, 2, 4, 8, 16, 32, 64, 128, 256} rows. Every timing replays a CUDA graph of back-to-back calls, each on its
own copy of the weight (copies totalling >= 512 MB, so that L2 never holds the next weight), divided by the
number of calls: device time per call as a decode step's graph runs it, launch gaps included. TB/s counts the
weight bytes once. Columns: torch.matmul (``x @ w.T``); "kernel" (our Triton kernel with the plan's config, or
the table's when the plan is cuBLAS); "linear" (the dispatch the engine calls: kernel or cuBLAS per the plan).
gate_up runs ours fused with the SiLU-and-mul (its output is half as wide) against torch.matmul alone. Plans
are tuned at the first call (``skinny_gemm_plans.tuning()``; ``--no-tune``: the table only); the HBM copy
bandwidth is measured in the same run. Bar: "linear" >= 85% of the copy bandwidth at M <= 8 for every shape
with >= 8 MB of weights (printed at the end); ratio = torch µs / linear µs.
``--sweep`` instead times every candidate config per shape and row bucket and writes the measured plan table
(``benchmarks/bench_gemm_sweep.py``).
Usage: python benchmarks/bench_gemm.py [--out DIR] [--no-tune] [--models Qwen3-0.6B,Llama-3.1-8B]
       [--sweep [--all] [--rows 1,2,4,8,16,32,64] [--margin 0.02] [--jobs 8] [--no-pdl]]
"""
import math
import os

import torch

import common
from flashserve.kernels import linear, linear_silu_and_mul, reference, skinny_gemm, skinny_gemm_plans

MODELS = {
    "Qwen3-0.6B": dict(hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936),
    "Llama-3.1-8B": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256),
}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
ROTATION_BYTES = 512 << 20
BAR_MIN_WEIGHT_BYTES, BAR_MAX_ROWS, BAR_FRACTION = 8e6, 8, 0.85


def projections(model: dict) -> list[tuple[str, int, int, bool]]:
    """(name, weight rows N, K, gated) of a model's projections."""
    q, kv = model["heads"] * model["head_dim"], model["kv_heads"] * model["head_dim"]
    hidden = model["hidden"]
    return [("qkv", q + 2 * kv, hidden, False), ("o", hidden, q, False),
            ("gate_up", 2 * model["intermediate"], hidden, True), ("down", hidden, model["intermediate"], False),
            ("lm_head", model["vocab"], hidden, False)]


def per_call_us(call, weights, x, warmup_ms: int = 10, rep_ms: int = 50) -> float:
    """Median µs per call of a CUDA graph holding ``call(x, w)`` for every weight in turn."""
    return common.graph_us(lambda: [call(x, w) for w in weights], warmup_ms=warmup_ms, rep_ms=rep_ms) / len(weights)


def rotating_weights(n: int, k: int) -> list[torch.Tensor]:
    """Copies of a random (n, k) bf16 weight totalling >= ROTATION_BYTES (at least two), so L2 never holds the next."""
    copies = max(2, math.ceil(ROTATION_BYTES / (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


def run_shape(model_name: str, name: str, n: int, k: int, gated: bool) -> list[dict]:
    weight_bytes = n * k * 2
    weights = rotating_weights(n, k)
    ours = linear_silu_and_mul if gated else linear
    rows_out = []
    for rows in ROWS:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        with skinny_gemm_plans.tuning():
            ours(x, weights[0])  # makes the plan (measured once when tuning is on)
        row = dict(model=model_name, proj=name, n=n, k=k, weight_mb=weight_bytes / 1e6, m=rows,
                   torch_us=per_call_us(lambda a, w: a @ w.T, weights, x), linear_us=per_call_us(ours, weights, x))
        if rows <= skinny_gemm.MAX_ROWS:
            key = (n // 2 if gated else n, k, skinny_gemm_plans.row_bucket(rows), "bfloat16", gated)
            plan = skinny_gemm_plans.lookup(key)  # outside tuning(): the plan the first call made
            config = plan if plan != skinny_gemm_plans.CUBLAS else skinny_gemm_plans.kernel_config(
                key[0], k, rows, torch.bfloat16, x.device)
            row["plan"] = "cuBLAS" if plan == skinny_gemm_plans.CUBLAS else config_name(plan)
            row["kernel_config"] = config_name(config)
            kernel = lambda a, w: skinny_gemm.launch(a, w, None, None, gated, config)  # noqa: E731
            row["kernel_us"] = per_call_us(kernel, weights, x)
            check = skinny_gemm.launch(x, weights[0], None, None, gated, config)
            oracle = reference.linear_silu_and_mul if gated else reference.linear
            row["max_abs_diff"] = (check.float() - oracle(x.float(), weights[0].float())).abs().max().item()
        for column in ("torch", "linear", "kernel"):
            if f"{column}_us" in row:
                row[f"{column}_tbs"] = weight_bytes / row[f"{column}_us"] / 1e6
        row["ratio"] = row["torch_us"] / row["linear_us"]
        rows_out.append(row)
        print(f"  {model_name} {name} M={rows}: torch {row['torch_us']:.1f} µs, linear {row['linear_us']:.1f} µs "
              f"({row.get('plan', 'torch')})", flush=True)
    del weights
    torch.cuda.empty_cache()
    return rows_out


def config_name(config) -> str:
    """E.g. ``dot n64k128s4w4st4`` (grid kernel, split-K 4), ``sk-fma n16k256p2w4st1`` (stream-K, 2 per SM),
    ``sk-dot-pdl n64k128p1w4st4`` (stream-K with programmatic dependent launch), ``res-fma n8w4`` (resident)."""
    kind = ("dot" if config.use_dot else "fma") + ("-pdl" if config.pdl else "")
    if config.resident:
        return f"res-{kind} n{config.block_n}w{config.num_warps}"
    if config.programs_per_sm:
        return f"sk-{kind} n{config.block_n}k{config.block_k}p{config.programs_per_sm}w{config.num_warps}" \
            f"st{config.num_stages}"
    return f"{kind} n{config.block_n}k{config.block_k}s{config.split_k}w{config.num_warps}st{config.num_stages}"


def markdown(rows, copy_tbs: float) -> str:
    header = ["model", "proj", "N x K", "MB", "M", "torch µs", "linear µs", "ratio", "torch TB/s", "linear TB/s",
              "% copy", "kernel µs", "kernel TB/s", "plan"]
    body = [[r["model"], r["proj"], f"{r['n']}x{r['k']}", f"{r['weight_mb']:.1f}", r["m"], f"{r['torch_us']:.1f}",
             f"{r['linear_us']:.1f}", f"{r['ratio']:.2f}", f"{r['torch_tbs']:.2f}", f"{r['linear_tbs']:.2f}",
             f"{100 * r['linear_tbs'] / copy_tbs:.0f}%", f"{r['kernel_us']:.1f}" if "kernel_us" in r else "-",
             f"{r['kernel_tbs']:.2f}" if "kernel_tbs" in r else "-", r.get("plan", "torch (M > 64)")]
            for r in rows]
    return f"HBM copy bandwidth: {copy_tbs:.2f} TB/s\n\n" + common.markdown_table(header, body)


def bar_lines(rows, copy_tbs: float) -> list[str]:
    """One line per shape and M the bar covers, and a verdict."""
    covered = [r for r in rows if r["m"] <= BAR_MAX_ROWS and r["weight_mb"] * 1e6 >= BAR_MIN_WEIGHT_BYTES]
    lines = [f"{'PASS' if r['linear_tbs'] >= BAR_FRACTION * copy_tbs else 'FAIL'} {r['model']} {r['proj']} "
             f"M={r['m']}: {100 * r['linear_tbs'] / copy_tbs:.0f}% of copy" for r in covered]
    failed = sum(line.startswith("FAIL") for line in lines)
    lines.append(f"bar (>= {100 * BAR_FRACTION:.0f}% of copy at M <= {BAR_MAX_ROWS}, weights >= 8 MB): "
                 f"{len(covered) - failed}/{len(covered)} pass")
    return lines


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--no-tune", action="store_true", help="use the plan table only (FLASHSERVE_AUTOTUNE=0)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--sweep", action="store_true", help="time every candidate config per shape and row bucket "
                        "instead, and write the plan table (bench_gemm_sweep.py)")
    parser.add_argument("--all", action="store_true", help="with --sweep: every grid-kernel candidate too")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64", help="with --sweep: the row counts")
    parser.add_argument("--margin", type=float, default=0.02, help="with --sweep: how much faster than cuBLAS "
                        "(a fraction) ours must be to enter the table")
    parser.add_argument("--jobs", type=int, default=8, help="with --sweep: processes compiling the kernel variants "
                        "before the timing (0: compile as the sweep goes)")
    parser.add_argument("--no-pdl", action="store_true", help="with --sweep: keep configs with programmatic "
                        "dependent launch out of the plan table")
    args = parser.parse_args()
    if args.sweep:
        import bench_gemm_sweep
        return bench_gemm_sweep.main(args)
    if args.no_tune:
        os.environ["FLASHSERVE_AUTOTUNE"] = "0"
    copy_tbs = common.copy_bandwidth_tbs()
    rows = []
    for model_name in args.models.split(","):
        for name, n, k, gated in projections(MODELS[model_name]):
            rows += run_shape(model_name, name, n, k, gated)
    env = common.environment()
    verdict = bar_lines(rows, copy_tbs)
    text = common.section_header("Small-M matrix products vs torch.matmul", env) + markdown(rows, copy_tbs)
    text += "\n\n" + "\n".join(f"- {line}" for line in verdict)
    common.write_results(args.out, "bench_gemm", text, dict(meta=env, copy_tbs=copy_tbs, rows=rows))


if __name__ == "__main__":
    main()
