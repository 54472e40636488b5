"""Host time per decode step at 256 running requests: scheduler, block manager, input preparation, sampler call,
incremental detokenizer and outputs — the engine's real step path with only the model's forward pass stubbed.

A tiny random-weight Llama (``write_random_checkpoint``, 2,000-token byte-level BPE tokenizer) runs on the CPU with
``model.forward`` returning zeros and ``compute_logits`` returning fresh random logits (greedy sampling, so the
sampler's device work is one argmax): what remains is the host's work of a step. 256 requests with prompts
uniform in [100, 1024] tokens (random ids) are prefilled, then ``--steps`` decode steps are timed one by one.
Phases are timed by wrapping the engine's own methods that run once per step (``Scheduler.schedule``,
``InputBuffers.prepare``, ``Sampler.sample``, and ``DecodeSampling._run``: what a sampling graph replays on a GPU,
which greedy decode steps take here); "other" is the rest of ``LLMEngine.step`` (advancing the requests, stop
checks, detokenizing, building the outputs). The detokenizer runs once per request: a timer around each call
would add its own cost (~0.3 µs a call) to the step, so "detokenize" (``IncrementalDetokenizer.step``) is timed
in ``--steps`` further steps, apart, and is part of "other" in the others (until 2026-12-02 it was timed in the
same steps, its timers' cost in "host total"). The sampler's argmax over the logits is device work that runs on the
CPU here, so "sampler, host part" times the same call on 8-column logits, and "host total" is a step without the
sampler's time plus that (on steps that called the eager ``Sampler``; the host part of ``DecodeSampling`` is in
"other"); "host before the launch" is the time from the start of ``step`` to the forward
pass. Both engines run, with ``async_scheduling`` off (every step: schedule, launch, read, host work) and on
(schedule and launch step N+1, then read step N and do its host work): the host work is the same, but on a GPU
the synchronous step costs host + device time and the async one about max(host, device). Medians and minima over
the timed steps, µs (on a shared machine the minima are the steadier figure).
Usage: python benchmarks/host_step.py [--out DIR] [--requests 256] [--steps 100]
"""
import functools
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import argument_parser  # noqa: E402
from flashserve import LLM, SamplingParams  # noqa: E402
from flashserve.engine import decode_sampling, detokenizer, input_buffers, sampler, scheduler  # noqa: E402
from flashserve.models.checkpoint import write_random_checkpoint  # noqa: E402

PHASES = {"schedule": (scheduler.Scheduler, "schedule"), "prepare_inputs": (input_buffers.InputBuffers, "prepare"),
          "sampler": (sampler.Sampler, "sample"), "sampling graph": (decode_sampling.DecodeSampling, "_run")}
PER_REQUEST_PHASES = {"detokenize": (detokenizer.IncrementalDetokenizer, "step")}  # timed in steps of their own


def _timed(spent: dict, name: str, method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
    return wrapper


def _timed_steps(engine, steps: int, phases: dict, launches: list, num_requests: int):
    """Run ``steps`` decode steps of ``num_requests`` requests with ``phases``' methods timed; yields (start,
    seconds per phase, seconds of the step) per step, ``launches`` holding the step's forward-pass times."""
    spent = {name: 0.0 for name in phases}
    originals = {name: getattr(cls, attr) for name, (cls, attr) in phases.items()}
    for name, (cls, attr) in phases.items():
        setattr(cls, attr, _timed(spent, name, originals[name]))
    try:
        for _ in range(steps):
            for name in spent:
                spent[name] = 0.0
            launches.clear()
            start = time.perf_counter()
            outputs = engine.step()
            total = time.perf_counter() - start
            assert len(outputs) == num_requests and len(launches) == 1
            yield start, spent, total
    finally:
        for name, (cls, attr) in phases.items():
            setattr(cls, attr, originals[name])


def measure(directory: str, args, async_scheduling: bool) -> dict[str, list[float]]:
    """Per-phase µs of ``args.steps`` decode steps of an engine with ``async_scheduling`` on or off."""
    blocks = args.requests * (1024 + 2 * args.steps + 64) // 16 + 64
    llm = LLM(directory, dtype="float32", device="cpu", block_size=16, num_kv_blocks=blocks,
              max_num_seqs=args.requests, max_model_len=4096, async_scheduling=async_scheduling)
    engine = llm.engine
    vocab = engine.vocab_size
    model = engine.runner.model
    generator = torch.Generator().manual_seed(0)
    pool = [torch.randn(max(args.requests, 8192), vocab, generator=generator) for _ in range(4)]
    launches = []

    def forward(input_ids, positions):
        launches.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], 1)

    model.forward = forward
    model.compute_logits = lambda hidden: pool[rng.randrange(4)][:hidden.shape[0]]
    rng = random.Random(0)
    for i in range(args.requests):
        prompt = [rng.randrange(6, vocab) for _ in range(rng.randint(100, 1024))]
        params = SamplingParams(temperature=0, max_tokens=2 * args.steps + 64, ignore_eos=True)
        engine.add_request(str(i), prompt, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    detokenize = "detokenize (in other)"
    per_step = {name: [] for name in [*PHASES, detokenize, "other", "total", "host total", "host before the launch"]}
    eager_sampling = []  # per step: whether the eager Sampler ran (its host part is added back below)
    for start, spent, total in _timed_steps(engine, args.steps, PHASES, launches, args.requests):
        for name in PHASES:
            per_step[name].append(spent[name] * 1e6)
        per_step["other"].append((total - sum(spent.values())) * 1e6)
        per_step["total"].append(total * 1e6)
        per_step["host total"].append((total - spent["sampler"] - spent["sampling graph"]) * 1e6)
        per_step["host before the launch"].append((launches[0] - start) * 1e6)
        eager_sampling.append(spent["sampler"] > 0)
    for _, spent, _ in _timed_steps(engine, args.steps, PER_REQUEST_PHASES, launches, args.requests):
        per_step[detokenize].append(spent["detokenize"] * 1e6)
    running = engine.scheduler.running
    narrow = torch.zeros(len(running), 8)
    sampler_host = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.runner.sampler(narrow, running, engine.eos_token_ids)
        sampler_host.append((time.perf_counter() - start) * 1e6)
    per_step["sampler, host part"] = sampler_host
    host_part = statistics.median(sampler_host)  # DecodeSampling's host part is in "other" already
    per_step["host total"] = [value + host_part * eager for value, eager in zip(per_step["host total"],
                                                                                eager_sampling)]
    return per_step


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = tempfile.mkdtemp(prefix="flashserve-host-step-")
    write_random_checkpoint(directory, "LlamaForCausalLM", tokenizer_vocab_size=2000, max_position_embeddings=4096)
    runs = {mode: measure(directory, args, mode) for mode in (False, True)}
    lines = [f"host µs per decode step, {args.requests} running requests, {args.steps} steps "
             f"({os.cpu_count()} CPUs, torch {torch.__version__})", "",
             "| phase | sync median µs | sync min µs | async median µs | async min µs |", "|---|---|---|---|---|"]
    for name in runs[False]:
        cells = [f"{statistics.median(run[name]):.0f} | {min(run[name]):.0f}" for run in runs.values()]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    host = {mode: statistics.median(run["host total"]) for mode, run in runs.items()}
    lines += ["", f"Expected decode step on a GPU whose step takes G µs: synchronous ≈ {host[False]:.0f} + G; "
              f"async scheduling ≈ max({host[True]:.0f}, G) (the host work of step N runs while the device computes "
              "step N+1)."]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_step.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
