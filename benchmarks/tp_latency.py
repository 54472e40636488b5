"""Tensor-parallel decode ms/step (Llama-3.1-8B shape, random weights) at TP 1, 2, 4 beside its anchors.

For the tensor-parallelism issue. One bf16 random-weight checkpoint of the Llama-3.1-8B shape (``latency.py``'s
``write_checkpoint``). Per tensor-parallel size N (``--sizes``, those with enough GPUs):

1. collectives: N spawned processes (NCCL, a group of their own) time, inside a CUDA graph as the engine's decode
   graphs hold them, one step's collectives at each batch size B: 2 x layers + 1 all-reduces of (B, hidden) (the
   row-parallel projections and the embedding) and the LM head's all-gather of (B, padded vocab / N) — the
   "all-reduce ms/step"; and, eagerly, the per-step broadcast of the engine's input arena (its size for this
   engine configuration, sent whatever the batch) plus the header read-back the other ranks do: the "broadcast ms".
2. decode: an engine ``LLM(tensor_parallel_size=N)`` with CUDA graphs; per B, B random prompts of --prompt-len
   tokens stepped until each has its first token, then 3 untimed and --decode-steps timed decode-only
   ``engine.step()`` calls (perf_counter): median ms/step.

Anchors measured in the same run: the HBM copy bandwidth (1 GiB device copy), from which the per-GPU weight-read
time = bytes of rank 0's parameters (1/N of the model, plus the replicated norms; an untied input embedding not
counted: a step reads only B of its rows) / bandwidth — the floor of a batch-1 step. Columns: ms/step, its ratio
to TP 1's at the same B (the issue's bar: TP 2 at B1 <= 0.6x), the weight-read ms, the collectives ms and the
broadcast ms.

Usage (GPU): ``python benchmarks/tp_latency.py --out DIR`` (``--sizes 1,2,4 --batch-sizes 1,64``). ``--quick``:
a tiny model on the CPU with gloo (no graphs; collectives timed eagerly), to check the script.
Writes tp_latency.md and tp_latency.json to --out.
"""
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import common
from latency import LLAMA_3_1_8B, QUICK_LLAMA, WARMUP_STEPS, has_first_token, log, random_prompts, step_until
from latency import submit, timed_step, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args():
    parser = common.argument_parser(__doc__)
    csv_ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--sizes", type=csv_ints, default=[1, 2, 4], help="tensor-parallel sizes")
    parser.add_argument("--batch-sizes", type=csv_ints, default=[1, 64])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=50, help="timed repetitions of the collectives")
    parser.add_argument("--work-dir", default=None, help="where the checkpoint goes (default: the system temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU with gloo (smoke run)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(sizes=[1, 2], batch_sizes=[1, 4], decode_steps=4, prompt_len=16, max_model_len=512,
                            repeats=5)
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    args.dtype = "float32" if args.quick else "bfloat16"
    gpus = torch.cuda.device_count() if args.device == "cuda" else 1 << 30
    skipped = [size for size in args.sizes if size > gpus]
    if skipped:
        log(f"skipping sizes {skipped}: {gpus} GPUs")
    args.sizes = [size for size in args.sizes if size <= gpus]
    return args


def engine_options(args, model: str, size: int) -> dict:
    return dict(model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=max(256, *args.batch_sizes), max_num_batched_tokens=8192, enable_prefix_caching=False,
                seed=args.seed, tensor_parallel_size=size)


def arena_bytes(args, model: str) -> int:
    """Bytes of the engine's input arena (what each step broadcasts) for ``engine_options``."""
    from flashserve.engine.input_buffers import InputBuffers

    options = engine_options(args, model, 1)
    blocks_per_seq = -(-args.max_model_len // 16)
    buffers = InputBuffers(options["max_num_batched_tokens"], options["max_num_seqs"], blocks_per_seq, 16,
                           torch.device("cpu"))
    return buffers.arena.numel()


def _timed_ms(fn, repeats: int, cuda: bool) -> float:
    """Median ms of ``fn`` over ``repeats`` calls (CUDA events on the GPU), after 3 untimed calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def collectives_rank(rank: int, size: int, init_method: str, shape: dict, batches: list[int], arena: int,
                     dtype_name: str, cuda: bool, repeats: int, queue) -> None:
    """One rank of the collectives measurement (see the module docstring); rank 0 puts its results in ``queue``."""
    from flashserve.distributed.layers import padded_vocab_size

    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=size)
    dtype = getattr(torch, dtype_name)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the LM head's call
    num_reduces = 2 * shape["num_hidden_layers"] + 1
    vocab_part = padded_vocab_size(shape["vocab_size"], size) // size
    results = {}
    for batch in batches:
        hidden = torch.zeros(batch, shape["hidden_size"], dtype=dtype, device=device)
        logits = torch.zeros(batch, vocab_part, dtype=dtype, device=device)
        gathered = torch.empty(size * batch, vocab_part, dtype=dtype, device=device)

        def step():
            for _ in range(num_reduces):
                dist.all_reduce(hidden)
            all_gather(gathered, logits)
        step()
        run = step
        if cuda:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        dist.barrier()
        results[batch] = _timed_ms(run, repeats, cuda)
    message = torch.zeros(arena, dtype=torch.uint8, device=device)
    header = message[:64].view(torch.int64)
    dist.barrier()
    broadcast_ms = _timed_ms(lambda: (dist.broadcast(message, 0), header.tolist()), repeats, cuda)
    if rank == 0:
        queue.put(dict(collectives_ms=results, broadcast_ms=broadcast_ms, all_reduces=num_reduces))
    dist.barrier()
    dist.destroy_process_group()


def measure_collectives(args, shape: dict, size: int, arena: int) -> dict:
    from flashserve.distributed.launch import free_port

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    ranks = [context.Process(target=collectives_rank, args=(rank, size, init_method, shape, args.batch_sizes, arena,
                                                            args.dtype, args.device == "cuda", args.repeats, queue))
             for rank in range(size)]
    for process in ranks:
        process.start()
    try:
        return queue.get(timeout=600)
    finally:
        for process in ranks:
            process.join(60)


def decode_rows(args, llm, rng: random.Random) -> dict:
    """{batch: median decode ms/step} of one engine (see the module docstring)."""
    engine, rows = llm.engine, {}
    for batch in args.batch_sizes:
        prompts = random_prompts(rng, batch, args.prompt_len, engine.vocab_size)
        ids = submit(engine, prompts, 1 + WARMUP_STEPS + args.decode_steps + 8, "tp")
        try:
            step_until(engine, lambda: has_first_token(engine, ids), 100 + 10 * batch)
            times = [timed_step(engine) for _ in range(WARMUP_STEPS + args.decode_steps)]
            rows[batch] = statistics.median(times[WARMUP_STEPS:])
            log(f"  B{batch}: {rows[batch]:.3f} ms/step")
        finally:
            engine.abort_request(ids)
    return rows


def render(env: dict, results: dict, batches: list[int]) -> str:
    lines = [common.section_header("Tensor-parallel decode, Llama-3.1-8B shape", env)]
    lines.append(f"HBM copy bandwidth: {results.get('copy_gbs', math.nan):.0f} GB/s; input arena broadcast per step: "
                 f"{results['arena_bytes'] / 2**20:.2f} MiB (the same at every batch size up to max_num_seqs = "
                 f"{max(256, *batches)}: the whole arena is sent)\n")
    rows = []
    for size, entry in sorted(results["sizes"].items()):
        base = results["sizes"].get(1, {}).get("decode_ms", {})
        for batch in batches:
            ms = entry.get("decode_ms", {}).get(batch, math.nan)
            ratio = ms / base.get(batch, math.nan) if base else math.nan
            rows.append([size, batch, f"{ms:.3f}", f"{ratio:.2f}x", f"{entry.get('weight_read_ms', math.nan):.3f}",
                         f"{entry.get('collectives_ms', {}).get(batch, math.nan):.3f}",
                         f"{entry.get('broadcast_ms', math.nan):.3f}"])
    lines.append(common.markdown_table(["TP", "batch", "decode ms/step", "vs TP 1", "weight read ms (per GPU)",
                                        "collectives ms/step", "broadcast ms/step"], rows))
    if results.get("errors"):
        lines.append("\nErrors: " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items()))
    return "\n".join(lines)


def weight_read_bytes(model) -> int:
    """Bytes a batch-1 step reads of this rank's parameters (an untied input embedding: none)."""
    total = sum(param.numel() * param.element_size() for param in model.parameters())
    embedding = model.model.embed_tokens.weight
    if model.spec.tie_word_embeddings:
        return total
    return total - embedding.numel() * embedding.element_size()


def main() -> None:
    from flashserve import LLM

    args = parse_args()
    rng = random.Random(args.seed)
    env = common.environment()
    cuda = args.device == "cuda"
    shape = QUICK_LLAMA if args.quick else LLAMA_3_1_8B
    work_dir = tempfile.mkdtemp(prefix="tp-latency-", dir=args.work_dir)
    results = dict(sizes={}, errors={})
    try:
        if cuda:
            results["copy_gbs"] = common.copy_bandwidth_tbs() * 1e3
        log("writing the checkpoint")
        model = os.path.join(work_dir, "llama-3.1-8b")
        results["checkpoint"] = write_checkpoint(model, "LlamaForCausalLM", shape, getattr(torch, args.dtype),
                                                 args.device, args.seed)
        results["arena_bytes"] = arena_bytes(args, model)
        for size in args.sizes:
            entry = results["sizes"].setdefault(size, {})
            try:
                if size > 1:
                    log(f"TP {size}: collectives")
                    entry.update(measure_collectives(args, shape, size, results["arena_bytes"]))
                log(f"TP {size}: engine")
                llm = LLM(**engine_options(args, model, size))
                try:
                    weight_bytes = weight_read_bytes(llm.engine.runner.model)
                    entry["weight_bytes_per_gpu"] = weight_bytes
                    entry["weight_read_ms"] = weight_bytes / (results.get("copy_gbs", math.nan) * 1e6)
                    entry["decode_ms"] = decode_rows(args, llm, rng)
                finally:
                    llm.close()
                    del llm
                    if cuda:
                        torch.cuda.empty_cache()
            except Exception as error:  # noqa: BLE001 - go on with the next size
                results["errors"][f"TP {size}"] = f"{type(error).__name__}: {error}"[:500]
                log(f"TP {size} failed: {error}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        payload = dict(meta=env, args=vars(args), **results)
        common.write_results(args.out, "tp_latency", render(env, results, args.batch_sizes), payload)


if __name__ == "__main__":
    main()
