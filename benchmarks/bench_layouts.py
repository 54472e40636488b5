"""Contiguous vs non-contiguous inputs: the layout table of the seed notes, and the long paged-KV case.

Table 1 (bf16, causal, d 128): Basic attention (``flash_attn_func``, B 8, S 2048, H 32/8), Packed QKV attention
(``flash_attn_qkvpacked_func``, B 8, S 2048, H 32), KV cache attention (``flash_attn_varlen_func`` over a paged
cache, 8 sequences of 2048 tokens, page 16). Non-contiguous inputs are genuine strided views: q/k/v as slices of
one fused projection output (B, S, (H + 2 Hk) * D); qkv as a permuted (B, S, H, 3, D) tensor; caches as
``buf[:, 0]`` / ``buf[:, 1]`` of one (num_blocks, 2, page, Hk, D) buffer. Warm-up = the first call (compile and
autotune included, unless already in Triton's cache); time = median of ``do_bench``; Core Diff = non-contiguous
minus contiguous median.

Case 2: the long paged-KV case: 4 sequences with 8k-32k cached tokens and a 512-token causal chunk each,
contiguous cache vs strided cache.

Usage: ``python benchmarks/bench_layouts.py --out DIR``; writes bench_layouts.{md,json,png} into DIR.
"""
import textwrap
import time

import torch

from common import argument_parser, bench_ms, environment, environment_lines, markdown_table, write_results
from flashserve.kernels import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func

DTYPE = torch.bfloat16
H, HK, D = 32, 8, 128


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def basic(contiguous: bool, batch=8, seqlen=2048):
    if contiguous:
        q, k, v = _randn(batch, seqlen, H, D), _randn(batch, seqlen, HK, D), _randn(batch, seqlen, HK, D)
    else:
        fused = _randn(batch, seqlen, (H + 2 * HK) * D)
        q = fused[..., :H * D].view(batch, seqlen, H, D)
        k = fused[..., H * D:(H + HK) * D].view(batch, seqlen, HK, D)
        v = fused[..., (H + HK) * D:].view(batch, seqlen, HK, D)
    return lambda: flash_attn_func(q, k, v, causal=True)


def packed(contiguous: bool, batch=8, seqlen=2048):
    qkv = _randn(batch, seqlen, 3, H, D) if contiguous else _randn(batch, seqlen, H, 3, D).transpose(2, 3)
    return lambda: flash_attn_qkvpacked_func(qkv, causal=True)


def paged_cache(lengths_k, page_size, contiguous: bool):
    """Caches holding ``lengths_k`` tokens per sequence through a random block table."""
    pages = [-(-n // page_size) for n in lengths_k]
    num_blocks = sum(pages)
    if contiguous:
        k_cache, v_cache = _randn(num_blocks, page_size, HK, D), _randn(num_blocks, page_size, HK, D)
    else:
        buf = _randn(num_blocks, 2, page_size, HK, D)
        k_cache, v_cache = buf[:, 0], buf[:, 1]
    ids = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    block_table = torch.zeros(len(lengths_k), max(pages), dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = ids[start:start + n]
        start += n
    return k_cache, v_cache, block_table


def kv_cache(contiguous: bool, lengths_q=(2048,) * 8, lengths_k=(2048,) * 8, page_size=16):
    total_q = sum(lengths_q)
    if contiguous:
        q = _randn(total_q, H, D)
    else:
        q = _randn(total_q, (H + 2 * HK) * D)[:, :H * D].view(total_q, H, D)
    k_cache, v_cache, block_table = paged_cache(lengths_k, page_size, contiguous)
    cu_seqlens_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    seqused_k = torch.tensor(lengths_k, dtype=torch.int32, device="cuda")
    return lambda: flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, None, max(lengths_q), max(lengths_k),
                                          causal=True, block_table=block_table, seqused_k=seqused_k)


def long_paged(contiguous: bool):
    lengths_k = (8192, 16384, 32768, 12000)
    return kv_cache(contiguous, lengths_q=(512,) * len(lengths_k), lengths_k=lengths_k, page_size=16)


def measure(make, contiguous, warmup_ms, rep_ms):
    fn = make(contiguous)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    return first_ms, bench_ms(fn, warmup_ms, rep_ms)


def main():
    parser = argument_parser(__doc__, timing=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [("Basic attention", basic), ("Packed QKV attention", packed), ("KV cache attention (paged varlen)",
             kv_cache), ("Long paged KV (case 2)", long_paged)]
    rows, records = [], []
    for name, make in cases:
        first_c, median_c = measure(make, True, args.warmup, args.rep)
        first_n, median_n = measure(make, False, args.warmup, args.rep)
        diff = median_n - median_c
        records.append({"case": name, "contiguous_first_ms": first_c, "contiguous_ms": median_c,
                        "noncontiguous_first_ms": first_n, "noncontiguous_ms": median_n, "core_diff_ms": diff,
                        "core_diff_pct": 100 * diff / median_c})
        rows += [[name, "Contiguous", f"{first_c:.1f}", f"{median_c:.3f}"],
                 ["", "Non-contiguous", f"{first_n:.1f}", f"{median_n:.3f}"],
                 ["", "Core Diff", "", f"{diff:+.3f} ({100 * diff / median_c:+.2f}%)"]]

    def plot(plt):
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(records))
        ax.bar([x - 0.2 for x in xs], [r["contiguous_ms"] for r in records], 0.4, label="contiguous")
        ax.bar([x + 0.2 for x in xs], [r["noncontiguous_ms"] for r in records], 0.4, label="non-contiguous")
        for x, r in zip(xs, records):
            ax.annotate(f"{r['core_diff_pct']:+.1f}%", (x, max(r["contiguous_ms"], r["noncontiguous_ms"])),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [textwrap.fill(r["case"], 18) for r in records], fontsize=8)
        ax.set_ylabel("median ms (bf16, causal, d 128)")
        ax.legend()
        return fig

    header = ["Benchmark / Layout", "", "Warm-up time (ms)", "Median time (ms)"]
    env = environment()
    write_results(args.out, "bench_layouts", environment_lines(env) + markdown_table(header, rows),
                  {"environment": env, "header": header, "rows": rows, "records": records}, plot)


if __name__ == "__main__":
    main()
