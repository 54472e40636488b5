"""Benchmark: the fused-MoE kernel on Qwen3-30B-A3B and Mixtral 8x7B layer shapes, beside a plain-PyTorch loop over
the experts, the HBM copy bandwidth and the dense bf16 matmul rate measured in the same run; optionally a sweep of
launch configurations (--tune) and an end-to-end decode run (--e2e).

Kernel section (bf16): per shape and token count, fresh random hidden states and router logits; ``fused_experts``
(the two grouped-GEMM launches with the device-side permutation, routing precomputed) timed from a CUDA graph
(median of replays: device time) and eagerly, ``fused_moe`` (routing included) from a graph, and the PyTorch loop
(``reference.fused_experts`` in bf16, one gather/matmul/index_add per expert that got tokens; eager, it syncs).
Decode token counts (1-64) in TB/s of the expert weights actually read (experts that got a token x 3 x H x I x 2
bytes) against the copy bandwidth; 4096 tokens in TFLOP/s (6 x T x k x H x I) against torch.matmul of two
8192 x 8192 bf16 matrices. Bars of issue 13: >= 70% of the copy bandwidth at >= 4 tokens, >= 50% of the matmul rate
at 4096 tokens.

--tune: per shape and token bucket of ``moe_configs.TOKEN_BUCKETS``, every candidate tile of each GEMM timed
alone from a CUDA graph (summed over the bucket's token counts); prints the best as ``TUNED_CONFIGS`` entries.

--e2e: a random-weight Qwen3-30B-A3B-shaped checkpoint with 8 of its 48 layers (~11 GB, bf16, written on the GPU
by ``latency.write_checkpoint``), the engine with CUDA graphs, decode ms/step at batch 1 and 64 (128-token prompts)
beside the bytes a step must read (attention and LM-head weights, the experts expected to be hit under uniform
routing, the KV cache) over the copy bandwidth.

Usage (GPU): python benchmarks/bench_moe.py [--tune] [--e2e] [--shapes qwen3-30b-a3b,mixtral-8x7b] [--out DIR].
``TRITON_INTERPRET=1 python benchmarks/bench_moe.py --quick [--tune]``: tiny shapes in float32 on the CPU (the
kernels in Triton's interpreter, wall-clock timers), to check the script; ``--quick --e2e`` (better without the
interpreter, which is slow for whole models) checks the end-to-end part on a tiny checkpoint.
"""
import itertools
import math
import os
import random
import statistics
import tempfile
import time
import types

import torch

import common
from flashserve.kernels import moe as kernel
from flashserve.kernels.moe_configs import TOKEN_BUCKETS, MoeGemmConfig, moe_configs
from flashserve.kernels.reference import moe as reference

# name -> (hidden, experts, top_k, expert intermediate)
SHAPES = {"qwen3-30b-a3b": (2048, 128, 8, 768), "mixtral-8x7b": (4096, 8, 2, 14336)}
DECODE_TOKENS, PREFILL_TOKENS = (1, 2, 4, 8, 16, 32, 64), 4096
DEVICE, DTYPE = "cuda", torch.bfloat16
QUICK_SHAPES = {"qwen3-30b-a3b": (64, 16, 4, 32), "mixtral-8x7b": (32, 4, 2, 48)}
QUICK_DECODE_TOKENS, QUICK_PREFILL_TOKENS = (1, 4), 64
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
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, device=DEVICE, dtype=DTYPE) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, intermediate, device=DEVICE, dtype=DTYPE) * intermediate ** -0.5
    expert_bytes = 3 * hidden * intermediate * 2
    rows = []
    for num_tokens in (*DECODE_TOKENS, PREFILL_TOKENS):
        x, logits, weights, ids = layer_inputs(shape, num_tokens, seed=num_tokens)
        out = kernel.fused_experts(x, w13, w2, weights, ids)
        loop_out = reference.fused_experts(x, w13, w2, weights, ids, compute_dtype=DTYPE)
        hit = int(torch.unique(ids).numel())
        row = dict(shape=name, tokens=num_tokens, experts_hit=hit, expert_bytes=hit * expert_bytes,
                   flops=6 * num_tokens * top_k * hidden * intermediate,
                   max_abs_diff_vs_loop=(out.float() - loop_out.float()).abs().max().item(),
                   ours_graph_us=graph_us(lambda: kernel.fused_experts(x, w13, w2, weights, ids)),
                   ours_eager_us=bench_us(lambda: kernel.fused_experts(x, w13, w2, weights, ids)),
                   layer_graph_us=graph_us(lambda: kernel.fused_moe(x, w13, w2, logits, top_k, True)),
                   loop_us=bench_us(lambda: reference.fused_experts(x, w13, w2, weights, ids,
                                                                    compute_dtype=DTYPE)),
                   configs=[vars_of(c) for c in moe_configs(num_tokens, num_experts, hidden, intermediate, top_k)])
        for key in ("ours_graph", "ours_eager", "loop"):
            row[f"{key}_tbs"] = row["expert_bytes"] / row[f"{key}_us"] / 1e6
            row[f"{key}_tflops"] = row["flops"] / row[f"{key}_us"] / 1e6
        row["pct_copy"] = 100 * row["ours_graph_tbs"] / copy_tbs
        row["pct_matmul"] = 100 * row["ours_graph_tflops"] / dense_tflops
        rows.append(row)
        print(f"  {name} T={num_tokens}: {row['ours_graph_us']:.1f} µs, {row['ours_graph_tbs']:.2f} TB/s "
              f"({row['pct_copy']:.0f}% copy), {row['ours_graph_tflops']:.0f} TFLOP/s, loop {row['loop_us']:.0f} µs")
    return rows


def vars_of(config: MoeGemmConfig) -> dict:
    return {field: getattr(config, field) for field in MoeGemmConfig.__slots__}


def kernel_markdown(rows, copy_tbs, dense_tflops) -> str:
    header = ["shape", "T", "experts hit", "ours µs (graph)", "eager µs", "layer µs (graph, + routing)",
              "TB/s", "% copy", "TFLOP/s", "% matmul", "loop µs", "× loop", "max |Δ| vs loop"]
    table = [[r["shape"], r["tokens"], r["experts_hit"], f"{r['ours_graph_us']:.1f}", f"{r['ours_eager_us']:.1f}",
              f"{r['layer_graph_us']:.1f}", f"{r['ours_graph_tbs']:.2f}", f"{r['pct_copy']:.0f}%",
              f"{r['ours_graph_tflops']:.0f}", f"{r['pct_matmul']:.0f}%", f"{r['loop_us']:.0f}",
              f"{r['loop_us'] / r['ours_graph_us']:.1f}", f"{r['max_abs_diff_vs_loop']:.3g}"] for r in rows]
    return (f"Copy bandwidth {copy_tbs:.2f} TB/s, dense matmul (8192³ on a GPU) {dense_tflops:.0f} TFLOP/s.\n\n"
            + common.markdown_table(header, table))


def tune_candidates(bucket: int) -> list[MoeGemmConfig]:
    """Tiles worth trying per bucket: few rows per expert at decode (narrow column tiles: more programs to stream
    the weights with), more rows and wider tiles for prefill."""
    block_ms = ((16,), (16, 32), (32, 64), (64, 128))[bucket]
    block_ns = (32, 64, 128) if bucket < 2 else (64, 128, 256)
    block_ks = (64, 128, 256) if bucket < 2 else (64, 128)
    return [MoeGemmConfig(m, n, k, w, s) for m, n, k, w, s in
            itertools.product(block_ms, block_ns, block_ks, (4, 8), (3, 4))]


def config_source(config: MoeGemmConfig) -> str:
    return f"MoeGemmConfig({', '.join(str(getattr(config, f)) for f in MoeGemmConfig.__slots__)})"


def bucket_token_counts(bucket: int, top_k: int) -> list[int]:
    """The token counts a bucket is timed at: its smallest and largest (1 and the bound / top_k for the first)."""
    bounds = (0, *TOKEN_BUCKETS, 8 * TOKEN_BUCKETS[-1])
    low, high = max(1, bounds[bucket] // top_k + 1), max(1, bounds[bucket + 1] // top_k)
    return sorted({low, high})


def time_gemm(shape, num_tokens, config, gated, tensors) -> float:
    hidden, num_experts, top_k, intermediate = shape
    x, w13, w2 = tensors
    _, _, weights, ids = layer_inputs(shape, num_tokens, seed=7)
    alignment = kernel.moe_align_block_size(ids, config.block_m, num_experts)
    activated = torch.randn(num_tokens * top_k, intermediate, device=DEVICE, dtype=DTYPE)
    out = torch.zeros(num_tokens, hidden, device=DEVICE)
    if gated:
        def run():
            kernel._launch(x[:num_tokens], w13, activated, weights, top_k, True, config, alignment)
    else:
        def run():
            kernel._launch(activated, w2, out, weights, top_k, False, config, alignment)
    try:
        run()
    except Exception as error:  # noqa: BLE001 - a tile that does not fit (shared memory, registers) is skipped
        print(f"    skip {config}: {str(error).splitlines()[0][:80]}")
        return math.inf
    us = graph_us(run, warmup_ms=5, rep_ms=20)
    return math.inf if math.isnan(us) else us  # a capture that failed never wins


def tune_shape(name: str) -> dict:
    hidden, num_experts, top_k, intermediate = shape = SHAPES[name]
    x = torch.randn(8 * TOKEN_BUCKETS[-1] // top_k + 1, hidden, device=DEVICE, dtype=DTYPE)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, device=DEVICE, dtype=DTYPE) * 0.02
    w2 = torch.randn(num_experts, hidden, intermediate, device=DEVICE, dtype=DTYPE) * 0.02
    best = []
    for bucket in range(len(TOKEN_BUCKETS) + 1):
        counts = [min(t, PREFILL_TOKENS) for t in bucket_token_counts(bucket, top_k)]
        pair = []
        for gated in (True, False):
            timed = [(sum(time_gemm(shape, t, c, gated, (x, w13, w2)) for t in counts), c)
                     for c in tune_candidates(bucket)]
            us, config = min(timed, key=lambda item: item[0])
            print(f"  {name} bucket {bucket} (T {counts}) {'gate_up' if gated else 'down'}: {config} {us:.1f} µs")
            pair.append(config)
        if pair[0].block_m != pair[1].block_m:  # one permutation per call: keep the gate/up GEMM's block_m
            pair[1] = min(((sum(time_gemm(shape, t, c, False, (x, w13, w2)) for t in counts), c)
                           for c in tune_candidates(bucket) if c.block_m == pair[0].block_m),
                          key=lambda item: item[0])[1]
        best.append(tuple(pair))
    return {"key": (num_experts, hidden, intermediate, top_k), "configs": best}


def e2e(work_dir: str, copy_tbs: float) -> dict:
    from flashserve import LLM
    from latency import decode_batch, write_checkpoint

    spec = E2E_SPEC
    directory = os.path.join(work_dir, "qwen3-30b-a3b-8-layers")
    info = write_checkpoint(directory, "Qwen3MoeForCausalLM", spec, DTYPE, DEVICE)
    llm = LLM(directory, dtype=DTYPE, device=DEVICE, max_model_len=4096, max_num_seqs=64,
              enable_prefix_caching=False)
    hidden, layers, heads, kv_heads, head_dim = (spec[k] for k in ("hidden_size", "num_hidden_layers",
                                                                  "num_attention_heads", "num_key_value_heads",
                                                                  "head_dim"))
    element = torch.empty((), dtype=DTYPE).element_size()
    attention_bytes = layers * element * hidden * head_dim * (2 * heads + 2 * kv_heads)
    lm_head_bytes = spec["vocab_size"] * hidden * element
    expert_bytes = 3 * hidden * spec["moe_intermediate_size"] * element
    run = types.SimpleNamespace(args=types.SimpleNamespace(prompt_len=128, decode_steps=32), rng=random.Random(0),
                                cuda=DEVICE == "cuda")
    rows = []
    for batch in (1, 64):
        row = decode_batch(run, llm.engine, batch)
        experts_hit = spec["num_experts"] * (1 - (1 - spec["num_experts_per_tok"] / spec["num_experts"]) ** batch)
        kv_bytes = batch * row["mean_context"] * layers * 2 * kv_heads * head_dim * element
        step_bytes = attention_bytes + lm_head_bytes + layers * experts_hit * expert_bytes + kv_bytes
        rows.append(dict(batch=batch, ms=row["ms"], graph_gpu_ms=row.get("graph_gpu_ms"),
                         expected_experts_hit_per_layer=experts_hit, step_bytes=step_bytes,
                         roofline_ms=step_bytes / copy_tbs / 1e9, tok_per_s=row["tok_per_s"]))
        print(f"  e2e B={batch}: {row['ms']:.2f} ms/step, roofline {rows[-1]['roofline_ms']:.2f} ms")
    return dict(checkpoint=info, rows=rows)


def use_quick_settings() -> None:
    """--quick: the CPU, float32 (the interpreter computes bfloat16 wrongly), tiny shapes and token counts."""
    global DEVICE, DTYPE, SHAPES, DECODE_TOKENS, PREFILL_TOKENS, E2E_SPEC
    DEVICE, DTYPE, SHAPES, E2E_SPEC = "cpu", torch.float32, QUICK_SHAPES, QUICK_E2E
    DECODE_TOKENS, PREFILL_TOKENS = QUICK_DECODE_TOKENS, QUICK_PREFILL_TOKENS


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=",".join(SHAPES))
    parser.add_argument("--tune", action="store_true", help="sweep the launch configurations")
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
        decode = [r["pct_copy"] for r in rows if 4 <= r["tokens"] <= 64]
        text += (f"\nDecode (4-64 tokens): median {statistics.median(decode):.0f}% of the copy bandwidth "
                 f"(bar 70%); 4096 tokens: " + ", ".join(f"{r['shape']} {r['pct_matmul']:.0f}%" for r in rows
                                                        if r["tokens"] == PREFILL_TOKENS)
                 + " of the matmul rate (bar 50%).\n")
    if args.tune:
        tuned = [tune_shape(name) for name in names]
        payload["tuned"] = [dict(key=t["key"], configs=[[vars_of(c) for c in pair] for pair in t["configs"]])
                            for t in tuned]
        text += "\n### Tuned launch configurations (paste into moe_configs.TUNED_CONFIGS)\n\n```python\n"
        for t in tuned:
            text += f"{t['key']}: (\n" + "".join(f"    ({config_source(up)}, {config_source(down)}),\n"
                                                  for up, down in t["configs"]) + "),\n"
        text += "```\n"
    if args.e2e:
        result = e2e(tempfile.mkdtemp(prefix="bench-moe-", dir=args.work_dir), copy_rate)
        payload["e2e"] = result
        text += "\n### End to end: Qwen3-30B-A3B shape, 8 of 48 layers, CUDA graphs\n\n" + common.markdown_table(
            ["batch", "ms/step", "graph GPU ms", "experts hit / layer (expected)", "GB read / step", "roofline ms",
             "% roofline"],
            [[r["batch"], f"{r['ms']:.2f}", f"{r['graph_gpu_ms'] or math.nan:.2f}",
              f"{r['expected_experts_hit_per_layer']:.1f}", f"{r['step_bytes'] / 1e9:.2f}",
              f"{r['roofline_ms']:.2f}", f"{100 * r['roofline_ms'] / r['ms']:.0f}%"] for r in result["rows"]]) + "\n"
    common.write_results(args.out, "bench_moe", text, payload)


if __name__ == "__main__":
    main()
