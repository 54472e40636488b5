"""Causal prefill: flashserve's ``flash_attn_func`` with its portable kernel and its Hopper TMA kernel, against
PyTorch SDPA's flash (FA2) and cuDNN backends, same run.

bf16, random inputs, FLOPs counted as 4 * B * H * S^2 * D / 2 (causal), medians of ``triton.testing.do_bench``.
Each kernel is first called once outside the timing (compile, and autotune unless ``FLASHSERVE_AUTOTUNE=0``); the
config it runs is reported (with every candidate's time when it was tuned in this run), and its output is checked
against SDPA flash's (max |difference|, "ok" under 2e-2 for these unit-normal inputs).
The kernels are selected through ``FLASHSERVE_PREFILL_KERNEL`` (portable / tma).
Usage: ``python benchmarks/bench_prefill.py --out DIR``; prints a markdown table and writes
``bench_prefill.json`` / ``bench_prefill.md`` / ``bench_prefill.png`` into DIR.
"""
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import argument_parser, bench_ms, environment, environment_lines, markdown_table, write_results
from flashserve.kernels import flash_attn_func, prefill, prefill_tma
from flashserve.kernels.prefill_tuning import default_config, default_tma_config, use_autotune

# (B, S, H, Hk, D): the shapes of ANCHORS.md
SHAPES = [(16, 512, 32, 8, 128), (8, 2048, 32, 8, 128), (2, 8192, 32, 8, 128), (1, 16384, 32, 8, 128),
          (8, 2048, 16, 8, 64)]
KERNELS = {"portable": prefill._prefill_kernel_tuned, "tma": prefill_tma._prefill_tma_kernel_tuned}
TOLERANCE = 2e-2


def sdpa_ms(backend, q, k, v, warmup_ms, rep_ms):
    """(median ms, output in (B, H, S, D)) of SDPA with one backend, or (None, None) when it refuses the inputs."""
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    try:
        out = run()
    except RuntimeError as error:
        print(f"SDPA {backend} unavailable: {str(error).splitlines()[0]}")
        return None, None
    return bench_ms(run, warmup_ms, rep_ms), out


def config_name(config) -> str:
    """``128x64 w8 s3`` (+ `` r128`` for a register cap, `` persistent×2`` for 2 persistent programs per SM) for a
    triton.Config or a default-config (BLOCK_M, BLOCK_N, num_warps, num_stages) tuple."""
    if isinstance(config, tuple):
        block_m, block_n, warps, stages = config
        return f"{block_m}x{block_n} w{warps} s{stages}"
    kwargs, warps, stages = config.kwargs, config.num_warps, config.num_stages
    cap = f" r{config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    persistent = f" persistent×{kwargs['PERSISTENT']}" if kwargs.get("PERSISTENT") else ""
    return f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']} w{warps} s{stages}{cap}{persistent}"


def ours(kernel, q, k, v, warmup_ms, rep_ms, reference):
    """Time one of our kernels: (ms, config name, {config: ms} of a tuning done by the first call, max diff)."""
    os.environ["FLASHSERVE_PREFILL_KERNEL"] = kernel
    autotuner = KERNELS[kernel]
    before = getattr(autotuner, "configs_timings", None)
    out = flash_attn_func(q, k, v, causal=True)  # compile and autotune outside the timing
    if use_autotune(q.device):
        config = config_name(autotuner.best_config)
    elif kernel == "tma":
        tma = default_tma_config(q.device, q.element_size())
        config = config_name((tma["BLOCK_M"], tma["BLOCK_N"], tma["num_warps"], tma["num_stages"]))
    else:
        config = config_name(default_config(q.device, q.shape[-1], q.element_size()))
    timings = getattr(autotuner, "configs_timings", None)
    tuned = {} if timings is before or timings is None else {
        config_name(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
    ms = bench_ms(lambda: flash_attn_func(q, k, v, causal=True), warmup_ms, rep_ms)
    diff = None if reference is None else (out.float() - reference.float()).abs().max().item()
    return ms, config, tuned, diff


def tma_available(q, k) -> bool:
    """Whether the TMA kernel runs these inputs on this GPU (Hopper or newer, tensor descriptors in Triton)."""
    return (torch.cuda.get_device_capability()[0] >= 9 and
            prefill_tma.tma_applies(q, k, k, q, None, (-1, 0), 0.0, None, None, q.shape[1], 1))


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
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's (B, H, S, D)
        flash, flash_out = sdpa_ms(SDPBackend.FLASH_ATTENTION, qt, kt, vt, args.warmup, args.rep)
        cudnn, _ = sdpa_ms(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, args.warmup, args.rep)
        reference = None if flash_out is None else flash_out.transpose(1, 2)
        del qt, kt, vt, flash_out
        results = {kernel: ours(kernel, q, k, v, args.warmup, args.rep, reference)
                   for kernel in KERNELS if kernel == "portable" or tma_available(q, k)}
        os.environ.pop("FLASHSERVE_PREFILL_KERNEL")

        def tflops(ms):
            return None if ms is None else flops / ms * 1e-9

        def fmt(x, digits=0):
            return "n/a" if x is None else f"{x:.{digits}f}"

        def ratio(ms, anchor_ms):
            return None if ms is None or anchor_ms is None else anchor_ms / ms
        record = {"B": batch, "S": seqlen, "H": nheads, "Hk": nheads_k, "D": head_dim, "sdpa_flash_ms": flash,
                  "sdpa_cudnn_ms": cudnn, "sdpa_flash_tflops": tflops(flash), "sdpa_cudnn_tflops": tflops(cudnn)}
        cells = []
        for kernel in KERNELS:
            ms, config, tuned, diff = results.get(kernel, (None, "n/a", {}, None))
            record.update({f"{kernel}_ms": ms, f"{kernel}_tflops": tflops(ms), f"{kernel}_config": config,
                           f"{kernel}_tuning_ms": tuned, f"{kernel}_max_diff": diff,
                           f"{kernel}_vs_flash": ratio(ms, flash), f"{kernel}_vs_cudnn": ratio(ms, cudnn)})
            check = "n/a" if diff is None else f"{diff:.1e} {'ok' if diff < TOLERANCE else 'WRONG'}"
            cells += [fmt(tflops(ms)), fmt(ratio(ms, cudnn), 2) + "x", config, check]
            if tuned:
                print(f"B{batch} S{seqlen} {nheads}/{nheads_k} d{head_dim} {kernel} tuning (ms): " +
                      ", ".join(f"{name} {t:.3f}" for name, t in sorted(tuned.items(), key=lambda item: item[1])))
        records.append(record)
        rows.append([batch, seqlen, f"{nheads}/{nheads_k}", head_dim, *cells, fmt(tflops(flash)),
                     fmt(tflops(cudnn))])

    def plot(plt):
        fig, ax = plt.subplots(figsize=(10, 4))
        labels = [f"B{r['B']} S{r['S']}\n{r['H']}/{r['Hk']} d{r['D']}" for r in records]
        bars = [("portable_tflops", "flashserve portable"), ("tma_tflops", "flashserve TMA"),
                ("sdpa_flash_tflops", "SDPA flash (FA2)"), ("sdpa_cudnn_tflops", "SDPA cuDNN")]
        width = 0.2
        for i, (key, name) in enumerate(bars):
            ax.bar([x + (i - 1.5) * width for x in range(len(records))], [r[key] or 0 for r in records], width,
                   label=name)
        ax.set_xticks(range(len(records)), labels, fontsize=8)
        ax.set_ylabel("TFLOP/s (bf16, causal)")
        ax.set_title(f"Causal prefill, {environment()['gpu']}")
        ax.legend()
        return fig

    header = ["B", "S", "H/Hk", "D"]
    for kernel in KERNELS:
        header += [f"{kernel} TFLOP/s", f"{kernel} / cuDNN", f"{kernel} config", f"{kernel} max diff"]
    header += ["SDPA flash TFLOP/s", "SDPA cuDNN TFLOP/s"]
    env = environment()
    env["autotune"] = use_autotune(torch.device("cuda"))
    write_results(args.out, "bench_prefill", environment_lines(env) + f"Autotune: {env['autotune']}\n\n" +
                  markdown_table(header, rows), {"environment": env, "header": header, "rows": rows,
                                                 "records": records}, plot)


if __name__ == "__main__":
    main()
