"""Engine decode ms/step (batch 1-256) beside its roofline and HF transformers; start-up times; a no-stall sweep.

For the CUDA-graph issue: the engine with and without CUDA graphs, on two model shapes.

Models: random-weight bf16 checkpoints of two shapes, "qwen3-0.6b" (Qwen3ForCausalLM, tied embeddings) and
"llama-3.1-8b" (LlamaForCausalLM, llama3 rope scaling, untied), written by ``write_checkpoint``: names and shapes
from a meta-device Hugging Face model, every tensor drawn in the target dtype on the GPU (N(0, 0.02); norm weights
N(1, 0.02)) and saved in safetensors shards of ~4 GB with an index, plus config.json and a small tokenizer.

Sections (``--sections``, run in the order given; default all in this order, the cheap kernel check early so that
a time limit cannot cost it; the results are rewritten after every measurement):
1. copy: HBM copy bandwidth (1 GiB device-to-device copy, read + write bytes, median): the roofline's bandwidth.
2. splits: ``flash_attn_with_kvcache`` decode (Qwen3-0.6B heads, page 16, CUDA graph): block table as wide as the
   context ("exact") vs as wide as 32768 tokens ("worst case", the engine's max_model_len-wide table).
3. decode: per shape, one engine with CUDA graphs and one eager (``enforce_eager``); per batch size B, B random
   prompts of ``--prompt-len`` tokens, stepped until each has its first token, then ``--decode-steps`` decode-only
   ``engine.step()`` calls timed with ``perf_counter`` after 3 untimed warm-up steps; median ms/step. Roofline =
   (weight bytes + KV bytes) / copy bandwidth, with weight bytes = every parameter once (a tied embedding once, as
   the LM head; an untied input embedding only its B looked-up rows) and KV bytes = B x mean context x layers x 2 x
   KV heads x head_dim x element size. Also profiles one eager qwen3-0.6b B1 step (kernels per step and per layer,
   host µs per layer = eager B1 ms / layers; the functions with the most host time in another step, by cProfile)
   and, per graph engine, one B1 graph replay's kernel timeline (span,
   idle time between kernels, overlaps: ``graph_gaps``). ``--pdl`` sets ``FLASHSERVE_PDL`` for the engines: on
   (default), off, or both (a third engine, "graphs no-pdl", with graphs and without programmatic dependent
   launch, so that one run gives the ratio).
4. hf: transformers ``generate`` at B1, greedy: ms/step = (t(1 + N new tokens) - t(1 new token)) / N, median of 3
   runs after a warm-up; speedup of the engine (graphs and eager, B1) over it.
5. startup: ``LLM(...)`` of qwen3-0.6b in a fresh subprocess, cold (empty TRITON_CACHE_DIR and FLASHSERVE_CACHE_DIR)
   then warm (the same directories), with the engine's own ``startup_times_s`` and the first request's time.
6. sweep: one qwen3-0.6b engine with graphs; prompt lengths 1..8190 (around block, tile and power-of-two edges) x
   batch sizes 1, 3, 17, 64 (at most 64k prompt tokens), 4 output tokens each, every step timed: max step ms and
   steps over 1 s (a compile or autotune after start-up would show here); then a long prompt joins 32 decodes.

Usage (GPU): ``python benchmarks/latency.py --out DIR``. ``--quick``: tiny models on the CPU in float32 (copy and
splits skipped, CUDA counts NaN), to check the script. Writes latency.md, latency.json and latency.png to --out.
"""
import argparse
import cProfile
import gc
import itertools
import json
import math
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import common
import graph_gaps
from throughput import QUICK_MODEL, QWEN3_0_6B

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
sys.path.insert(0, REPO)

LLAMA_3_1_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192, rope_type="llama3"),
                    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)
QUICK_LLAMA = dict(QUICK_MODEL, tie_word_embeddings=False, rope_theta=500000.0,
                   rope_scaling=dict(LLAMA_3_1_8B["rope_scaling"], original_max_position_embeddings=512))
SHAPES = {"qwen3-0.6b": ("Qwen3ForCausalLM", QWEN3_0_6B), "llama-3.1-8b": ("LlamaForCausalLM", LLAMA_3_1_8B)}
QUICK_SHAPES = {"qwen3-0.6b": ("Qwen3ForCausalLM", QUICK_MODEL), "llama-3.1-8b": ("LlamaForCausalLM", QUICK_LLAMA)}
SECTIONS = ("copy", "splits", "decode", "hf", "startup", "sweep")
PDL_CHOICES = ("on", "off", "both")
NO_PDL = "graphs no-pdl"  # the decode section's graphs engine without programmatic dependent launch (--pdl both)
WARMUP_STEPS, STALL_MS, SHARD_BYTES = 3, 1000.0, 4 * 10 ** 9
SWEEP_LENGTHS = (1, 2, 63, 64, 65, 500, 512, 513, 1000, 2048, 4095, 4096, 4097, 6000, 8190)
SWEEP_BATCHES, SWEEP_MAX_TOKENS = (1, 3, 17, 64), 64 * 1024
SPLIT_BATCHES, SPLIT_CONTEXTS, SPLIT_WORST_LEN, PAGE = (1, 8, 64), (128, 512, 4096), 32768, 16
_request_ids = itertools.count()
_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def parse_args():
    parser = common.argument_parser(__doc__)
    csv_ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    csv = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--sections", type=csv, default=list(SECTIONS), help=",".join(SECTIONS))
    parser.add_argument("--shapes", type=csv, default=list(SHAPES), help=",".join(SHAPES))
    parser.add_argument("--batch-sizes", type=csv_ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=4096, help="of the decode section's engines")
    parser.add_argument("--startup-max-model-len", type=int, default=8192, help="of the startup and sweep engines")
    parser.add_argument("--max-cudagraph-capture-size", type=int, default=None, help="passed to LLM when given")
    parser.add_argument("--startup-timeout", type=int, default=900, help="seconds per start-up subprocess")
    parser.add_argument("--work-dir", default=None, help="where the checkpoints go (default: the system temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="the engines' async_scheduling (default on)")
    parser.add_argument("--pdl", choices=PDL_CHOICES, default="on",
                        help="programmatic dependent launch in the engines (FLASHSERVE_PDL); both: also a graphs "
                             "engine without it")
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU (smoke run)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(batch_sizes=[1, 2], decode_steps=4, prompt_len=16, max_model_len=512,
                            startup_max_model_len=1024)
    args = parser.parse_args()
    for given, known in ((args.sections, SECTIONS), (args.shapes, SHAPES)):
        if set(given) - set(known):
            parser.error(f"unknown {sorted(set(given) - set(known))}: choose from {','.join(known)}")
    args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    args.dtype = "float32" if args.quick else "bfloat16"
    return args


def fmt(value, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def short(text, limit: int = 120) -> str:
    """An error message for a table cell: its last line, without pipes, at most ``limit`` characters."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "").replace("|", "/")[:limit]


def phases(times) -> str:
    """The engine's ``startup_times_s`` as ``phase s, ...`` (— when the engine does not report them)."""
    if not isinstance(times, dict):
        return "—"
    return ", ".join(f"{k} {fmt(v) if isinstance(v, (int, float)) else v}" for k, v in times.items())


def graphs_text(startup: dict) -> str:
    """``N CUDA graphs (batch 1..M, X GiB)`` or ``no CUDA graphs``."""
    sizes = startup.get("capture_sizes")
    if not sizes:
        return "no CUDA graphs"
    return f"{len(sizes)} CUDA graphs (batch {min(sizes)}..{max(sizes)}, {fmt(startup.get('graph_memory_gib'))} GiB)"


def free_memory(what: str | None = None) -> None:
    """Collect garbage and return cached GPU memory; with ``what``, log the GPU memory still allocated (an engine
    that is not freed would shrink the next one's KV cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if what:
            log(f"after freeing {what}: {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated")


def write_checkpoint(directory: str, architecture: str, shape: dict, dtype: torch.dtype, device: str,
                     seed: int = 0) -> dict:
    """A random checkpoint loadable by flashserve and transformers, written fast (see the module docstring)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from flashserve.models.checkpoint import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, save_tokenizer, train_tokenizer
    from flashserve.models.registry import get_traits

    start = time.perf_counter()
    os.makedirs(directory, exist_ok=True)
    tokenizer = train_tokenizer(400)
    config = AutoConfig.for_model(get_traits(architecture).model_type, bos_token_id=tokenizer.token_to_id(BOS_TOKEN),
                                  eos_token_id=tokenizer.token_to_id(EOS_TOKEN),
                                  pad_token_id=tokenizer.token_to_id(PAD_TOKEN), **shape)
    config.architectures, config.dtype = [architecture], dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = [(name, tuple(param.shape)) for name, param in model.named_parameters()
               if not (config.tie_word_embeddings and name == "lm_head.weight")]
    element = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for name, dims in tensors:
        nbytes = math.prod(dims) * element
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator(device).manual_seed(seed)
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        drawn = {}
        for name, dims in shard:
            mean = 1.0 if name.endswith("norm.weight") else 0.0
            drawn[name] = torch.empty(dims, dtype=dtype, device=device).normal_(mean, 0.02, generator=generator).cpu()
            weight_map[name] = file
        save_file(drawn, os.path.join(directory, file), metadata={"format": "pt"})
        log(f"  {file}: {sum(t.nbytes for t in drawn.values()) / 1e9:.2f} GB, {time.perf_counter() - start:.1f} s")
        del drawn
    total = sum(math.prod(dims) for _, dims in tensors) * element
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    embed = shape["vocab_size"] * shape["hidden_size"] * element
    return dict(params=total // element, bytes=total, embed_bytes=embed, tied=bool(config.tie_word_embeddings),
                shards=len(shards), write_s=time.perf_counter() - start)


class Run:
    """Arguments, results, the checkpoints written so far, and writing the results."""

    def __init__(self, args):
        self.args, self.env = args, common.environment()
        self.cuda = args.device == "cuda"
        self.shapes = QUICK_SHAPES if args.quick else SHAPES
        self.work_dir = tempfile.mkdtemp(prefix="latency-", dir=args.work_dir)
        self.results = dict(checkpoints={}, section_s={}, errors={})
        self.rng = random.Random(args.seed)
        self.startup_caches: dict[str, str] = {}  # the startup section's compile and autotuning cache folders

    def checkpoint(self, name: str) -> str:
        directory = os.path.join(self.work_dir, name)
        if name not in self.results["checkpoints"]:
            architecture, shape = self.shapes[name]
            log(f"writing the {name} checkpoint")
            info = write_checkpoint(directory, architecture, shape, getattr(torch, self.args.dtype),
                                    self.args.device, self.args.seed)
            self.results["checkpoints"][name] = info
            log(f"{name}: {info['params'] / 1e9:.2f} B params, {info['bytes'] / 1e9:.1f} GB in {info['write_s']:.1f} s")
            free_memory()
        return directory

    def llm_kwargs(self, model: str, max_model_len: int, eager: bool) -> dict:
        kwargs = dict(model=model, dtype=self.args.dtype, device=self.args.device, max_model_len=max_model_len,
                      max_num_seqs=max(256, *self.args.batch_sizes), max_num_batched_tokens=8192,
                      enable_prefix_caching=False, enforce_eager=eager, seed=self.args.seed,
                      async_scheduling=self.args.async_scheduling)
        if self.args.max_cudagraph_capture_size is not None:
            kwargs["max_cudagraph_capture_size"] = self.args.max_cudagraph_capture_size
        return kwargs

    def make_llm(self, model: str, max_model_len: int, eager: bool):
        """(LLM, its start-up record)."""
        from flashserve import LLM

        start = time.perf_counter()
        llm = LLM(**self.llm_kwargs(model, max_model_len, eager))
        return llm, dict(build_s=time.perf_counter() - start, **engine_startup(llm))

    def bandwidth_gbs(self) -> float:
        if "copy" not in self.results and self.cuda:
            self.results["copy"] = dict(gbs=common.copy_bandwidth_tbs() * 1e3)
        return self.results.get("copy", {}).get("gbs", math.nan)

    def save(self, with_plot: bool = False, echo: bool = False) -> None:
        """latency.md and latency.json (and latency.png ``with_plot``); ``echo`` prints the markdown."""
        payload = dict(meta=self.env, args=vars(self.args), **self.results)
        try:
            common.write_results(self.args.out, "latency", render(self), payload,
                                 plot(self.results) if with_plot else None, echo=echo)
        except Exception:  # noqa: BLE001 - a broken table or plot must not lose the JSON
            log(f"writing the results failed:\n{traceback.format_exc()}")
            os.makedirs(self.args.out, exist_ok=True)
            with open(os.path.join(self.args.out, "latency.json"), "w") as f:
                json.dump(payload, f, indent=2, default=str)


def b1_ms(run: Run, name: str, mode: str) -> float:
    """The decode section's B1 ms/step of ``name`` in ``mode`` (NaN when not measured)."""
    rows = run.results.get("decode", {}).get(name, {}).get(mode, {}).get("rows", [])
    return next((r["ms"] for r in rows if r["batch"] == 1 and "ms" in r), math.nan)


def engine_startup(llm) -> dict:
    """What the engine says about its start-up, read defensively: phase times, captured sizes, graph memory."""
    runner = llm.engine.runner
    graphs = getattr(runner, "graphs", None)
    sizes = getattr(graphs, "capture_sizes", None) or getattr(graphs, "sizes", None)
    return dict(startup_times_s=getattr(runner, "startup_times_s", None),
                capture_sizes=None if sizes is None else [int(s) for s in sizes],
                graph_memory_gib=getattr(graphs, "memory_bytes", 0) / 2**30 if graphs is not None else None)


def random_prompts(rng: random.Random, count: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(count)]


def submit(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> list[str]:
    from flashserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}-{next(_request_ids)}" for _ in prompts]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    return ids


def timed_step(engine) -> float:
    """ms of one ``engine.step()`` (which waits for the device: it reads the sampled ids of its step, or with
    async scheduling those of the step before, after launching its own)."""
    start = time.perf_counter()
    engine.step()
    return (time.perf_counter() - start) * 1e3


def step_until(engine, done, max_steps: int) -> list[float]:
    """Step until ``done()``; the ms of every step."""
    times = []
    while not done():
        if len(times) >= max_steps or not engine.has_unfinished():
            raise RuntimeError(f"not done after {len(times)} steps")
        times.append(timed_step(engine))
    return times


def has_first_token(engine, ids: list[str]) -> bool:
    return all(r not in engine.requests or engine.requests[r].num_output_tokens >= 1 for r in ids)


def decode_batch(run: Run, engine, batch: int, profile_layers: int = 0) -> dict:
    """B requests of --prompt-len random tokens: prefill until each has its first token, then time
    WARMUP_STEPS + --decode-steps decode-only steps (the warm-up ones discarded); optionally profile one more."""
    args = run.args
    prefill_steps = -(-batch * args.prompt_len // engine.config.max_num_batched_tokens) + 2
    max_tokens = 1 + WARMUP_STEPS + args.decode_steps + prefill_steps + 2
    ids = submit(engine, random_prompts(run.rng, batch, args.prompt_len, engine.vocab_size), max_tokens, "decode")
    try:
        prefill = step_until(engine, lambda: has_first_token(engine, ids), 10 * prefill_steps + 10)
        times, contexts = [], []
        for _ in range(WARMUP_STEPS + args.decode_steps):
            contexts.append(statistics.mean(engine.requests[r].num_tokens for r in ids))
            times.append(timed_step(engine))
        ms = statistics.median(times[WARMUP_STEPS:])
        row = dict(batch=batch, ms=ms, tok_per_s=batch * 1e3 / ms, step_ms=times[WARMUP_STEPS:],
                   mean_context=statistics.mean(contexts[WARMUP_STEPS:]), prefill_steps=len(prefill),
                   prefill_s=sum(prefill) / 1e3)
        graphs = getattr(engine.runner, "graphs", None)
        if graphs is not None and graphs.padded_size(batch) is not None:
            row["graph_gpu_ms"] = replay_ms(graphs, graphs.padded_size(batch))
            if batch == 1:
                row["graph_timeline"] = graph_gaps.replay_timeline(lambda: graphs.replay(1))
        if profile_layers:
            row["profile"] = profile_step(engine, profile_layers, ms, run.cuda)
        return row
    finally:
        engine.abort_request(ids)


def replay_ms(graphs, size: int, repeats: int = 50) -> float:
    """GPU time of one replay of the decode graph of ``size`` (CUDA events around back-to-back replays, on the
    inputs of the last step): the step's device time without the host's part."""
    for _ in range(3):
        graphs.replay(size)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graphs.replay(size)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


KERNEL_GROUPS = (("matmul", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitk")),
                 ("attention", ("_decode_kernel", "_combine_splits", "_prefill_kernel")),
                 ("qk norm + rotary + KV write", ("_qk_norm_rope",)), ("rms norm", ("_rms_norm",)),
                 ("silu * mul", ("silu",)))


def kernel_time_groups(events) -> dict:
    """GPU µs per kernel group (matmuls, attention, ...) and the five longest kernels of a profiled step."""
    groups, kernels = {}, {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA or event.name.startswith(("Memcpy", "Memset")):
            continue
        micros = event.time_range.elapsed_us()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in event.name.lower() for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + micros
        kernels[event.name] = kernels.get(event.name, 0.0) + micros
    top = sorted(kernels.items(), key=lambda item: -item[1])[:5]
    return dict(group_us=groups, total_us=sum(groups.values()), top_kernels_us=[[short(n, 60), t] for n, t in top])


HOST_TOP_FUNCTIONS = 12  # functions listed by own host time in the eager step's cProfile


def host_top_functions(engine) -> list[tuple[str, float, int]]:
    """One more eager decode step under cProfile: the functions with the most own (not cumulative) host time, as
    (``file:line(function)`` with the path from the package or library down, µs in the step, calls). cProfile adds
    its own cost to every call: the figures rank the host's work, they do not time it."""
    profiler = cProfile.Profile()
    profiler.enable()
    timed_step(engine)
    profiler.disable()
    rows = []
    for (path, line, name), (_, calls, own_s, _, _) in pstats.Stats(profiler).stats.items():
        parts = path.replace(os.sep, "/").split("/")
        where = "/".join(parts[-2:]) if len(parts) > 1 else path
        rows.append((f"{where}:{line}({name})", own_s * 1e6, calls))
    return sorted(rows, key=lambda row: -row[1])[:HOST_TOP_FUNCTIONS]


def profile_step(engine, layers: int, step_ms: float, cuda: bool) -> dict:
    """Kernels launched by one decode step (torch.profiler), per step and per layer; host µs per layer; the
    functions with the most host time in another step (cProfile: ``host_top_functions``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        profiled_ms = timed_step(engine)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset")))
    launches = sum(1 for e in events if "LaunchKernel" in e.name)
    kernels = kernels if cuda else math.nan
    return dict(kernels_per_step=kernels, kernels_per_layer=kernels / layers, launch_calls_per_step=launches,
                host_us_per_layer=step_ms * 1e3 / layers, profiled_step_ms=profiled_ms, layers=layers,
                gpu_time=kernel_time_groups(events) if cuda else {}, host_top=host_top_functions(engine))


def section_copy(run: Run) -> None:
    if not run.cuda:
        run.results["copy"] = dict(gbs=math.nan, note="no CUDA: skipped")
        return
    run.results.pop("copy", None)
    log(f"HBM copy bandwidth: {run.bandwidth_gbs():.0f} GB/s")


def pdl_in_use(device: str) -> bool:
    """Whether the kernels launch with programmatic dependent launch on ``device``, FLASHSERVE_PDL as now set (the
    kernels decide again)."""
    from flashserve.kernels import pdl

    pdl.refresh()
    return pdl.enabled(torch.device(device))


def section_decode(run: Run) -> None:
    decode = run.results.setdefault("decode", {})
    bandwidth = run.bandwidth_gbs()
    for name in run.args.shapes:
        model = run.checkpoint(name)
        info, shape = run.results["checkpoints"][name], run.shapes[name][1]
        element = info["bytes"] // info["params"]
        kv_per_token = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"] * element
        modes = ("graphs", NO_PDL, "eager") if run.args.pdl == "both" else ("graphs", "eager")
        for mode in modes:
            entry = decode.setdefault(name, {})[mode] = dict(rows=[])
            os.environ["FLASHSERVE_PDL"] = "0" if mode == NO_PDL or run.args.pdl == "off" else "1"
            entry["pdl"] = pdl_in_use(run.args.device)
            try:
                llm, entry["startup"] = run.make_llm(model, run.args.max_model_len, eager=mode == "eager")
                log(f"{name} {mode}: engine built in {entry['startup']['build_s']:.1f} s, "
                    f"{graphs_text(entry['startup'])}")
            except Exception as error:  # noqa: BLE001
                entry["error"] = f"{type(error).__name__}: {error}"
                log(f"{name} {mode}: engine build failed:\n{traceback.format_exc()}")
                continue
            for batch in run.args.batch_sizes:
                try:
                    profile = shape["num_hidden_layers"] if (name, mode, batch) == ("qwen3-0.6b", "eager", 1) else 0
                    row = decode_batch(run, llm.engine, batch, profile)
                    embed_unread = 0 if info["tied"] else info["embed_bytes"] - batch * shape["hidden_size"] * element
                    row["roofline_ms"] = ((info["bytes"] - embed_unread + batch * row["mean_context"] * kv_per_token)
                                          / (bandwidth * 1e9) * 1e3)
                    entry["rows"].append(row)
                    log(f"{name} {mode} B{batch}: {row['ms']:.3f} ms/step (roofline {fmt(row['roofline_ms'], 3)} ms), "
                        f"{row['tok_per_s']:.0f} tok/s")
                    if "graph_timeline" in row:
                        log(f"{name} {mode} B1 graph replay: {graph_gaps.describe(row['graph_timeline'])}")
                    if "profile" in row:
                        run.results["host_cost"] = row.pop("profile")
                        log(f"eager host cost: {run.results['host_cost']}")
                except Exception as error:  # noqa: BLE001
                    entry["rows"].append(dict(batch=batch, error=f"{type(error).__name__}: {error}"))
                    log(f"{name} {mode} B{batch} failed:\n{traceback.format_exc()}")
                run.save()
            del llm
            free_memory(f"the {name} {mode} engine")
    os.environ.pop("FLASHSERVE_PDL", None)
    pdl_in_use(run.args.device)


def section_hf(run: Run) -> None:
    from transformers import AutoModelForCausalLM

    hf = run.results.setdefault("hf", {})
    n = run.args.decode_steps
    for name in run.args.shapes:
        try:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(run.checkpoint(name), dtype=getattr(torch, run.args.dtype))
            model = model.to(run.args.device).eval()
            load_s = time.perf_counter() - start
            prompt = torch.tensor(random_prompts(run.rng, 1, run.args.prompt_len, model.config.vocab_size),
                                  device=run.args.device)

            def generate_s(new_tokens: int) -> float:
                start = time.perf_counter()
                with torch.inference_mode():
                    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                if run.cuda:
                    torch.cuda.synchronize()
                return time.perf_counter() - start

            generate_s(1), generate_s(1 + n)
            runs = [(generate_s(1 + n) - generate_s(1)) / n * 1e3 for _ in range(3)]
            hf[name] = dict(ms=statistics.median(runs), runs_ms=runs, load_s=load_s)
            log(f"HF {name} B1: {hf[name]['ms']:.2f} ms/step (load {load_s:.1f} s)")
            del model
        except Exception as error:  # noqa: BLE001
            hf[name] = dict(error=f"{type(error).__name__}: {error}")
            log(f"HF {name} failed:\n{traceback.format_exc()}")
        free_memory(f"the HF {name} model")
        run.save()
        for mode in ("graphs", "eager"):
            log(f"{name}: engine {mode} B1 is {hf[name].get('ms', math.nan) / b1_ms(run, name, mode):.2f}x "
                "faster than HF generate")


STARTUP_CODE = """
import json, sys, time
start = time.perf_counter()
from flashserve import LLM, SamplingParams
from latency import engine_startup
imported = time.perf_counter()
llm = LLM(**json.loads(sys.argv[1]))
built = time.perf_counter()
llm.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("LATENCY_STARTUP " + json.dumps(dict(import_s=imported - start, llm_s=built - imported,
      first_request_s=time.perf_counter() - built, **engine_startup(llm)), default=str), flush=True)
"""


def section_startup(run: Run) -> None:
    kwargs = run.llm_kwargs(run.checkpoint("qwen3-0.6b"), run.args.startup_max_model_len, eager=False)
    caches = run.startup_caches = {key: tempfile.mkdtemp(prefix=f"{key.lower()}-", dir=run.work_dir)
                                   for key in ("TRITON_CACHE_DIR", "FLASHSERVE_CACHE_DIR")}
    path = os.pathsep.join(filter(None, [REPO, BENCHMARKS, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, **caches, PYTHONPATH=path)
    startup = run.results["startup"] = {}
    for label in ("cold", "warm"):
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", STARTUP_CODE, json.dumps(kwargs)], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=run.args.startup_timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("LATENCY_STARTUP ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"exit {done.returncode}: {done.stderr[-2000:]}")
            startup[label] = dict(json.loads(lines[-1].split(" ", 1)[1]), process_s=time.perf_counter() - start,
                                  log_tail=done.stderr[-1500:])
            log(f"start-up {label}: " + str({k: v for k, v in startup[label].items() if k != "log_tail"}))
        except Exception as error:  # noqa: BLE001
            startup[label] = dict(error=f"{type(error).__name__}: {error}"[-2000:])
            log(f"start-up {label} failed: {startup[label]['error']}")
        run.save()


def section_sweep(run: Run) -> None:
    max_len = run.args.startup_max_model_len
    lengths = sorted({min(length, max_len - 2) for length in SWEEP_LENGTHS})
    batches, cap = ((1, 3), 4096) if run.args.quick else (SWEEP_BATCHES, SWEEP_MAX_TOKENS)
    # After the startup section, start from its (now warm) compile and autotuning caches, like a second start.
    os.environ.update(run.startup_caches)
    llm, startup = run.make_llm(run.checkpoint("qwen3-0.6b"), max_len, eager=False)
    engine = llm.engine
    sweep = run.results["sweep"] = dict(startup=startup, rows=[])
    log(f"sweep engine built in {startup['build_s']:.1f} s, {graphs_text(startup)}")
    for length, batch in itertools.product(lengths, batches):
        if length * batch > cap:
            continue
        ids = submit(engine, random_prompts(run.rng, batch, length, engine.vocab_size), 4, "sweep")
        try:
            times = step_until(engine, lambda: not any(r in engine.requests for r in ids), 1000)
            row = dict(prompt_len=length, batch=batch, steps=len(times), max_ms=max(times),
                       over_1s=sum(t > STALL_MS for t in times), total_s=sum(times) / 1e3)
            log(f"sweep P{length} B{batch}: {len(times)} steps, max {row['max_ms']:.1f} ms, {row['over_1s']} over 1 s")
        except Exception as error:  # noqa: BLE001
            row = dict(prompt_len=length, batch=batch, error=f"{type(error).__name__}: {error}")
            log(f"sweep P{length} B{batch} failed:\n{traceback.format_exc()}")
        finally:
            engine.abort_request(ids)
        sweep["rows"].append(row)
        run.save()
    decoders = submit(engine, random_prompts(run.rng, 32, 128, engine.vocab_size), 64, "mixed")
    try:
        step_until(engine, lambda: has_first_token(engine, decoders), 20)
        before = [timed_step(engine) for _ in range(5)]
        long_len = min(6000, max_len - 2)
        [long_id] = submit(engine, random_prompts(run.rng, 1, long_len, engine.vocab_size), 4, "mixed-long")
        during = step_until(engine, lambda: has_first_token(engine, [long_id]), 20)
        sweep["mixed"] = dict(decoders=32, long_prompt=long_len, decode_ms=statistics.median(before),
                              steps=len(during), max_ms=max(during), over_1s=sum(t > STALL_MS for t in during))
        log(f"sweep mixed: {sweep['mixed']}")
    finally:
        engine.abort_request(list(engine.requests))
        del llm, engine
        free_memory("the sweep engine")


def section_splits(run: Run) -> None:
    if not run.cuda:
        run.results["splits"] = dict(note="no CUDA: skipped", rows=[])
        return
    from flashserve.kernels import flash_attn_with_kvcache

    heads, kv_heads, head_dim = QWEN3_0_6B["num_attention_heads"], QWEN3_0_6B["num_key_value_heads"], 128
    device = run.args.device
    rows = run.results.setdefault("splits", dict(rows=[]))["rows"]
    for batch, length in itertools.product(SPLIT_BATCHES, SPLIT_CONTEXTS):
        width, blocks = -(-length // PAGE), batch * -(-length // PAGE)
        k_cache, v_cache = (torch.randn(blocks, PAGE, kv_heads, head_dim, dtype=torch.bfloat16, device=device)
                            for _ in range(2))
        q = torch.randn(batch, 1, heads, head_dim, dtype=torch.bfloat16, device=device)
        seqlens = torch.full((batch,), length, dtype=torch.int32, device=device)
        exact = torch.randperm(blocks, device=device).to(torch.int32).view(batch, width)
        worst = torch.zeros(batch, -(-SPLIT_WORST_LEN // PAGE), dtype=torch.int32, device=device)
        worst[:, :width] = exact

        def attend(table):
            return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                                   causal=True)

        diff = (attend(exact)() - attend(worst)()).abs().max().item()
        row = dict(batch=batch, context=length, exact_us=common.graph_us(attend(exact)),
                   worst_us=common.graph_us(attend(worst)), max_abs_diff=diff)
        row["ratio"] = row["worst_us"] / row["exact_us"]
        rows.append(row)
        log(f"splits B{batch} L{length}: exact {row['exact_us']:.1f} µs, worst case {row['worst_us']:.1f} µs")
        del k_cache, v_cache
        free_memory()


def md_decode(run: Run, res: dict) -> list[str]:
    out = []
    if "copy" in res:
        out.append(f"HBM copy bandwidth (1 GiB device-to-device, read + write): {fmt(res['copy']['gbs'], 0)} GB/s\n")
    for name, modes in res.get("decode", {}).items():
        out.append(f"### Decode ms/step, {name}, prompt {run.args.prompt_len}, median of {run.args.decode_steps} "
                   f"steps after {WARMUP_STEPS} warm-up\n")
        by_batch, timelines = {}, []
        for mode, entry in modes.items():
            s = entry.get("startup", {})
            pdl = {True: ", PDL on", False: ", PDL off"}.get(entry.get("pdl"), "")
            out.append(f"- {mode}: {entry.get('error') or 'built in ' + fmt(s.get('build_s'), 1) + ' s'}{pdl}, "
                       f"{graphs_text(s)}, start-up phases (s): {phases(s.get('startup_times_s'))}")
            for row in entry["rows"]:
                by_batch.setdefault(row["batch"], {})[mode] = row
                if "graph_timeline" in row:
                    timelines.append(f"- {mode} B{row['batch']} graph replay: "
                                     f"{graph_gaps.describe(row['graph_timeline'])}")
        with_no_pdl = NO_PDL in modes
        table = []
        for batch, cells in sorted(by_batch.items()):
            g, e, n = cells.get("graphs", {}), cells.get("eager", {}), cells.get(NO_PDL, {})
            roof = g.get("roofline_ms", e.get("roofline_ms", math.nan))
            no_pdl = [fmt(n.get("ms"), 3), fmt(n.get("graph_gpu_ms"), 3),
                      fmt(n.get("graph_gpu_ms", math.nan) / g.get("graph_gpu_ms", math.nan))] if with_no_pdl else []
            table.append([batch, fmt(g.get("ms"), 3), fmt(g.get("graph_gpu_ms"), 3), *no_pdl, fmt(e.get("ms"), 3),
                          fmt(roof, 3),
                          fmt(g.get("ms", math.nan) / roof), fmt(e.get("ms", math.nan) / roof),
                          fmt(g.get("tok_per_s"), 0), fmt(e.get("tok_per_s"), 0),
                          fmt(g.get("mean_context", e.get("mean_context")), 1),
                          short(g.get("error") or n.get("error") or e.get("error"))])
        no_pdl_header = ["no-pdl ms", "no-pdl GPU ms", "no-pdl / pdl GPU"] if with_no_pdl else []
        out += ["", common.markdown_table(["B", "graphs ms", "graph GPU ms", *no_pdl_header, "eager ms",
                                           "roofline ms", "graphs / roof",
                                           "eager / roof", "graphs tok/s", "eager tok/s", "mean ctx", "error"], table),
                ""]
        if timelines:
            out += [f"Kernel timeline of one B1 graph replay ({name}; idle = span - union of kernel intervals):", "",
                    *timelines, ""]
    if "host_cost" in res:
        h = res["host_cost"]
        out.append(f"Eager host cost (qwen3-0.6b, B1, one profiled decode step): {fmt(h['kernels_per_step'], 0)} CUDA "
                   f"kernels per step, {fmt(h['kernels_per_layer'], 1)} per layer ({h['layers']} layers), "
                   f"{h['launch_calls_per_step']} launch API calls; {fmt(h['host_us_per_layer'], 1)} µs per layer "
                   f"(eager B1 ms / layers)\n")
        gpu = h.get("gpu_time") or {}
        if gpu:
            groups = ", ".join(f"{name} {fmt(us, 1)}" for name, us in sorted(gpu["group_us"].items(),
                                                                          key=lambda item: -item[1]))
            top = "; ".join(f"{name} {fmt(us, 1)}" for name, us in gpu["top_kernels_us"])
            out.append(f"GPU time of that step by kernel group (µs, sum {fmt(gpu['total_us'], 1)}): {groups}. "
                       f"Longest kernels (µs): {top}\n")
        if h.get("host_top"):
            listed = "; ".join(f"{where} {fmt(us, 0)} ({calls})" for where, us, calls in h["host_top"])
            out.append(f"Most host time in another eager step (cProfile, own µs (calls), inflated by the "
                       f"profiler): {listed}\n")
    return out


def md_hf(run: Run, res: dict) -> list[str]:
    rows = []
    for name, h in res["hf"].items():
        g, e = b1_ms(run, name, "graphs"), b1_ms(run, name, "eager")
        rows.append([name, fmt(h.get("ms")), fmt(g, 3), fmt(h.get("ms", math.nan) / g), fmt(e, 3),
                     fmt(h.get("ms", math.nan) / e), fmt(h.get("load_s"), 1), short(h.get("error"))])
    return ["### Hugging Face transformers generate, B1 (greedy)\n", common.markdown_table(
        ["shape", "HF ms/step", "graphs B1 ms", "HF / graphs", "eager B1 ms", "HF / eager", "HF load s", "error"],
        rows), ""]


def md_startup(run: Run, res: dict) -> list[str]:
    rows = [[label, fmt(s.get("process_s"), 1), fmt(s.get("import_s"), 1), fmt(s.get("llm_s"), 1),
             fmt(s.get("first_request_s"), 2), phases(s.get("startup_times_s")), short(s.get("error"), 200)]
            for label, s in res["startup"].items()]
    return [f"### Start-up, qwen3-0.6b, max_model_len {run.args.startup_max_model_len} (fresh subprocess)\n",
            common.markdown_table(["run", "process s", "import s", "LLM() s", "first request s", "phases s", "error"],
                                  rows), ""]


def md_sweep(run: Run, res: dict) -> list[str]:
    sweep, rows = res["sweep"], res["sweep"]["rows"]
    worst = max((r["max_ms"] for r in rows if "max_ms" in r), default=math.nan)
    stalls = sum(r.get("over_1s", 0) for r in rows)
    out = ["### No-stall sweep, qwen3-0.6b with graphs, 4 output tokens\n",
           f"Engine built in {fmt(sweep['startup']['build_s'], 1)} s, {graphs_text(sweep['startup'])}. Max step over "
           f"all workloads: {fmt(worst, 1)} ms; steps over {STALL_MS:.0f} ms: {stalls}.\n",
           common.markdown_table(["prompt", "B", "steps", "max step ms", "steps > 1 s", "total s", "error"],
                                 [[r["prompt_len"], r["batch"], r.get("steps", ""), fmt(r.get("max_ms"), 1),
                                   r.get("over_1s", ""), fmt(r.get("total_s")), short(r.get("error"))]
                                  for r in rows]), ""]
    if "mixed" in sweep:
        m = sweep["mixed"]
        out.append(f"Mixed: a {m['long_prompt']}-token prompt joins {m['decoders']} decoding requests (decode "
                   f"{fmt(m['decode_ms'])} ms/step before): {m['steps']} steps until its first token, max "
                   f"{fmt(m['max_ms'], 1)} ms, {m['over_1s']} over 1 s.\n")
    return out


def md_splits(run: Run, res: dict) -> list[str]:
    splits = res["splits"]
    return ["### Decode kernel: block table exact vs worst case (32768 tokens, padded with block 0), CUDA graph µs\n",
            *[splits[k] + "\n" for k in ("note",) if k in splits], common.markdown_table(
                ["B", "L", "exact µs", "worst case µs", "worst / exact", "max |diff|"],
                [[r["batch"], r["context"], fmt(r["exact_us"], 1), fmt(r["worst_us"], 1), fmt(r["ratio"]),
                  f"{r['max_abs_diff']:.1e}"] for r in splits["rows"]]), ""]


def render(run: Run) -> str:
    """The markdown of everything measured so far."""
    res, out = run.results, [common.section_header("Decode latency", run.env)]
    if run.args.quick:
        out.append("**--quick: tiny random models on the CPU in float32; not a measurement.**\n")
    if res["checkpoints"]:
        out += ["### Checkpoints (random weights)\n", common.markdown_table(
            ["shape", "params (M)", "GB", "tied", "shards", "write s"],
            [[n, fmt(c["params"] / 1e6, 1), fmt(c["bytes"] / 1e9), c["tied"], c["shards"], fmt(c["write_s"], 1)]
             for n, c in res["checkpoints"].items()]), ""]
    out += md_decode(run, res)
    for key, section in (("hf", md_hf), ("startup", md_startup), ("sweep", md_sweep), ("splits", md_splits)):
        if key in res:
            out += section(run, res)
    if res["errors"]:
        out.append("### Errors\n\n" + "\n".join(f"- {k}: {short(v, 300)}" for k, v in res["errors"].items()) + "\n")
    out.append("Section times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["section_s"].items()))
    return "\n".join(out)


def plot(results: dict):
    def draw(plt):
        decode = results.get("decode", {})
        fig, axes = plt.subplots(1, max(1, len(decode)), figsize=(5.5 * max(1, len(decode)), 4), squeeze=False)
        for ax, (name, modes) in zip(axes[0], decode.items()):
            for mode, entry in modes.items():
                rows = [r for r in entry["rows"] if "ms" in r]
                ax.plot([r["batch"] for r in rows], [r["ms"] for r in rows], marker="o", label=f"engine {mode}")
            rows = [r for entry in modes.values() for r in entry["rows"] if "roofline_ms" in r]
            rows = sorted({r["batch"]: r for r in rows}.values(), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["roofline_ms"] for r in rows], "k--", label="roofline")
            if "ms" in results.get("hf", {}).get(name, {}):
                ax.plot([1], [results["hf"][name]["ms"]], "r*", markersize=12, label="HF generate B1")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel("ms / decode step")
            ax.set_title(name)
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
    return draw


def main() -> None:
    args = parse_args()
    run = Run(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still writes the results and cleans up
    log(f"work dir {run.work_dir}, device {args.device}, sections {args.sections}, shapes {args.shapes}")
    if not run.cuda and not args.quick:
        log("no CUDA: the full-size models will run on the CPU (--quick is the CPU smoke run)")
    try:
        for name in args.sections:
            log(f"=== {name}")
            start = time.perf_counter()
            try:
                globals()[f"section_{name}"](run)
            except Exception as error:  # noqa: BLE001 - log and go on to the next section
                run.results["errors"][name] = f"{type(error).__name__}: {error}"[:500]
                log(f"section {name} failed:\n{traceback.format_exc()}")
            run.results["section_s"][name] = time.perf_counter() - start
            log(f"=== {name} done in {run.results['section_s'][name]:.1f} s")
            free_memory()
            run.save(with_plot=True)
    finally:
        shutil.rmtree(run.work_dir, ignore_errors=True)
        run.save(with_plot=True, echo=True)


if __name__ == "__main__":
    main()
