"""Benchmark: reshape_and_cache_flash bandwidth (bf16, KVH 8, d 128, block 16, random slots, 1/8 padding).

Bytes = K and V each read once and written once. Compared with a plain copy of the same bytes measured in the
same run. "graph µs" replays the call from a CUDA graph (device time without host launch gaps).
Usage: python benchmarks/bench_cache_write.py [--out DIR]
"""
import torch

from common import (argument_parser, bench_us, environment, graph_us, markdown_table, section_header, wall_us,
                    write_results)
from flashserve.kernels import reshape_and_cache_flash

TOKENS = [1, 64, 256, 1024, 4096, 16384, 65536]
HEADS_K, HEAD_DIM, BLOCK = 8, 128, 16


def run(tokens) -> dict:
    dtype = torch.bfloat16
    num_blocks = max(64, 2 * tokens // BLOCK)
    key = torch.randn(tokens, HEADS_K, HEAD_DIM, device="cuda", dtype=dtype)
    value = torch.randn_like(key)
    key_cache = torch.randn(num_blocks, BLOCK, HEADS_K, HEAD_DIM, device="cuda", dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    slots = torch.randperm(num_blocks * BLOCK, device="cuda")[:tokens]
    slots[torch.rand(tokens, device="cuda") < 0.125] = -1
    fn = lambda: reshape_and_cache_flash(key, value, key_cache, value_cache, slots)  # noqa: E731
    src, dst = torch.cat([key, value]), torch.empty(2 * tokens, HEADS_K, HEAD_DIM, device="cuda", dtype=dtype)
    nbytes = 2 * 2 * key.numel() * key.element_size()
    row = dict(tokens=tokens, bytes=nbytes, us=bench_us(fn), copy_us=bench_us(lambda: dst.copy_(src)),
               wall_us=wall_us(fn), graph_us=graph_us(fn))
    row["tbs"] = nbytes / row["us"] / 1e6
    row["copy_tbs"] = nbytes / row["copy_us"] / 1e6
    return row


def markdown(rows) -> str:
    header = ["tokens", "MB moved", "ours µs", "ours TB/s", "copy µs (same bytes)", "copy TB/s", "wall µs per call",
              "ours graph µs"]
    return markdown_table(header, [
        [r["tokens"], f"{r['bytes'] / 1e6:.2f}", f"{r['us']:.1f}", f"{r['tbs']:.2f}", f"{r['copy_us']:.1f}",
         f"{r['copy_tbs']:.2f}", f"{r['wall_us']:.1f}", f"{r['graph_us']:.1f}"] for r in rows])


def plot(rows):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] for r in rows], [r["tbs"] for r in rows], marker="o", label="reshape_and_cache_flash")
        ax.plot([r["tokens"] for r in rows], [r["copy_tbs"] for r in rows], marker="x", label="copy (same bytes)")
        ax.set_xscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("TB/s")
        ax.set_title(f"cache write, bf16, KVH {HEADS_K}, d {HEAD_DIM}, block {BLOCK}")
        ax.legend()
        fig.tight_layout()
        return fig
    return draw


def main():
    parser = argument_parser(__doc__)
    args = parser.parse_args()
    rows = [run(tokens) for tokens in TOKENS]
    env = environment()
    write_results(args.out, "bench_cache_write", section_header("reshape_and_cache_flash", env) + markdown(rows),
                  dict(meta=env, rows=rows), plot(rows))


if __name__ == "__main__":
    main()
