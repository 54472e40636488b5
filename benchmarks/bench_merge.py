"""Benchmark: merge_attn_states, ours (Triton) vs plain PyTorch, in the format of vLLM's merge table.

tokens {256, 512, 613, 1024, 1536, 4096} x heads {16, 32, 48} x head size 128, fp16 and bf16. GPU times are
``do_bench`` medians; TB/s counts 3 x the output bytes (two inputs read, one output written); "wall µs per call"
is the host-side cost of a call in a tight loop (Python + launch), which bounds small merges; "graph µs" replays
the call from a CUDA graph (device time without host launch gaps).
Usage: python benchmarks/bench_merge.py [--out DIR]
"""
import torch

from common import (argument_parser, bench_us, environment, graph_us, markdown_table, section_header, wall_us,
                    write_results)
from flashserve.kernels import merge_attn_states
from flashserve.kernels.reference import merge_attn_states as merge_attn_states_torch

TOKENS = [256, 512, 613, 1024, 1536, 4096]
HEADS = [16, 32, 48]
HEAD_SIZE = 128


def run(tokens, heads, dtype) -> dict:
    def state():
        out = torch.randn(tokens, heads, HEAD_SIZE, device="cuda", dtype=dtype)
        return out, torch.randn(heads, tokens, device="cuda") * 4

    (prefix, prefix_lse), (suffix, suffix_lse) = state(), state()
    output, output_lse = torch.empty_like(prefix), torch.empty_like(prefix_lse)
    ours = lambda: merge_attn_states(output, prefix, prefix_lse, suffix, suffix_lse, output_lse)  # noqa: E731
    torch_fn = lambda: merge_attn_states_torch(output, prefix, prefix_lse, suffix, suffix_lse, output_lse)  # noqa
    torch_fn()
    expected = output.clone()
    ours()
    nbytes = 3 * output.numel() * output.element_size()
    row = dict(tokens=tokens, heads=heads, head_size=HEAD_SIZE, dtype=str(dtype).replace("torch.", ""),
               max_abs_diff=(output.float() - expected.float()).abs().max().item(),
               torch_us=bench_us(torch_fn), ours_us=bench_us(ours), ours_graph_us=graph_us(ours),
               ours_wall_us=wall_us(ours))
    row["speedup"] = row["torch_us"] / row["ours_us"]
    row["ours_tbs"] = nbytes / row["ours_us"] / 1e6
    return row


def markdown(rows) -> str:
    header = ["tokens", "heads", "headsize", "dtype", "torch µs", "ours µs", "speedup", "ours TB/s",
              "wall µs per call", "ours graph µs"]
    return markdown_table(header, [
        [r["tokens"], r["heads"], r["head_size"], r["dtype"], f"{r['torch_us']:.1f}", f"{r['ours_us']:.1f}",
         f"{r['speedup']:.1f}x", f"{r['ours_tbs']:.2f}", f"{r['ours_wall_us']:.1f}", f"{r['ours_graph_us']:.1f}"]
        for r in rows])


def plot(rows):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for dtype in sorted({r["dtype"] for r in rows}):
            for heads in HEADS:
                sel = [r for r in rows if r["dtype"] == dtype and r["heads"] == heads]
                ax.plot([r["tokens"] for r in sel], [r["speedup"] for r in sel], marker="o",
                        label=f"{dtype} H{heads}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup over torch")
        ax.set_title(f"merge_attn_states, head size {HEAD_SIZE}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
    return draw


def main():
    parser = argument_parser(__doc__)
    args = parser.parse_args()
    rows = [run(tokens, heads, dtype) for dtype in (torch.float16, torch.bfloat16) for heads in HEADS
            for tokens in TOKENS]
    env = environment()
    write_results(args.out, "bench_merge", section_header("merge_attn_states", env) + markdown(rows),
                  dict(meta=env, rows=rows), plot(rows))


if __name__ == "__main__":
    main()
