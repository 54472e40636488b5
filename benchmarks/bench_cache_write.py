"""Benchmark: reshape_and_cache_flash bandwidth (bf16, KVH 8, d 128, block 16, random slots, 1/8 padding).

Bytes = K and V each read once and written once. Compared with a plain copy of the same bytes measured in the
same run. Usage: python benchmarks/bench_cache_write.py [--out DIR]
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import triton

from flashserve.kernels import reshape_and_cache_flash

TOKENS = [1, 64, 256, 1024, 4096, 16384, 65536]
HEADS_K, HEAD_DIM, BLOCK = 8, 128, 16


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def wall_us(fn, calls=500) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


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
               wall_us=wall_us(fn))
    row["tbs"] = nbytes / row["us"] / 1e6
    row["copy_tbs"] = nbytes / row["copy_us"] / 1e6
    return row


def markdown(rows) -> str:
    lines = ["| tokens | MB moved | ours µs | ours TB/s | copy µs (same bytes) | copy TB/s | wall µs per call |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['bytes'] / 1e6:.2f} | {r['us']:.1f} | {r['tbs']:.2f} | "
                     f"{r['copy_us']:.1f} | {r['copy_tbs']:.2f} | {r['wall_us']:.1f} |")
    return "\n".join(lines)


def plot(rows, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in rows], [r["tbs"] for r in rows], marker="o", label="reshape_and_cache_flash")
    ax.plot([r["tokens"] for r in rows], [r["copy_tbs"] for r in rows], marker="x", label="copy (same bytes)")
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("TB/s")
    ax.set_title(f"cache write, bf16, KVH {HEADS_K}, d {HEAD_DIM}, block {BLOCK}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = [run(tokens) for tokens in TOKENS]
    meta = dict(gpu=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command=" ".join([sys.executable, *sys.argv]), torch=torch.__version__, triton=triton.__version__)
    header = f"## reshape_and_cache_flash ({meta['gpu']}, {meta['date'][:10]}, torch {meta['torch']}, " \
             f"triton {meta['triton']})\n\n`{meta['command']}`\n\n"
    table = markdown(rows)
    print(header + table)
    with open(os.path.join(args.out, "bench_cache_write.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    with open(os.path.join(args.out, "bench_cache_write.md"), "w") as f:
        f.write(header + table + "\n")
    plot(rows, os.path.join(args.out, "bench_cache_write.png"))


if __name__ == "__main__":
    main()
