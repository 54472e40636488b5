"""What every benchmark script shares: the environment record, the timers, and writing the results.

Timers (all medians, µs or ms as named):
- ``bench_us`` / ``bench_ms``: ``triton.testing.do_bench`` of eager calls. For small inputs this includes the gaps
  where the GPU waits for the host to launch the next kernel.
- ``graph_us``: the same call captured once in a CUDA graph and replayed: device time free of host launch gaps.
- ``wall_us``: host wall clock per call in a tight loop (Python, validation and launch included).
- ``host_us``: the host's time to queue one call (no waiting for the GPU): what ``wall_us`` hides when the device
  is slower.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import triton


def argument_parser(doc: str, timing: bool = False) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: its docstring's first line and ``--out DIR`` (default "."); with
    ``timing``, also ``--warmup`` and ``--rep`` (do_bench's warm-up and repetition budgets in ms)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for the results")
    if timing:
        parser.add_argument("--warmup", type=int, default=50, help="do_bench warm-up, ms")
        parser.add_argument("--rep", type=int, default=200, help="do_bench repetitions, ms")
    return parser


def environment() -> dict:
    """GPU name, torch/triton versions, date (UTC) and command of this run."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
    }


def section_header(title: str, env: dict) -> str:
    """``## title (GPU, date, torch x, triton y)`` and the command, as the decode-path tables start."""
    return (f"## {title} ({env['gpu']}, {env['date'][:10]}, torch {env['torch']}, triton {env['triton']})\n\n"
            f"`{env['command']}`\n\n")


def environment_lines(env: dict) -> str:
    """``GPU: .. · torch .. · triton .. · date`` and the command, as the prefill tables start."""
    return (f"GPU: {env['gpu']} · torch {env['torch']} · triton {env['triton']} · {env['date']}\n"
            f"Command: `{env['command']}`\n\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    return bench_ms(fn, warmup_ms, rep_ms) * 1e3


def graph_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median µs of replaying a CUDA graph that holds one call of ``fn``; NaN (with a note) if it cannot be captured.

    ``fn`` is warmed up on a side stream first (Triton compiles, cuDNN/cuBLAS set up their plans), as
    ``torch.cuda.graph`` requires; tensors ``fn`` allocates come from the graph's private memory pool.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        print(f"  CUDA graph capture failed: {str(error).splitlines()[0][:100]}")
        return math.nan
    graph.replay()
    torch.cuda.synchronize()
    us = bench_us(graph.replay, warmup_ms, rep_ms)
    del graph
    return us


def copy_bandwidth_tbs(warmup_ms: int = 50, rep_ms: int = 200) -> float:
    """HBM copy bandwidth in TB/s: a device-to-device copy of a 1 GiB bf16 tensor, read + write bytes counted,
    median of ``do_bench`` repetitions."""
    src = torch.randn(2 ** 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), warmup_ms, rep_ms)
    return 2 * src.numel() * src.element_size() / us / 1e6


def wall_us(fn, calls: int = 500) -> float:
    """Host wall-clock µs per call of ``fn`` in a tight loop (synchronised before and after)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def host_us(fn, calls: int = 200, rounds: int = 20) -> float:
    """Host µs per call of ``fn`` alone: the time to queue ``calls`` back-to-back calls on an idle GPU, not waiting
    for their kernels (few enough launches that the driver's queue never fills); the minimum over ``rounds``."""
    fn()
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return min(samples)


def write_results(out_dir: str, name: str, text: str, payload: dict, plot=None, echo: bool = True) -> None:
    """Print ``text`` (markdown, unless ``echo`` is False) and write DIR/name.md, DIR/name.json (``payload``) and,
    when matplotlib is installed and ``plot`` is given, DIR/name.png from ``plot(plt) -> figure``."""
    os.makedirs(out_dir, exist_ok=True)
    if echo:
        print(text)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    if plot is None:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig = plot(plt)
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
