"""Offline engine throughput, and prefix caching on vs off.

Workloads (see ../shared/ANCHORS.md):
1. nano-vllm's: 256 requests, input and output lengths uniform in [100, 1024], random token ids, ignore_eos.
   Reports output tok/s (and total tok/s) for the whole batch.
2. Prefix sharing: one 2,000-token prefix shared by 64 requests with different 100-token suffixes, 100 output
   tokens each, all submitted at once; run with prefix caching on and off. Reports total time and time to first
   token (mean, median, max) measured through the engine's step API.

The model is a random-weight Qwen3-0.6B-shaped checkpoint (bf16) written into a temporary directory with
``write_random_checkpoint`` (or ``--model DIR``).

Warm-up: Triton compiles (and on Hopper autotunes) a kernel variant the first time it meets a new length class,
batch shape or flag combination, which takes seconds. So each timed run is preceded by an untimed run of the same
workload shape (same lengths, same batch sizes, different random tokens, on the same engine), after which the
prefix cache and the statistics are reset: the timed runs then meet no variant they have not seen, and caching on
and off are compared on equal terms. ``--warmup-requests`` shrinks the warm-up of workload 1 (default: all).

Beside workload 1's measured time the script prints its roofline time (``roofline.py``: weights once per decode
step, every running request's KV once per step, at the copy bandwidth; prefill FLOPs at the dense matmul rate;
both rates measured in the same run; CUDA only).

TTFT is the time from submitting the burst to the step that returns a request's first token. Each prefix-sharing
row also reports the prompt tokens the engine actually computed (``prefill_tokens``): with caching on it must be
far below the ``requests × (prefix + suffix)`` computed with caching off.

Usage (GPU): ``python benchmarks/throughput.py --out DIR``. ``--quick`` shrinks the model and the workloads to
check the script on a CPU. Writes throughput.json and throughput.md (and throughput.png with matplotlib) to --out.
"""
import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

import roofline

QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02)
QUICK_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=True)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for the results (default: .)")
    parser.add_argument("--model", help="checkpoint directory (default: a random Qwen3-0.6B-shaped one)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--prefix-len", type=int, default=2000)
    parser.add_argument("--num-suffixes", type=int, default=64)
    parser.add_argument("--suffix-len", type=int, default=100)
    parser.add_argument("--prefix-output-len", type=int, default=100)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="the engine's async_scheduling (default on)")
    parser.add_argument("--warmup-requests", type=int, default=None,
                        help="requests of workload 1's untimed warm-up run (default: --num-requests)")
    parser.add_argument("--quick", action="store_true", help="tiny model and workloads (CPU smoke run)")
    parser.add_argument("--write-checkpoint", metavar="DIR", default=None,
                        help="only write the benchmark's random checkpoint into DIR (e.g. to serve it) and exit")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.min_len, args.max_len = 8, 8, 32
        args.prefix_len, args.num_suffixes, args.suffix_len, args.prefix_output_len = 64, 4, 8, 8
        args.dtype = "float32"
    return args


def _build_model(args: argparse.Namespace, directory: str) -> str:
    from flashserve.models.checkpoint import write_random_checkpoint

    shape = QUICK_MODEL if args.quick else QWEN3_0_6B
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    write_random_checkpoint(directory, "Qwen3ForCausalLM", seed=args.seed, dtype=dtype, **shape)
    return directory


def _make_llm(args, model: str, enable_prefix_caching: bool):
    from flashserve import LLM

    return LLM(model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=enable_prefix_caching, seed=args.seed, async_scheduling=args.async_scheduling)


def _sync(llm) -> None:
    if llm.engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def _random_prompts(rng: random.Random, count: int, low: int, high: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _throughput_workload(args, seed: int, count: int, vocab: int) -> tuple[list, list]:
    """nano-vllm's workload: ``count`` random prompts and their SamplingParams."""
    from flashserve import SamplingParams

    rng = random.Random(seed)
    prompts = _random_prompts(rng, count, args.min_len, args.max_len, vocab)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(args.min_len, args.max_len))
              for _ in prompts]
    return prompts, params


def _reset(llm) -> None:
    """Forget the warm-up: cached prefixes, hit-rate and engine statistics, preemption count."""
    from flashserve.engine.llm_engine import EngineStats

    _sync(llm)
    llm.reset_prefix_cache()
    llm.engine.stats = EngineStats()
    llm.engine.scheduler.num_preemptions = 0


def _throughput(args, llm, vocab: int) -> dict:
    """nano-vllm's workload through ``LLM.generate``, after an untimed run of the same shape."""
    warm_count = args.num_requests if args.warmup_requests is None else args.warmup_requests
    if warm_count > 0:
        llm.generate(*_throughput_workload(args, args.seed + 100, warm_count, vocab), use_tqdm=False)
    _reset(llm)
    prompts, params = _throughput_workload(args, args.seed, args.num_requests, vocab)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    _sync(llm)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    input_tokens = sum(len(p) for p in prompts)
    stats = llm.engine.stats
    result = dict(requests=len(prompts), input_tokens=input_tokens, output_tokens=output_tokens, seconds=elapsed,
                  output_tok_per_s=output_tokens / elapsed, total_tok_per_s=(input_tokens + output_tokens) / elapsed,
                  steps=stats.num_steps, ms_per_step=1e3 * elapsed / max(stats.num_steps, 1),
                  preemptions=llm.engine.scheduler.num_preemptions, warmup_requests=warm_count)
    runner = llm.engine.runner
    if runner.device.type == "cuda":
        spec = runner.spec
        figures = roofline.model_figures(runner.model, spec.num_layers, runner.num_heads, runner.num_kv_heads,
                                         spec.head_dim, runner.kv_cache.element_size())
        copy_tbs, matmul_tflops = roofline.measure_rates(runner.device)
        result["roofline"] = roofline.roofline_seconds([len(p) for p in prompts], [p.max_tokens for p in params],
                                                       figures, copy_tbs, matmul_tflops, args.max_num_batched_tokens)
        result["roofline_fraction"] = result["roofline"]["seconds"] / elapsed
    return result


def _prefix_workload(args, seed: int, vocab: int) -> list[list[int]]:
    """One random shared prefix followed by ``num_suffixes`` different random suffixes."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_len)]
    return [prefix + [rng.randrange(vocab) for _ in range(args.suffix_len)] for _ in range(args.num_suffixes)]


def _run_burst(llm, prompts: list[list[int]], params, tag: str) -> tuple[float, list[float]]:
    """Submit every prompt at once and step until all finish: (total seconds, sorted TTFTs in seconds)."""
    engine = llm.engine
    _sync(llm)
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{index}", prompt, params)
    first_token_s: dict[str, float] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - start
        for output in outputs:
            first_token_s.setdefault(output.request_id, now)
    _sync(llm)
    return time.perf_counter() - start, sorted(first_token_s.values())


def _prefix_sharing(args, llm, vocab: int) -> dict:
    """One shared prefix, many suffixes, all submitted at once; TTFT from the step API.

    An untimed run of the same shape (another prefix, other suffixes) comes first, so that the kernel variants of
    this mode (paged prefill over a cached prefix with caching on, long plain prefills with it off) are compiled
    before the clock starts.
    """
    from flashserve import SamplingParams

    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.prefix_output_len)
    _run_burst(llm, _prefix_workload(args, args.seed + 101, vocab), params, "warmup")
    _reset(llm)
    elapsed, ttft = _run_burst(llm, _prefix_workload(args, args.seed + 1, vocab), params, "prefix")
    cache = llm.prefix_cache_stats()
    stats = llm.engine.stats
    return dict(requests=args.num_suffixes, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                output_len=args.prefix_output_len, seconds=elapsed, ttft_mean_s=statistics.mean(ttft),
                ttft_median_s=statistics.median(ttft), ttft_p90_s=ttft[int(0.9 * (len(ttft) - 1))],
                ttft_max_s=ttft[-1], hit_rate=cache["hit_rate"], prefill_tokens=stats.prefill_tokens,
                prompt_tokens=args.num_suffixes * (args.prefix_len + args.suffix_len), steps=stats.num_steps)


def _environment(args) -> dict:
    import triton

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv),
                async_scheduling=args.async_scheduling)


def _markdown(result: dict) -> str:
    env, run = result["environment"], result["throughput"]
    lines = [f"## Engine throughput — {env['device']}, {env['date']}", "",
             f"`{env['command']}` (torch {env['torch']}, triton {env['triton']}, model {result['model']}, "
             f"{result['dtype']})", "",
             "| workload | requests | input tok | output tok | seconds | steps | ms/step | output tok/s | "
             "total tok/s | preemptions |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| random [{result['args']['min_len']}, {result['args']['max_len']}] | {run['requests']} | "
             f"{run['input_tokens']} | {run['output_tokens']} | {run['seconds']:.2f} | {run['steps']} | "
             f"{run['ms_per_step']:.1f} | {run['output_tok_per_s']:.0f} | {run['total_tok_per_s']:.0f} | "
             f"{run['preemptions']} |", ""]
    if "roofline" in run:
        line = run["roofline"]
        lines += [f"Roofline of that run: **{line['seconds']:.2f} s** (decode {line['decode_s']:.2f} s: "
                  f"{line['decode_bytes'] / 1e9:.0f} GB at {line['copy_tbs']:.2f} TB/s; prefill "
                  f"{line['prefill_s']:.2f} s: {line['prefill_flops'] / 1e12:.0f} TFLOP at "
                  f"{line['matmul_tflops']:.0f} TFLOP/s) — measured {run['seconds']:.2f} s, "
                  f"**{100 * run['roofline_fraction']:.0f}%** of the roofline speed.", ""]
    lines += ["| prefix sharing | prefix caching | seconds | TTFT mean s | TTFT median s | TTFT p90 s | TTFT max s | "
              "hit rate | prompt tok computed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, label in (("prefix_on", "on"), ("prefix_off", "off")):
        row = result[key]
        lines.append(f"| {row['requests']} × ({row['prefix_len']} + {row['suffix_len']}) → {row['output_len']} | "
                     f"{label} | {row['seconds']:.2f} | {row['ttft_mean_s']:.3f} | {row['ttft_median_s']:.3f} | "
                     f"{row['ttft_p90_s']:.3f} | {row['ttft_max_s']:.3f} | {row['hit_rate']:.2f} | "
                     f"{row['prefill_tokens']} of {row['prompt_tokens']} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(["output tok/s"], [result["throughput"]["output_tok_per_s"]])
    left.set_title("random workload")
    labels = ["caching on", "caching off"]
    right.bar(labels, [result["prefix_on"]["seconds"], result["prefix_off"]["seconds"]], label="total s")
    right.bar(labels, [result["prefix_on"]["ttft_mean_s"], result["prefix_off"]["ttft_mean_s"]],
              label="mean TTFT s")
    right.set_title("prefix sharing")
    right.legend()
    figure.suptitle(result["environment"]["device"])
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    args = _parse_args()
    if args.write_checkpoint is not None:
        _build_model(args, args.write_checkpoint)
        return
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        model = args.model or _build_model(args, directory)
        llm = _make_llm(args, model, enable_prefix_caching=True)
        vocab = llm.engine.vocab_size
        label = "random tiny Qwen3 (--quick)" if args.quick else "random Qwen3-0.6B shape"
        result = dict(environment=_environment(args), model=args.model or label,
                      dtype=args.dtype, args=vars(args), num_kv_blocks=llm.engine.runner.num_kv_blocks)
        result["throughput"] = _throughput(args, llm, vocab)
        print(f"throughput: {result['throughput']}", flush=True)
        result["prefix_on"] = _prefix_sharing(args, llm, vocab)
        print(f"prefix sharing, caching on: {result['prefix_on']}", flush=True)
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        llm = _make_llm(args, model, enable_prefix_caching=False)
        result["prefix_off"] = _prefix_sharing(args, llm, vocab)
        print(f"prefix sharing, caching off: {result['prefix_off']}", flush=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(result, f, indent=1)
    markdown = _markdown(result)
    with open(os.path.join(args.out, "throughput.md"), "w") as f:
        f.write(markdown)
    _plot(result, os.path.join(args.out, "throughput.png"))
    print(markdown)


if __name__ == "__main__":
    main()
