"""Benchmark: attention_scores_from_lse (each key's attention mass per KV head, one pass over K from the forward's
LSE) against materialising the attention matrix in PyTorch (scores, mask, fp32 softmax, sum over the queries).

bf16, GQA 32/8, head dim 128, causal; batch x length from B8 S1024 to B1 S16384 (the materialised matrix is
B x 32 x S x S fp32: 32 GiB at S 16384, so the anchor is skipped past --max-materialised-gib). Fresh random inputs
per shape, ``do_bench`` medians; the forward (flash_attn_func) of the same shape is timed in the same run as a
second anchor, and the result is checked against the materialised one (max abs difference).
Usage: python benchmarks/bench_attention_scores.py [--out DIR] [--max-materialised-gib 40]
"""
import math

import torch

from common import argument_parser, bench_ms, environment, markdown_table, section_header, write_results
from flashserve.kernels import attention_scores_from_lse, flash_attn_func

SHAPES = [(8, 1024), (4, 2048), (2, 4096), (1, 8192), (1, 16384)]
HEADS, HEADS_K, HEAD_DIM = 32, 8, 128


def materialised(q, k, reduce="sum"):
    """The PyTorch anchor: the whole (B, H, Sq, Sk) matrix in fp32, softmax, reduced over queries and the group."""
    batch, seqlen, heads, head_dim = q.shape
    group = heads // k.shape[2]
    scores = torch.matmul(q.transpose(1, 2), k.repeat_interleave(group, dim=2).transpose(1, 2).transpose(-1, -2))
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.float().mul_(head_dim ** -0.5).masked_fill_(~causal, float("-inf")), dim=-1)
    probs = probs.view(batch, heads // group, group * seqlen, seqlen)
    return probs.sum(dim=2) if reduce == "sum" else probs.amax(dim=2)


def run(batch, seqlen, warmup, rep, max_gib) -> dict:
    shape = (batch, seqlen, HEADS, HEAD_DIM)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seqlen, HEADS_K, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    _, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ours = lambda: attention_scores_from_lse(q, k, lse, causal=True)  # noqa: E731
    forward = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
    row = dict(batch=batch, seqlen=seqlen, ours_ms=bench_ms(ours, warmup, rep),
               forward_ms=bench_ms(forward, warmup, rep))
    flops = 2 * batch * HEADS * seqlen * seqlen * HEAD_DIM / 2  # QK^T over the causal half
    row["ours_tflops"] = flops / row["ours_ms"] / 1e9
    matrix_gib = batch * HEADS * seqlen * seqlen * 4 / 2 ** 30
    row["matrix_gib"] = matrix_gib
    if 2.5 * matrix_gib <= max_gib:  # scores + probabilities + temporaries
        row["max_abs_diff"] = (ours() - materialised(q, k)).abs().max().item()
        row["torch_ms"] = bench_ms(lambda: materialised(q, k), warmup, rep)
        row["speedup"] = row["torch_ms"] / row["ours_ms"]
    else:
        row["torch_ms"] = row["speedup"] = row["max_abs_diff"] = math.nan
    torch.cuda.empty_cache()
    return row


def markdown(rows) -> str:
    header = ["batch", "seqlen", "ours ms", "ours TFLOP/s", "PyTorch materialised ms", "speedup",
              "forward ms", "ours / forward", "matrix GiB", "max abs diff"]
    return markdown_table(header, [
        [r["batch"], r["seqlen"], f"{r['ours_ms']:.3f}", f"{r['ours_tflops']:.0f}", f"{r['torch_ms']:.3f}",
         f"{r['speedup']:.1f}x", f"{r['forward_ms']:.3f}", f"{r['ours_ms'] / r['forward_ms']:.2f}",
         f"{r['matrix_gib']:.1f}", f"{r['max_abs_diff']:.2e}"] for r in rows])


def main():
    parser = argument_parser(__doc__, timing=True)
    parser.add_argument("--max-materialised-gib", type=float, default=40.0,
                        help="skip the PyTorch anchor when the fp32 matrix would need more than this")
    args = parser.parse_args()
    rows = [run(batch, seqlen, args.warmup, args.rep, args.max_materialised_gib) for batch, seqlen in SHAPES]
    env = environment()
    title = f"attention_scores_from_lse (bf16, causal, GQA {HEADS}/{HEADS_K}, d {HEAD_DIM})"
    write_results(args.out, "bench_attention_scores", section_header(title, env) + markdown(rows),
                  dict(meta=env, rows=rows))


if __name__ == "__main__":
    main()
