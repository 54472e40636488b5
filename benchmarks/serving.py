"""Serving benchmark: streamed completions sent to a running flashserve (or any OpenAI-compatible) server.

Sends ``--num-requests`` requests to ``POST /v1/completions`` with ``stream: true`` at ``--request-rate`` requests
per second (Poisson arrivals: exponential gaps; ``inf``, the default, sends them all at once). Each prompt is
``--input-len`` random token ids drawn uniformly from [``--min-token-id``, ``--max-token-id``) and asks for exactly
``--output-len`` tokens (``ignore_eos``, greedy). Measured per request, on the client:

- TTFT: time from sending the request to the first chunk that carries text;
- TPOT: (latency - TTFT) / (output tokens - 1), the mean time per output token after the first;
- ITL: the gaps between successive text chunks (one chunk per engine step, so one per token);

reported as mean / median / p99 in ms, with request throughput (req/s) and output tok/s over the whole run (output
tokens counted from each stream's ``usage``). Writes serving.md and serving.json to ``--out`` with the GPU and CPU
names of this machine (run it on the server's machine for them to describe the server), the date and the command.

Smoke test on a CPU (the built-in demo model, random weights):
    flashserve serve --device cpu &
    python benchmarks/serving.py --num-requests 8 --input-len 32 --output-len 16 --out /tmp/serving
    kill %1
On a GPU server (``flashserve serve --model DIR``): ``python benchmarks/serving.py --num-requests 256
--request-rate 8 --input-len 512 --output-len 256 --out DIR``.
"""
import asyncio
import json
import math
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from common import argument_parser, environment, markdown_table, write_results


@dataclass(slots=True)
class RequestResult:
    """One request's client-side timings (seconds) and its output length; ``error`` is set when it failed."""

    latency_s: float = 0.0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def _parse_args():
    parser = argument_parser(__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: flashserve's)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--num-requests", type=int, default=64, help="requests to send (default 64)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--min-token-id", type=int, default=100, help="smallest random prompt token id")
    parser.add_argument("--max-token-id", type=int, default=2000,
                        help="random prompt token ids stay below this (default 2000: within the demo model's "
                             "vocabulary)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s (default 600)")
    args = parser.parse_args()
    for name in ("num_requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.min_token_id < args.max_token_id:
        parser.error("need 0 <= --min-token-id < --max-token-id")
    if not args.request_rate > 0:
        parser.error("--request-rate must be > 0 (inf: all at once)")
    return args


async def _one_request(http: httpx.AsyncClient, body: dict) -> RequestResult:
    """Send one streamed completion and time its chunks."""
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                if not chunk.get("choices") or not chunk["choices"][0]["text"]:
                    continue
                now = time.perf_counter()
                if result.ttft_s == 0.0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    result.latency_s = time.perf_counter() - start
    return result


async def _run(args, model: str) -> tuple[list[RequestResult], float]:
    """Send every request on its arrival schedule; returns the results and the wall time of the run."""
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.min_token_id, args.max_token_id) for _ in range(args.input_len)]
               for _ in range(args.num_requests)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits) as http:
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            tasks.append(asyncio.ensure_future(_one_request(http, body)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _cpu_name() -> str:
    """The CPU model of this machine (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stats_ms(values_s: list[float]) -> dict:
    """mean, median and p99 of ``values_s`` in milliseconds (NaN when empty)."""
    if not values_s:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    ordered = sorted(values_s)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean": statistics.fmean(ordered) * 1e3, "median": statistics.median(ordered) * 1e3, "p99": p99 * 1e3}


def _summary(results: list[RequestResult], wall_s: float) -> dict:
    """Throughput and latency statistics over the successful requests."""
    done = [r for r in results if r.error is None]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {"completed": len(done), "failed": len(results) - len(done), "wall_s": wall_s,
            "request_throughput": len(done) / wall_s, "output_tok_per_s": output_tokens / wall_s,
            "output_tokens": output_tokens, "ttft_ms": _stats_ms([r.ttft_s for r in done]),
            "tpot_ms": _stats_ms(tpot), "itl_ms": _stats_ms([gap for r in done for gap in r.itl_s])}


def _markdown(env: dict, args, model: str, summary: dict) -> str:
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    header = (f"## Serving ({env['gpu']}, CPU {env['cpu']}, {env['date'][:10]})\n\n`{env['command']}`\n\n"
              f"Model `{model}` at {args.base_url}: {args.num_requests} requests at rate {rate}/s, "
              f"{args.input_len} input and {args.output_len} output tokens each; {summary['completed']} completed, "
              f"{summary['failed']} failed in {summary['wall_s']:.2f} s: {summary['request_throughput']:.2f} req/s, "
              f"{summary['output_tok_per_s']:.1f} output tok/s.\n\n")
    rows = [[name, f"{summary[key]['mean']:.2f}", f"{summary[key]['median']:.2f}", f"{summary[key]['p99']:.2f}"]
            for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"))]
    return header + markdown_table(["metric (ms)", "mean", "median", "p99"], rows)


def main() -> None:
    args = _parse_args()
    model = args.model
    if model is None:
        model = httpx.get(f"{args.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    results, wall_s = asyncio.run(_run(args, model))
    summary = _summary(results, wall_s)
    errors = sorted({r.error for r in results if r.error is not None})
    env = dict(environment(), cpu=_cpu_name())
    run_args = dict(vars(args), request_rate=str(args.request_rate))
    payload = {"environment": env, "model": model, "args": run_args, "summary": summary, "errors": errors[:10],
               "requests": [asdict(r) for r in results]}
    write_results(args.out, "serving", _markdown(env, args, model, summary), payload)
    for error in errors[:5]:
        print(f"error: {error}")


if __name__ == "__main__":
    main()
