"""Benchmark: cascade attention for decode batches that share a long cached prefix, on vs off.

Workload (the issue's): 64 requests sharing a 4,000-token prefix (250 blocks of 16), bf16.
1. attention: one layer's decode attention, Qwen3-0.6B heads (16 / 8 KV, d 128) and Llama-3.1-8B heads (32 / 8),
   each request's own suffix uniform in [1, 256] tokens: the plain paged decode (``paged_attention.decode``, what
   the engine replays from its graphs) vs ``cascade_decode``; both timed from a CUDA graph (device time, as the
   engine replays them) and cascade also eagerly (host launch gaps included).
2. engine: a random-weight Qwen3-0.6B-shaped engine (CUDA graphs, prefix caching): one request caches the prefix,
   then 64 requests of prefix + 16 own tokens are stepped to their first token; ``--steps`` decode steps are timed
   with cascade on (the engine's choice: replays of its cascade graphs), then as many with it off
   (``runner.use_cascade = False``: replays of the plain graphs); median ms per ``engine.step()``.
Bar: the decode step >= 2x faster with cascade (section 2; section 1 shows where the time goes).
Usage: python benchmarks/bench_cascade.py [--out DIR] [--steps N] [--sections attention,engine]
"""
import random
import statistics
import tempfile

import torch

import common
from flashserve.kernels import paged_attention
from flashserve.kernels.cascade import cascade_decode

BATCH, PREFIX_TOKENS, BLOCK, MAX_SUFFIX, OWN_PROMPT_TOKENS = 64, 4000, 16, 256, 16
HEADS = {"Qwen3-0.6B": (16, 8, 128), "Llama-3.1-8B": (32, 8, 128)}


def attention_row(name: str, heads: int, heads_k: int, head_dim: int) -> dict:
    prefix_blocks = PREFIX_TOKENS // BLOCK
    width = prefix_blocks + MAX_SUFFIX // BLOCK + 1
    num_blocks = prefix_blocks + BATCH * (width - prefix_blocks)
    k_cache = torch.randn(num_blocks, BLOCK, heads_k, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    own = torch.randperm(num_blocks - prefix_blocks, device="cuda")[:BATCH * (width - prefix_blocks)]
    table = torch.cat([torch.arange(prefix_blocks, device="cuda").expand(BATCH, -1),
                       (own + prefix_blocks).view(BATCH, -1)], dim=1).to(torch.int32)
    suffix = torch.randint(1, MAX_SUFFIX + 1, (BATCH,), device="cuda", dtype=torch.int32)
    prefix_len = prefix_blocks * BLOCK
    q = torch.randn(BATCH, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    shared_len = torch.full((1,), prefix_len, device="cuda", dtype=torch.int32)
    seqused = suffix + prefix_len
    plain = lambda: paged_attention.decode(q, k_cache, v_cache, seqused, table, scale)  # noqa: E731
    cascaded = lambda: cascade_decode(q, k_cache, v_cache, table, seqused, shared_len, scale)  # noqa: E731
    max_diff = (plain().float() - cascaded().float()).abs().max().item()
    row = dict(model=name, heads=heads, heads_k=heads_k, head_dim=head_dim, max_abs_diff=max_diff,
               plain_graph_us=common.graph_us(plain), cascade_graph_us=common.graph_us(cascaded),
               cascade_eager_us=common.bench_us(cascaded))
    row["speedup_graph"] = row["plain_graph_us"] / row["cascade_graph_us"]
    row["speedup_eager"] = row["plain_graph_us"] / row["cascade_eager_us"]
    kv_bytes_per_token = 2 * heads_k * head_dim * 2
    row["plain_tbs"] = BATCH * (prefix_len + suffix.float().mean().item()) * kv_bytes_per_token / row[
        "plain_graph_us"] / 1e6
    return row


def engine_rows(steps: int) -> dict:
    from latency import has_first_token, step_until, submit, timed_step, write_checkpoint
    from throughput import QWEN3_0_6B

    from flashserve import LLM

    directory = tempfile.mkdtemp(prefix="cascade-")
    write_checkpoint(directory, "Qwen3ForCausalLM", QWEN3_0_6B, torch.bfloat16, "cuda")
    llm = LLM(directory, dtype="bfloat16", device="cuda", max_model_len=PREFIX_TOKENS + 1024, max_num_seqs=BATCH,
              enable_prefix_caching=True)
    engine, rng = llm.engine, random.Random(0)
    vocab = llm.engine.runner.spec.vocab_size
    prefix = [rng.randrange(1, vocab) for _ in range(PREFIX_TOKENS)]
    ids = submit(engine, [prefix + [1]], 1, "prefix")
    step_until(engine, lambda: not engine.has_unfinished(), 100)
    prompts = [prefix + [rng.randrange(1, vocab) for _ in range(OWN_PROMPT_TOKENS)] for _ in range(BATCH)]
    ids = submit(engine, prompts, 2 * steps + 10, "shared")
    step_until(engine, lambda: has_first_token(engine, ids), 100)
    result = {}
    for mode, use in (("cascade_on", True), ("cascade_off", False)):
        engine.runner.use_cascade = use
        times = [timed_step(engine) for _ in range(3 + steps)][3:]
        result[f"{mode}_ms"] = statistics.median(times)
    result["speedup"] = result["cascade_off_ms"] / result["cascade_on_ms"]
    result["prefix_hit_rate"] = engine.block_manager.hit_rate
    engine.abort_request(ids)
    return result


def markdown(attention, engine) -> str:
    lines = [f"{BATCH} requests sharing a {PREFIX_TOKENS}-token prefix (blocks of {BLOCK}), bf16.", ""]
    if attention:
        lines.append(common.markdown_table(
            ["heads", "plain decode µs (graph)", "plain TB/s", "cascade µs (graph)", "cascade µs (eager)",
             "speedup (graph)", "speedup (eager)", "max |diff|"],
            [[f"{r['model']} {r['heads']}/{r['heads_k']}x{r['head_dim']}", f"{r['plain_graph_us']:.1f}",
              f"{r['plain_tbs']:.2f}", f"{r['cascade_graph_us']:.1f}", f"{r['cascade_eager_us']:.1f}",
              f"{r['speedup_graph']:.2f}x", f"{r['speedup_eager']:.2f}x", f"{r['max_abs_diff']:.3g}"]
             for r in attention]))
    if engine:
        lines += ["", f"Engine decode step (Qwen3-0.6B shape): cascade on {engine['cascade_on_ms']:.2f} ms, off "
                  f"{engine['cascade_off_ms']:.2f} ms: **{engine['speedup']:.2f}x** (bar >= 2x: "
                  f"{'PASS' if engine['speedup'] >= 2 else 'FAIL'}); prefix-cache hit rate "
                  f"{engine['prefix_hit_rate']:.2f}"]
    return "\n".join(lines)


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per mode")
    parser.add_argument("--sections", default="attention,engine")
    args = parser.parse_args()
    sections = args.sections.split(",")
    attention = [attention_row(name, *shape) for name, shape in HEADS.items()] if "attention" in sections else []
    engine = engine_rows(args.steps) if "engine" in sections else None
    env = common.environment()
    common.write_results(args.out, "bench_cascade", common.section_header("Cascade attention", env)
                         + markdown(attention, engine), dict(meta=env, attention=attention, engine=engine))


if __name__ == "__main__":
    main()
