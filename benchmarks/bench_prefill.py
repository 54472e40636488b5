"""Causal prefill: flashserve's ``flash_attn_func`` vs PyTorch SDPA's flash (FA2) and cuDNN backends, same run.

bf16, random inputs, FLOPs counted as 4 * B * H * S^2 * D / 2 (causal), medians of ``triton.testing.do_bench``.
Usage: ``python benchmarks/bench_prefill.py --out DIR``; prints a markdown table and writes
``bench_prefill.json`` / ``bench_prefill.md`` / ``bench_prefill.png`` into DIR.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import argument_parser, bench_ms, environment, environment_lines, markdown_table, write_results
from flashserve.kernels import flash_attn_func

# (B, S, H, Hk, D): the shapes of ANCHORS.md
SHAPES = [(16, 512, 32, 8, 128), (8, 2048, 32, 8, 128), (2, 8192, 32, 8, 128), (1, 16384, 32, 8, 128),
          (8, 2048, 16, 8, 64)]


def sdpa_ms(backend, q, k, v, warmup_ms, rep_ms) -> float | None:
    """Median ms of SDPA with one backend on (B, H, S, D) inputs, or None when the backend refuses them."""
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    try:
        run()
    except RuntimeError as error:
        print(f"SDPA {backend} unavailable: {str(error).splitlines()[0]}")
        return None
    return bench_ms(run, warmup_ms, rep_ms)


def main():
    parser = argument_parser(__doc__, timing=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, records = [], []
    for batch, seqlen, nheads, nheads_k, head_dim in SHAPES:
        q = torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, seqlen, nheads_k, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, seqlen, nheads_k, head_dim, device="cuda", dtype=torch.bfloat16)
        flops = 4 * batch * nheads * seqlen * seqlen * head_dim / 2
        flash_attn_func(q, k, v, causal=True)  # compile and autotune outside the timing
        ours = bench_ms(lambda: flash_attn_func(q, k, v, causal=True), args.warmup, args.rep)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's (B, H, S, D)
        flash = sdpa_ms(SDPBackend.FLASH_ATTENTION, qt, kt, vt, args.warmup, args.rep)
        cudnn = sdpa_ms(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, args.warmup, args.rep)

        def tflops(ms):
            return None if ms is None else flops / ms * 1e-9

        def fmt(x, digits=0):
            return "n/a" if x is None else f"{x:.{digits}f}"
        record = {"B": batch, "S": seqlen, "H": nheads, "Hk": nheads_k, "D": head_dim, "ours_ms": ours,
                  "sdpa_flash_ms": flash, "sdpa_cudnn_ms": cudnn, "ours_tflops": tflops(ours),
                  "sdpa_flash_tflops": tflops(flash), "sdpa_cudnn_tflops": tflops(cudnn),
                  "vs_flash": None if flash is None else flash / ours,
                  "vs_cudnn": None if cudnn is None else cudnn / ours}
        records.append(record)
        rows.append([batch, seqlen, f"{nheads}/{nheads_k}", head_dim, f"{ours:.3f}", fmt(tflops(ours)),
                     fmt(tflops(flash)), fmt(tflops(cudnn)), fmt(record["vs_flash"], 2) + "x",
                     fmt(record["vs_cudnn"], 2) + "x"])

    def plot(plt):
        fig, ax = plt.subplots(figsize=(9, 4))
        labels = [f"B{r['B']} S{r['S']}\n{r['H']}/{r['Hk']} d{r['D']}" for r in records]
        width = 0.27
        for i, (key, name) in enumerate([("ours_tflops", "flashserve"), ("sdpa_flash_tflops", "SDPA flash (FA2)"),
                                         ("sdpa_cudnn_tflops", "SDPA cuDNN")]):
            ax.bar([x + (i - 1) * width for x in range(len(records))], [r[key] or 0 for r in records], width,
                   label=name)
        ax.set_xticks(range(len(records)), labels, fontsize=8)
        ax.set_ylabel("TFLOP/s (bf16, causal)")
        ax.set_title(f"Causal prefill, {environment()['gpu']}")
        ax.legend()
        return fig

    header = ["B", "S", "H/Hk", "D", "ours ms", "ours TFLOP/s", "SDPA flash TFLOP/s", "SDPA cuDNN TFLOP/s",
              "ours / flash", "ours / cuDNN"]
    env = environment()
    write_results(args.out, "bench_prefill", environment_lines(env) + markdown_table(header, rows),
                  {"environment": env, "header": header, "rows": rows, "records": records}, plot)


if __name__ == "__main__":
    main()
