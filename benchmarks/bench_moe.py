"""Benchmark: the fused-MoE kernel on Qwen3-30B-A3B and Mixtral 8x7B layer shapes, beside a plain-PyTorch loop over
the experts, the HBM copy bandwidth and the dense bf16 matmul rate measured in the same run; optionally a sweep of
launch configurations (--tune) and an end-to-end decode run (--e2e).

Kernel section (bf16): per shape and token count, fresh random hidden states and router logits; ``fused_experts``
(the two grouped-GEMM launches with the device-side permutation, routing precomputed) timed from a CUDA graph
(median of replays: device time) and eagerly, ``fused_moe`` (routing included) from a graph, and the PyTorch loop
(``reference.fused_experts`` in bf16, one gather/matmul/index_add per expert that got tokens; eager, it syncs).
Decode counts also as the engine runs them: ``CHAIN_CALLS`` calls back to back in one graph, each over the next of
``CHAIN_WEIGHT_SETS`` weight sets (as consecutive layers: no call finds the previous one's weights in L2), per call
("chain"); a one-call graph also pays the graph's launch and the GPU's ramp once per call, which a decode step's
graph pays once per step.
"+ residual": ``fused_experts`` with the layer's residual stream passed (``residual=``), as the decoder runs it: the
launch that sums each token's rows also adds the residual, which the unfused layer does in a ``torch.add`` of its
own (timed beside it).
Decode token counts (1-64) in TB/s of the expert weights actually read (experts that got a token x 3 x H x I x 2
bytes) against the copy bandwidth; 4096 tokens in TFLOP/s (6 x T x k x H x I) against torch.matmul of two
8192 x 8192 bf16 matrices. Bars of issue 13: >= 70% of the copy bandwidth at >= 4 tokens, >= 50% of the matmul rate
at 4096 tokens.

--tune (``moe_tune``): per shape at each ``--tune-tp`` size (the experts' intermediate size split as each
tensor-parallel rank runs it) and token bucket of ``moe_configs.TOKEN_BUCKETS``, every candidate config of each
GEMM timed alone from a CUDA graph; writes the chosen table to DIR/moe_tuned/<GPU name>.json (moe_configs' format:
copy it to flashserve/kernels/moe_tuned/) and prints the number of configs x shapes and the expected time first.

--e2e (``moe_e2e``): a random-weight Qwen3-30B-A3B-shaped checkpoint with 8 of its 48 layers (~11 GB, bf16,
drawn on the GPU and written shard by shard), the engine with CUDA graphs, decode ms/step at batch 1 and 64
(128-token prompts) beside the bytes a step must read (attention, router and LM-head weights, the experts expected
to be hit under uniform routing, the KV cache) and the time that takes at the copy bandwidth (roofline).

Usage (GPU): python benchmarks/bench_moe.py [--tune [--tune-tp 1,2,4]] [--e2e] [--skip-kernel]
[--shapes qwen3-30b-a3b,mixtral-8x7b] [--out DIR].
``TRITON_INTERPRET=1 python benchmarks/bench_moe.py --quick [--tune]``: tiny shapes in float32 on the CPU (the
kernels in Triton's interpreter, wall-clock timers), to check the script; ``--quick --e2e`` (better without the
interpreter, which is slow for whole models) checks the end-to-end part on a tiny checkpoint.
"""
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402 - after the repository is on the path
import moe_e2e  # noqa: E402
import moe_tune  # noqa: E402
from flashserve.kernels import moe as kernel  # noqa: E402
from flashserve.kernels.moe_configs import MoeGemmConfig, device_table, moe_configs  # noqa: E402
from flashserve.kernels.reference import moe as reference  # noqa: E402

# name -> (hidden, experts, top_k, expert intermediate)
SHAPES = {"qwen3-30b-a3b": (2048, 128, 8, 768), "mixtral-8x7b": (4096, 8, 2, 14336)}
DECODE_TOKENS, PREFILL_TOKENS = (1, 2, 4, 8, 16, 32, 64), 4096
CHAIN_CALLS, CHAIN_WEIGHT_SETS = 8, 4  # the decode counts' chained timing (module docstring)
DEVICE, DTYPE = "cuda", torch.bfloat16
QUICK_SHAPES = {"qwen3-30b-a3b": (64, 16, 4, 32), "mixtral-8x7b": (32, 4, 2, 48)}
QUICK_DECODE_TOKENS, QUICK_PREFILL_TOKENS = (1, 4), 64
TP_SIZES = "1,2,4"
QWEN3_30B_A3B_8L = dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
                        head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                        num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
                        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
QUICK_E2E = dict(QWEN3_30B_A3B_8L, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                 vocab_size=1000, max_position_embeddings=4096)
E2E_SPEC = QWEN3_30B_A3B_8L


def bench_us(fn) -> float:
    return common.bench_us(fn, warmup_ms=25, rep_ms=100) if DEVICE == "cuda" else cpu_us(fn)


def graph_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    return common.graph_us(fn, warmup_ms, rep_ms) if DEVICE == "cuda" else cpu_us(fn)


def cpu_us(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def copy_tbs() -> float:
    if DEVICE == "cuda":
        return common.copy_bandwidth_tbs()
    src = torch.randn(2 ** 22)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cpu_us(lambda: dst.copy_(src)) / 1e6


def matmul_tflops() -> float:
    size = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(size, size, device=DEVICE, dtype=DTYPE)
    b = torch.randn(size, size, device=DEVICE, dtype=DTYPE)
    return 2 * size ** 3 / bench_us(lambda: a @ b) / 1e6


def layer_inputs(shape, num_tokens: int, seed: int):
    hidden, num_experts, top_k, _ = shape
    generator = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=DTYPE, generator=generator)
    logits = torch.randn(num_tokens, num_experts, device=DEVICE, generator=generator)
    weights, ids = reference.moe_routing(logits, top_k, True)
    return x, logits, weights, ids


def run_kernel_shape(name: str, copy_tbs: float, dense_tflops: float) -> list[dict]:
    hidden, num_experts, top_k, intermediate = shape = SHAPES[name]
    weight_sets = [(torch.randn(num_experts, 2 * intermediate, hidden, device=DEVICE, dtype=DTYPE) * hidden ** -0.5,
                    torch.randn(num_experts, hidden, intermediate, device=DEVICE, dtype=DTYPE) * intermediate ** -0.5)
                   for _ in range(CHAIN_WEIGHT_SETS)]
    w13, w2 = weight_sets[0]
    expert_bytes = 3 * hidden * intermediate * 2
    rows = []
    for num_tokens in (*DECODE_TOKENS, PREFILL_TOKENS):
        x, logits, weights, ids = layer_inputs(shape, num_tokens, seed=num_tokens)
        residual = torch.randn_like(x)
        configs = moe_configs(num_tokens, num_experts, hidden, intermediate, top_k, device=x.device)
        out = kernel.fused_experts(x, w13, w2, weights, ids)
        loop_out = reference.fused_experts(x, w13, w2, weights, ids, compute_dtype=DTYPE)
        hit = int(torch.unique(ids).numel())
        row = dict(shape=name, tokens=num_tokens, experts_hit=hit, expert_bytes=hit * expert_bytes,
                   flops=6 * num_tokens * top_k * hidden * intermediate,
                   max_abs_diff_vs_loop=(out.float() - loop_out.float()).abs().max().item(),
                   ours_graph_us=graph_us(lambda: kernel.fused_experts(x, w13, w2, weights, ids)),
                   ours_eager_us=bench_us(lambda: kernel.fused_experts(x, w13, w2, weights, ids)),
                   residual_graph_us=graph_us(lambda: kernel.fused_experts(x, w13, w2, weights, ids,
                                                                           residual=residual)),
                   residual_add_us=graph_us(lambda: torch.add(out, residual)),
                   layer_graph_us=graph_us(lambda: kernel.fused_moe(x, w13, w2, logits, top_k, True)),
                   align_graph_us=graph_us(lambda: kernel.moe_align_block_size(ids, configs[0].block_m,
                                                                               num_experts)),
                   loop_us=bench_us(lambda: reference.fused_experts(x, w13, w2, weights, ids,
                                                                    compute_dtype=DTYPE)),
                   configs=[vars_of(c) for c in configs])
        if num_tokens in DECODE_TOKENS:
            def chain(x=x, weights=weights, ids=ids):
                for call in range(CHAIN_CALLS):
                    kernel.fused_experts(x, *weight_sets[call % CHAIN_WEIGHT_SETS], weights, ids)
            row["ours_chain_us"] = graph_us(chain) / CHAIN_CALLS
        for key in ("ours_graph", "ours_eager", "loop") + (("ours_chain",) if "ours_chain_us" in row else ()):
            row[f"{key}_tbs"] = row["expert_bytes"] / row[f"{key}_us"] / 1e6
            row[f"{key}_tflops"] = row["flops"] / row[f"{key}_us"] / 1e6
        row["pct_copy"] = 100 * row["ours_graph_tbs"] / copy_tbs
        if "ours_chain_us" in row:
            row["pct_copy_chain"] = 100 * row["ours_chain_tbs"] / copy_tbs
        row["pct_matmul"] = 100 * row["ours_graph_tflops"] / dense_tflops
        row["pct_matmul_residual"] = 100 * row["flops"] / row["residual_graph_us"] / 1e6 / dense_tflops
        rows.append(row)
        print(f"  {name} T={num_tokens}: {row['ours_graph_us']:.1f} µs, {row['ours_graph_tbs']:.2f} TB/s "
              f"({row['pct_copy']:.0f}% copy), {row['ours_graph_tflops']:.0f} TFLOP/s, loop {row['loop_us']:.0f} µs")
    return rows


def vars_of(config: MoeGemmConfig) -> dict:
    return {field: getattr(config, field) for field in MoeGemmConfig.__slots__}


def kernel_markdown(rows, copy_tbs, dense_tflops) -> str:
    header = ["shape", "T", "experts hit", "ours µs (graph)", "of it: align µs", "eager µs",
              "layer µs (graph, + routing)", "µs per call (chain)", "% copy (chain)",
              "TB/s", "% copy", "TFLOP/s", "% matmul", "+ residual µs (graph)", "% matmul (+ residual)",
              "torch.add µs", "loop µs", "× loop", "max |Δ| vs loop"]
    table = [[r["shape"], r["tokens"], r["experts_hit"], f"{r['ours_graph_us']:.1f}", f"{r['align_graph_us']:.1f}",
              f"{r['ours_eager_us']:.1f}", f"{r['layer_graph_us']:.1f}",
              f"{r['ours_chain_us']:.1f}" if "ours_chain_us" in r else "-",
              f"{r['pct_copy_chain']:.0f}%" if "ours_chain_us" in r else "-",
              f"{r['ours_graph_tbs']:.2f}", f"{r['pct_copy']:.0f}%",
              f"{r['ours_graph_tflops']:.0f}", f"{r['pct_matmul']:.0f}%", f"{r['residual_graph_us']:.1f}",
              f"{r['pct_matmul_residual']:.0f}%", f"{r['residual_add_us']:.1f}", f"{r['loop_us']:.0f}",
              f"{r['loop_us'] / r['ours_graph_us']:.1f}", f"{r['max_abs_diff_vs_loop']:.3g}"] for r in rows]
    return (f"Copy bandwidth {copy_tbs:.2f} TB/s, dense matmul (8192³ on a GPU) {dense_tflops:.0f} TFLOP/s.\n\n"
            + common.markdown_table(header, table))


def tune_section(args, names: list[str], env: dict) -> tuple[str, list]:
    """--tune: print the sweep's size, run it, write the table file; (markdown, JSON payload) of the choices."""
    tp_sizes = [int(size) for size in args.tune_tp.split(",") if size]
    shapes = moe_tune.tune_shapes(SHAPES, names, tp_sizes)
    smem = moe_tune.device_shared_memory() if DEVICE == "cuda" else moe_tune.H200_SHARED_MEMORY
    plan = moe_tune.plan(shapes, smem)
    print(f"tune: {plan['shapes']} shapes x {plan['buckets']} buckets, {plan['compiles']} kernels to compile, "
          f"{plan['timings']} timings: about {plan['estimate_s'] / 60:.1f} min")
    quick = DEVICE != "cuda"
    start = time.perf_counter()
    tuned = [moe_tune.tune_shape(label, shape, smem, graph_us, DTYPE, DEVICE, max_tokens=PREFILL_TOKENS,
                                 max_candidates=2 if quick else None) for label, shape in shapes]
    elapsed_s = time.perf_counter() - start
    device_name = env["gpu"] if DEVICE == "cuda" else "cpu"
    path = moe_tune.write_table(args.out, device_name, tuned, dict(env, tune_s=elapsed_s),
                                installed=device_table(device_name))
    payload = [dict(label=t["label"], key=t["key"], report=[dict(r, gate_up=vars_of(r["gate_up"]),
                                                                 down=vars_of(r["down"])) for r in t["report"]])
               for t in tuned]
    rows = [[t["label"], r["bucket"], r["tokens"], _config_text(r["gate_up"]), _config_text(r["down"]),
             f"{r['gate_up_us']:.1f} + {r['down_us']:.1f}", f"{r['default_us']:.1f}",
             f"{r['default_us'] / r['us']:.2f}"]
            for t in tuned for r in t["report"]]
    text = (f"\n### Tuned launch configurations ({elapsed_s:.0f} s; table: `{path}`, copy it to "
            "`flashserve/kernels/moe_tuned/`)\n\nµs: the two GEMMs summed over the bucket's token counts.\n\n"
            + common.markdown_table(["shape", "bucket", "tokens", "gate/up (m, n, k, warps, stages, split-K)",
                                     "down (m, n, k, warps, stages, split-K)", "tuned µs (gate/up + down)",
                                     "default µs", "× default"], rows) + "\n")
    return text, payload


def _config_text(config: MoeGemmConfig) -> str:
    return ", ".join(str(getattr(config, field)) for field in MoeGemmConfig.__slots__)


def use_quick_settings() -> None:
    """--quick: the CPU, float32 (the interpreter computes bfloat16 wrongly), tiny shapes and token counts."""
    global DEVICE, DTYPE, SHAPES, DECODE_TOKENS, PREFILL_TOKENS, E2E_SPEC
    DEVICE, DTYPE, SHAPES, E2E_SPEC = "cpu", torch.float32, QUICK_SHAPES, QUICK_E2E
    DECODE_TOKENS, PREFILL_TOKENS = QUICK_DECODE_TOKENS, QUICK_PREFILL_TOKENS


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=",".join(SHAPES))
    parser.add_argument("--tune", action="store_true", help="sweep the launch configurations")
    parser.add_argument("--tune-tp", default=TP_SIZES, help="tensor-parallel sizes whose expert shards --tune sweeps")
    parser.add_argument("--e2e", action="store_true", help="the end-to-end decode run")
    parser.add_argument("--skip-kernel", action="store_true", help="skip the kernel section")
    parser.add_argument("--work-dir", default=None, help="where the e2e checkpoint goes (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke run)")
    args = parser.parse_args()
    if args.quick:
        use_quick_settings()
    names = [n for n in args.shapes.split(",") if n]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    env = common.environment()
    copy_rate, dense_tflops = copy_tbs(), matmul_tflops()
    payload = dict(meta=env, copy_tbs=copy_rate, matmul_tflops=dense_tflops)
    text = common.section_header(f"Fused MoE ({str(DTYPE).replace('torch.', '')})", env)
    if not args.skip_kernel:
        rows = [row for name in names for row in run_kernel_shape(name, copy_rate, dense_tflops)]
        payload["kernel"] = rows
        text += kernel_markdown(rows, copy_rate, dense_tflops) + "\n"
        decode = [r for r in rows if r["tokens"] >= 4 and "ours_chain_us" in r]
        text += (f"\nDecode (4-64 tokens): one call per graph {min(r['pct_copy'] for r in decode):.0f}-"
                 f"{max(r['pct_copy'] for r in decode):.0f}%, {CHAIN_CALLS} calls per graph "
                 f"{min(r['pct_copy_chain'] for r in decode):.0f}-{max(r['pct_copy_chain'] for r in decode):.0f}% "
                 "of the copy bandwidth (bar 70%); 4096 tokens: "
                 + ", ".join(f"{r['shape']} {r['pct_matmul']:.0f}%" for r in rows if r["tokens"] == PREFILL_TOKENS)
                 + " of the matmul rate (bar 50%).\n")
    if args.tune:
        tune_text, payload["tuned"] = tune_section(args, names, env)
        text += tune_text
    if args.e2e:
        result = moe_e2e.run_e2e(tempfile.mkdtemp(prefix="bench-moe-", dir=args.work_dir), E2E_SPEC, copy_rate,
                                 DTYPE, DEVICE)
        payload["e2e"] = result
        text += "\n### End to end: Qwen3-30B-A3B shape, 8 of 48 layers, CUDA graphs\n\n" + moe_e2e.markdown(result)
    common.write_results(args.out, "bench_moe", text, payload)


if __name__ == "__main__":
    main()
