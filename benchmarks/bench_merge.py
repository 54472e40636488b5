"""Benchmark: merge_attn_states, ours (Triton) vs plain PyTorch, in the format of vLLM's merge table.

tokens {256, 512, 613, 1024, 1536, 4096} x heads {16, 32, 48} x head size 128, fp16 and bf16. GPU times are
``do_bench`` medians; TB/s counts 3 x the output bytes (two inputs read, one output written); "wall µs per call"
is the host-side cost of a call in a tight loop (Python + launch), which bounds small merges; "graph µs" replays
the call from a CUDA graph (device time without host launch gaps); "chain" replays a CUDA graph of back-to-back
calls, each on its own set of fresh random states (sets totalling >= 512 MB, so that L2 never holds the next
one), per call: the steady state of merges inside a step's graph, without ``do_bench``'s L2 flush (a 256 MB
write before every call, whose dirty lines the timed call then writes back). Anchors of the same run:
``torch.add`` of the two states into the output (the same bytes read and written), timed both ways, and the HBM
copy bandwidth.

First a sweep: every launch config of ``merge_tuning.CANDIDATES`` on every shape (shorter do_bench budgets), then
the best config per (row bytes, token class) — the geometric mean over that class's shapes and both dtypes, kept
only when >= 2% faster than ``merge_tuning.DEFAULT`` — printed as the ``TUNED`` table for merge_tuning.py and
installed for the rest of the run, so the main table ("ours") measures merge_attn_states with that table. The
sweep table lists, per shape, the default's and the best config's µs. ``--no-sweep``: the main table only, with
the table already in merge_tuning.py. ``--tokens`` / ``--heads`` restrict the shapes (both tables); the sweep of a
subset replaces only the entries it measured better, the others stay as in merge_tuning.py.
Usage: python benchmarks/bench_merge.py [--out DIR] [--no-sweep] [--tokens 4096] [--heads 16,32]
"""
import math

import torch

from common import (argument_parser, bench_us, copy_bandwidth_tbs, environment, graph_us, markdown_table,
                    section_header, wall_us, write_results)
from flashserve.kernels import merge_attn_states, merge_tuning
from flashserve.kernels.merge import launch_merge
from flashserve.kernels.reference import merge_attn_states as merge_attn_states_torch

TOKENS = [256, 512, 613, 1024, 1536, 4096]
CHAIN_BYTES = 512 << 20  # the state sets of a chained timing together
HEADS = [16, 32, 48]
HEAD_SIZE = 128


def make_states(tokens, heads, dtype):
    """(output, prefix, prefix_lse, suffix, suffix_lse, output_lse), fresh random states."""
    def state():
        out = torch.randn(tokens, heads, HEAD_SIZE, device="cuda", dtype=dtype)
        return out, torch.randn(heads, tokens, device="cuda") * 4

    (prefix, prefix_lse), (suffix, suffix_lse) = state(), state()
    return torch.empty_like(prefix), prefix, prefix_lse, suffix, suffix_lse, torch.empty_like(prefix_lse)


def config_name(config: merge_tuning.MergeConfig) -> str:
    return (f"{config.tile_elements}/w{config.num_warps}{'/evict' if config.evict_first else ''}"
            f"{f'/h{config.max_block_h}' if config.max_block_h else ''}")


def sweep(tokens, heads, dtype) -> dict:
    """µs of every candidate config on one shape (each checked against the default's output first)."""
    args = make_states(tokens, heads, dtype)
    launch_merge(*args, merge_tuning.DEFAULT)
    expected = args[0].clone()
    times = {}
    for config in merge_tuning.CANDIDATES:
        args[0].zero_()
        launch_merge(*args, config)
        if not torch.allclose(args[0].float(), expected.float(), atol=1e-2, rtol=1e-2):
            raise RuntimeError(f"config {config} merges differently from the default")
        times[config_name(config)] = bench_us(lambda: launch_merge(*args, config), warmup_ms=5, rep_ms=25)
    return dict(tokens=tokens, heads=heads, dtype=str(dtype).replace("torch.", ""),
                row_bytes=heads * HEAD_SIZE * torch.empty((), dtype=dtype).element_size(), times=times)


def tuned_table(sweeps) -> dict:
    """(row bytes, token class) -> the config with the least geometric-mean time relative to DEFAULT over the
    class's shapes, when it is >= 2% faster."""
    default = config_name(merge_tuning.DEFAULT)
    groups = {}
    for s in sweeps:
        groups.setdefault((s["row_bytes"], merge_tuning.token_class(s["tokens"])), []).append(s)
    table = {}
    for key, members in sorted(groups.items()):
        def score(config):
            name = config_name(config)
            return math.exp(sum(math.log(m["times"][name] / m["times"][default]) for m in members) / len(members))
        best = min(merge_tuning.CANDIDATES, key=score)
        if score(best) <= 0.98:
            table[key] = best
    return table


def sweep_markdown(sweeps, table) -> str:
    default = config_name(merge_tuning.DEFAULT)
    rows = []
    for s in sweeps:
        best = min(s["times"], key=s["times"].get)
        chosen = config_name(table.get((s["row_bytes"], merge_tuning.token_class(s["tokens"])), merge_tuning.DEFAULT))
        nbytes = 3 * s["tokens"] * s["row_bytes"]
        rows.append([s["tokens"], s["heads"], s["dtype"], f"{s['times'][default]:.1f}", best,
                     f"{s['times'][best]:.1f}", f"{nbytes / s['times'][best] / 1e6:.2f}", chosen,
                     f"{s['times'][chosen]:.1f}"])
    lines = ["TUNED = {"] + [f"    {key}: MergeConfig{tuple(config)}," for key, config in table.items()] + ["}"]
    return (markdown_table(["tokens", "heads", "dtype", f"default ({default}) µs", "best config", "best µs",
                            "best TB/s", "table's config", "table's µs"], rows)
            + "\n\nThe table for merge_tuning.py (row bytes, token class) -> config:\n\n```python\n"
            + "\n".join(lines) + "\n```\n")


def run(tokens, heads, dtype) -> dict:
    output, prefix, prefix_lse, suffix, suffix_lse, output_lse = make_states(tokens, heads, dtype)
    ours = lambda: merge_attn_states(output, prefix, prefix_lse, suffix, suffix_lse, output_lse)  # noqa: E731
    torch_fn = lambda: merge_attn_states_torch(output, prefix, prefix_lse, suffix, suffix_lse, output_lse)  # noqa
    add = lambda: torch.add(prefix, suffix, out=output)  # noqa: E731
    torch_fn()
    expected = output.clone()
    ours()
    nbytes = 3 * output.numel() * output.element_size()
    row = dict(tokens=tokens, heads=heads, head_size=HEAD_SIZE, dtype=str(dtype).replace("torch.", ""),
               max_abs_diff=(output.float() - expected.float()).abs().max().item(),
               config=config_name(merge_tuning.choose_config(tokens, heads, HEAD_SIZE, output.element_size())),
               torch_us=bench_us(torch_fn), ours_us=bench_us(ours), ours_graph_us=graph_us(ours),
               ours_wall_us=wall_us(ours), add_us=bench_us(add))
    sets = [(output, prefix, prefix_lse, suffix, suffix_lse, output_lse)]
    sets += [make_states(tokens, heads, dtype) for _ in range(max(2, math.ceil(CHAIN_BYTES / nbytes)) - 1)]
    row["ours_chain_us"] = graph_us(lambda: [merge_attn_states(*state) for state in sets]) / len(sets)
    row["add_chain_us"] = graph_us(lambda: [torch.add(s[1], s[3], out=s[0]) for s in sets]) / len(sets)
    del sets
    row["speedup"] = row["torch_us"] / row["ours_us"]
    for column in ("ours", "add", "ours_chain", "add_chain"):
        row[f"{column}_tbs"] = nbytes / row[f"{column}_us"] / 1e6
    return row


def markdown(rows, copy_tbs) -> str:
    header = ["tokens", "heads", "headsize", "dtype", "torch µs", "ours µs", "speedup", "ours TB/s",
              "wall µs per call", "ours graph µs", "config", "torch.add TB/s (same bytes)", "ours chain µs",
              "ours chain TB/s", "torch.add chain TB/s"]
    return f"HBM copy bandwidth (same run): {copy_tbs:.2f} TB/s\n\n" + markdown_table(header, [
        [r["tokens"], r["heads"], r["head_size"], r["dtype"], f"{r['torch_us']:.1f}", f"{r['ours_us']:.1f}",
         f"{r['speedup']:.1f}x", f"{r['ours_tbs']:.2f}", f"{r['ours_wall_us']:.1f}", f"{r['ours_graph_us']:.1f}",
         r["config"], f"{r['add_tbs']:.2f}", f"{r['ours_chain_us']:.1f}", f"{r['ours_chain_tbs']:.2f}",
         f"{r['add_chain_tbs']:.2f}"]
        for r in rows])


def plot(rows):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for dtype in sorted({r["dtype"] for r in rows}):
            for heads in sorted({r["heads"] for r in rows}):
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
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweep")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts (comma-separated)")
    parser.add_argument("--heads", default=",".join(map(str, HEADS)), help="head counts (comma-separated)")
    args = parser.parse_args()
    tokens_list, heads_list = ([int(n) for n in text.split(",")] for text in (args.tokens, args.heads))
    shapes = [(tokens, heads, dtype) for dtype in (torch.float16, torch.bfloat16) for heads in heads_list
              for tokens in tokens_list]
    every_shape = tokens_list == TOKENS and heads_list == HEADS
    env = environment()
    text = section_header("merge_attn_states", env)
    sweeps = []
    if not args.no_sweep:
        sweeps = [sweep(*shape) for shape in shapes]
        table = tuned_table(sweeps)
        if every_shape:  # else the entries of the shapes not swept stay
            merge_tuning.TUNED.clear()
        merge_tuning.TUNED.update(table)
        # the installed table (a subset's sweep keeps the other entries): what the main table runs and what to paste
        text += ("### Launch-config sweep\n\n" + sweep_markdown(sweeps, dict(merge_tuning.TUNED))
                 + "\n### merge_attn_states\n\n")
    copy_tbs = copy_bandwidth_tbs()
    rows = [run(*shape) for shape in shapes]
    write_results(args.out, "bench_merge", text + markdown(rows, copy_tbs),
                  dict(meta=env, copy_tbs=copy_tbs, rows=rows, sweeps=sweeps,
                       tuned={str(k): list(v) for k, v in merge_tuning.TUNED.items()}), plot(rows))


if __name__ == "__main__":
    main()
