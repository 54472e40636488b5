"""Benchmark: one-token decode over a KV cache (ANCHORS.md shapes), ours vs PyTorch SDPA in the same run.

bf16, H 32 / KVH 8, d 128. Ours on a paged cache (page 16, random block table), on the same pages as a strided
view (K and V interleaved per block, as in a combined KV buffer), and on a contiguous dense cache; SDPA flash and
cuDNN backends on a contiguous (B, KVH, L, d) cache of the same content. TB/s counts the K and V bytes once.
"graph" columns replay the call from a CUDA graph: device time without the host's launch gaps (small shapes are
launch-bound in eager mode). "engine" is the engine's unchecked entry point (``paged_attention.decode``) on the
paged cache: the public function also checks its index values (one check launch and one synchronisation, as
FlashAttention 2) once per set of unchanged index tensors: the eager "ours" columns call it with the same tensors
each time (the check ran on the first call, as for the layers of one decode step), "checked µs" forgets the
earlier check before every call (what a call with fresh index tensors pays). "1 launch" / "2 launches" force the
split-KV combine inside the decode kernel (the last program of each group merges) or in a second kernel (the
default, as ``decode.FUSED_COMBINE_MAX_GROUPS`` is 0); shapes with one split show the same time twice.
"wall µs" is the host's wall clock per eager call in a tight loop of 500 (``common.wall_us``: Python, checks and
launches included, synchronised only at the ends) of the public function and, in brackets, of the engine's entry
point: the eager B1 L4096 figure of issue 9's bar (<= 20 µs; cuDNN's eager call takes 17.5 µs). "host µs" is the
host's time to queue one such call without waiting for the GPU (``common.host_us``: wrapper + Triton's C launches).
Also measures the HBM copy bandwidth in the same run.
Usage: python benchmarks/bench_decode.py [--out DIR] [--shapes 1x4096,64x4096]
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
from flashserve.kernels import flash_attn_with_kvcache, index_checks, paged_attention
from flashserve.kernels.decode_launch import launch_decode

SHAPES = [(64, 4096), (256, 1024), (8, 32768), (1, 4096), (1, 131072)]
HEADS, HEADS_K, HEAD_DIM, PAGE = 32, 8, 128, 16


def bench_us(fn) -> float:
    return common.bench_us(fn, warmup_ms=50, rep_ms=200)


def graph_bench_us(fn) -> float:
    return common.graph_us(fn, warmup_ms=50, rep_ms=200)


def sdpa_us(backend, q, k, v) -> tuple[float, float]:
    """(eager µs, CUDA-graph µs) of SDPA with one backend; NaN where the backend refuses the inputs."""
    def run():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with sdpa_kernel(backend):
        try:
            run()
        except RuntimeError as error:
            print(f"  {backend}: unavailable ({str(error).splitlines()[0][:80]})")
            return float("nan"), float("nan")
        return bench_us(run), graph_bench_us(run)


def run_shape(batch: int, seqlen: int) -> dict:
    dtype, device = torch.bfloat16, "cuda"
    blocks_per_seq = seqlen // PAGE
    num_blocks = batch * blocks_per_seq
    kv = torch.randn(num_blocks, 2, PAGE, HEADS_K, HEAD_DIM, dtype=dtype, device=device)
    k_strided, v_strided = kv[:, 0], kv[:, 1]  # block stride != PAGE * row stride
    k_paged, v_paged = k_strided.contiguous(), v_strided.contiguous()
    block_table = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(batch, blocks_per_seq)
    k_dense = k_paged[block_table.long()].view(batch, seqlen, HEADS_K, HEAD_DIM)
    v_dense = v_paged[block_table.long()].view(batch, seqlen, HEADS_K, HEAD_DIM)
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, dtype=dtype, device=device)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    kv_bytes = 2 * batch * seqlen * HEADS_K * HEAD_DIM * 2

    def ours(k_cache, v_cache, table):
        return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                               causal=True)

    out = ours(k_paged, v_paged, block_table)()
    out_dense = ours(k_dense, v_dense, None)()
    q_sdpa = q.transpose(1, 2)
    k_sdpa, v_sdpa = k_dense.transpose(1, 2).contiguous(), v_dense.transpose(1, 2).contiguous()
    ref = F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, enable_gqa=True).transpose(1, 2)
    max_diff = max((out - ref).abs().max().item(), (out_dense - ref).abs().max().item())
    row = dict(batch=batch, seqlen=seqlen, kv_bytes=kv_bytes, max_abs_diff_vs_sdpa=max_diff,
               paged_us=bench_us(ours(k_paged, v_paged, block_table)),
               paged_graph_us=graph_bench_us(ours(k_paged, v_paged, block_table)),
               paged_checked_us=bench_us(lambda: (index_checks.KVCACHE_CHECKED.clear(),
                                                  ours(k_paged, v_paged, block_table)())),
               paged_strided_us=bench_us(ours(k_strided, v_strided, block_table)),
               dense_us=bench_us(ours(k_dense, v_dense, None)),
               engine_us=bench_us(lambda: paged_attention.decode(q[:, 0], k_paged, v_paged, seqlens, block_table,
                                                                 HEAD_DIM ** -0.5)),
               paged_wall_us=common.wall_us(ours(k_paged, v_paged, block_table)),
               engine_wall_us=common.wall_us(lambda: paged_attention.decode(q[:, 0], k_paged, v_paged, seqlens,
                                                                            block_table, HEAD_DIM ** -0.5)),
               paged_host_us=common.host_us(ours(k_paged, v_paged, block_table)),
               engine_host_us=common.host_us(lambda: paged_attention.decode(q[:, 0], k_paged, v_paged, seqlens,
                                                                            block_table, HEAD_DIM ** -0.5)))
    row["sdpa_flash_us"], row["sdpa_flash_graph_us"] = sdpa_us(SDPBackend.FLASH_ATTENTION, q_sdpa, k_sdpa, v_sdpa)
    row["sdpa_cudnn_us"], row["sdpa_cudnn_graph_us"] = sdpa_us(SDPBackend.CUDNN_ATTENTION, q_sdpa, k_sdpa, v_sdpa)
    for fused, label in ((True, "one_launch"), (False, "two_launches")):
        def engine(fused=fused):
            return launch_decode(q, k_paged, v_paged, seqlens, block_table, None, None, HEAD_DIM ** -0.5, 0.0, -1, 0,
                                 blocks_per_seq * PAGE, 0, False, None, fused)
        fused_diff = (engine()[0] - ref).abs().max().item()
        row["max_abs_diff_vs_sdpa"] = max(row["max_abs_diff_vs_sdpa"], fused_diff)
        row[f"{label}_us"], row[f"{label}_graph_us"] = bench_us(engine), graph_bench_us(engine)
    for name in ("paged", "paged_graph", "paged_checked", "paged_strided", "dense", "engine", "one_launch",
                 "one_launch_graph",
                 "two_launches", "two_launches_graph", "sdpa_flash", "sdpa_flash_graph", "sdpa_cudnn",
                 "sdpa_cudnn_graph"):
        row[f"{name}_tbs"] = kv_bytes / row[f"{name}_us"] / 1e6
    return row


def markdown(rows, copy_tbs) -> str:
    header = ["B", "L", "ours paged µs", "TB/s", "% copy", "wall µs (engine)", "host µs (engine)", "checked µs",
              "engine µs (TB/s)",
              "strided µs (Δ)",
              "dense µs",
              "SDPA flash µs (TB/s)",
              "cuDNN µs (TB/s)", "cuDNN / ours", "ours graph µs (TB/s)", "SDPA flash graph µs", "cuDNN graph µs",
              "cuDNN / ours (graph)"]
    table = []
    for r in rows:
        delta = (r["paged_strided_us"] / r["paged_us"] - 1) * 100
        table.append([
            r["batch"], r["seqlen"], f"{r['paged_us']:.1f}", f"{r['paged_tbs']:.2f}",
            f"{100 * r['paged_tbs'] / copy_tbs:.0f}%", f"{r['paged_wall_us']:.1f} ({r['engine_wall_us']:.1f})",
            f"{r['paged_host_us']:.1f} ({r['engine_host_us']:.1f})",
            f"{r['paged_checked_us']:.1f}",
            f"{r['engine_us']:.1f} ({r['engine_tbs']:.2f})",
            f"{r['paged_strided_us']:.1f} ({delta:+.1f}%)",
            f"{r['dense_us']:.1f}", f"{r['sdpa_flash_us']:.1f} ({r['sdpa_flash_tbs']:.2f})",
            f"{r['sdpa_cudnn_us']:.1f} ({r['sdpa_cudnn_tbs']:.2f})", f"{r['sdpa_cudnn_us'] / r['paged_us']:.2f}",
            f"{r['paged_graph_us']:.1f} ({r['paged_graph_tbs']:.2f})", f"{r['sdpa_flash_graph_us']:.1f}",
            f"{r['sdpa_cudnn_graph_us']:.1f}", f"{r['sdpa_cudnn_graph_us'] / r['paged_graph_us']:.2f}"])
    combine = common.markdown_table(
        ["B", "L", "1 launch µs", "2 launches µs", "1 launch graph µs", "2 launches graph µs", "cuDNN µs",
         "cuDNN graph µs"],
        [[r["batch"], r["seqlen"], f"{r['one_launch_us']:.1f}", f"{r['two_launches_us']:.1f}",
          f"{r['one_launch_graph_us']:.1f}", f"{r['two_launches_graph_us']:.1f}", f"{r['sdpa_cudnn_us']:.1f}",
          f"{r['sdpa_cudnn_graph_us']:.1f}"] for r in rows])
    lines = [f"HBM copy bandwidth (same run): {copy_tbs:.2f} TB/s", "", common.markdown_table(header, table), "",
             "Split-KV combine inside the decode kernel (1 launch) or in a second kernel (2 launches), "
             "launch_decode on the paged cache:", "", combine]
    return "\n".join(lines)


def plot(rows, copy_tbs):
    def draw(plt):
        labels = [f"B{r['batch']}\nL{r['seqlen']}" for r in rows]
        series = [("ours paged", "paged_tbs"), ("ours paged (graph)", "paged_graph_tbs"),
                  ("ours strided", "paged_strided_tbs"), ("ours dense", "dense_tbs"), ("SDPA flash", "sdpa_flash_tbs"),
                  ("SDPA cuDNN", "sdpa_cudnn_tbs"), ("SDPA cuDNN (graph)", "sdpa_cudnn_graph_tbs")]
        width = 0.8 / len(series)
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for i, (name, key) in enumerate(series):
            ax.bar([x + i * width for x in range(len(rows))], [r[key] for r in rows], width, label=name)
        ax.axhline(copy_tbs, color="black", linestyle="--", label="HBM copy")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels)
        ax.set_ylabel("TB/s (K+V bytes once)")
        ax.set_title(f"decode, bf16, H{HEADS}/KVH{HEADS_K}, d{HEAD_DIM}, page {PAGE}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
    return draw


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES),
                        help="comma-separated BxL (default: the ANCHORS.md shapes)")
    args = parser.parse_args()
    copy_tbs = common.copy_bandwidth_tbs()
    rows = []
    for batch, seqlen in (tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")):
        rows.append(run_shape(batch, seqlen))
        torch.cuda.empty_cache()
    env = common.environment()
    common.write_results(args.out, "bench_decode", common.section_header("Decode", env) + markdown(rows, copy_tbs),
                  dict(meta=env, copy_tbs=copy_tbs, rows=rows), plot(rows, copy_tbs))


if __name__ == "__main__":
    main()
