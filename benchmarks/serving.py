"""Serving benchmark: streamed requests sent to a running flashserve (or any OpenAI-compatible) server.

Sends ``--num-prompts`` requests to ``POST /v1/completions`` (``--endpoint completions``: ``prompt``) or
``/v1/chat/completions`` (``--endpoint chat``: one user message) at ``--request-rate`` requests per second (Poisson
arrivals; ``inf``, the default, sends them all at once), at most ``--max-concurrency`` in flight. Every request
streams (``stream_options.include_usage``), is greedy and asks for exactly its output length (``max_tokens``,
``ignore_eos``); the usage chunk's ``completion_tokens`` must equal it, and the requests where it does not are
counted and listed, as are the failed ones with their errors (the exit status is then 1).

Datasets (``--dataset``):
- ``random`` (default): ``--random-input-len`` random token ids in [``--min-token-id``, ``--max-token-id``) for
  completions, that many random English words for chat (cut to that many tokens with ``--tokenizer``); each asks
  for ``--random-output-len`` tokens;
- a JSONL file, one ``{"prompt": text or token ids, "output_len": N (optional, else --random-output-len)}`` a line;
- a ShareGPT JSON file, a list of ``{"conversations": [{"from": "human" | "gpt", "value": text}, ...]}``: the first
  human turn is the prompt, the first gpt turn's length the output length (shuffled with ``--seed``; conversations
  that do not fit the server's ``max_model_len`` are skipped).
Rows are reused in turn when the file holds fewer than ``--num-prompts``. Lengths of text are counted in tokens
with ``--tokenizer DIR`` (a local Hugging Face tokenizer), else in words.

Metrics, as vLLM's ``vllm bench serve`` defines them, measured on the client per successful request:
- TTFT: from sending the request to the first streamed chunk that carries a choice;
- TPOT: (E2E latency - TTFT) / (output tokens - 1), the time per output token after the first;
- ITL: the gaps between successive streamed chunks (one chunk per engine step, so one per token);
- E2EL: from sending the request to the end of its stream;
with mean / median / P99 in ms, request and token throughput over the whole run (tokens from each stream's usage),
printed as vLLM's "Serving Benchmark Result" block. Writes serving.md and serving.json (per-request timings too) to
``--out`` with the GPU and CPU names of this machine (run it on the server's machine for them to describe the
server), the date and the command.

Smoke test on a CPU (the built-in demo model, random weights):
    flashserve serve --device cpu &
    python benchmarks/serving.py --num-prompts 8 --random-input-len 32 --random-output-len 16 --out /tmp/serving
    kill %1
On a GPU server (``flashserve serve --model DIR``), the issue's workloads:
    python benchmarks/serving.py --tokenizer DIR --num-prompts 64 --random-input-len 4096 \\
        --random-output-len 1024 --max-concurrency 16 --out OUT
    python benchmarks/serving.py --tokenizer DIR --num-prompts 64 --random-input-len 8192 \\
        --random-output-len 64 --max-concurrency 16 --out OUT
    python benchmarks/serving.py --endpoint chat --dataset ShareGPT_V3_unfiltered_cleaned_split.json \\
        --tokenizer DIR --num-prompts 256 --request-rate 8 --out OUT
"""
import asyncio
import contextlib
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from common import argument_parser, environment, write_results

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who its now find long down day did get "
         "come made may part").split()
SECTIONS = (("ttft_ms", "TTFT", "Time to First Token"), ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
            ("itl_ms", "ITL", "Inter-token Latency"), ("e2el_ms", "E2EL", "End-to-end Latency"))


@dataclass(slots=True)
class Sample:
    """One request to send: a text prompt (or token ids, completions only) and the output length it asks for."""

    prompt: str | list[int]
    output_len: int


@dataclass(slots=True)
class RequestResult:
    """One request's outcome: the output length asked for, the usage's token counts, client-side timings (s);
    ``error`` is set when it failed."""

    output_len: int
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


def parse_args(argv: list[str] | None = None):
    parser = argument_parser(__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: flashserve's)")
    parser.add_argument("--model", default=None, help="served model name (default: the first of GET /v1/models)")
    parser.add_argument("--endpoint", choices=sorted(PATHS), default="completions",
                        help="/v1/completions (default) or /v1/chat/completions")
    parser.add_argument("--dataset", default="random", help="'random' (default), or a JSONL or ShareGPT JSON file")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory, for exact token counts")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    parser.add_argument("--random-input-len", type=int, default=1024, help="random prompt tokens (default 1024)")
    parser.add_argument("--random-output-len", type=int, default=128, help="output tokens asked (default 128)")
    parser.add_argument("--min-token-id", type=int, default=100, help="smallest random prompt token id (100)")
    parser.add_argument("--max-token-id", type=int, default=None,
                        help="random prompt token ids stay below this (default: the tokenizer's vocabulary size, "
                             "2000 without --tokenizer: within the demo model's vocabulary)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s (default 600)")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "random_input_len", "random_output_len", "max_concurrency"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.request_rate > 0:
        parser.error("--request-rate must be > 0 (inf: all at once)")
    return args


def _count(text: str, tokenizer) -> int:
    """Tokens of ``text`` with ``tokenizer``, or its words without one."""
    return len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else len(text.split())


def _random_samples(args, tokenizer, rng: random.Random) -> list[Sample]:
    n, length = args.num_prompts, args.random_input_len
    if args.endpoint == "completions":
        high = args.max_token_id or (tokenizer.vocab_size if tokenizer else 2000)
        if not 0 <= args.min_token_id < high:
            raise SystemExit(f"need 0 <= --min-token-id < --max-token-id ({high})")
        return [Sample([rng.randrange(args.min_token_id, high) for _ in range(length)], args.random_output_len)
                for _ in range(n)]
    samples = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        if tokenizer:
            text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:length])
        samples.append(Sample(text, args.random_output_len))
    return samples


def _sharegpt_samples(rows: list, tokenizer, rng: random.Random, max_model_len: int | None) -> list[Sample]:
    """(first human turn, length of the first gpt turn) of each conversation that fits ``max_model_len``."""
    rows = list(rows)
    rng.shuffle(rows)
    samples = []
    for row in rows:
        turns = row.get("conversations") or []
        human = next((t["value"] for t in turns if t.get("from") == "human" and t.get("value")), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt" and t.get("value")), None)
        if human is None or gpt is None:
            continue
        output_len = max(1, _count(gpt, tokenizer))
        if max_model_len is None or _count(human, tokenizer) + output_len <= max_model_len:
            samples.append(Sample(human, output_len))
    return samples


def load_samples(args, tokenizer, max_model_len: int | None) -> list[Sample]:
    """The ``--num-prompts`` requests of ``--dataset``."""
    rng = random.Random(args.seed)
    if args.dataset == "random":
        return _random_samples(args, tokenizer, rng)
    with open(args.dataset) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        pool = _sharegpt_samples(json.loads(text), tokenizer, rng, max_model_len)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        pool = [Sample(row["prompt"], int(row.get("output_len", args.random_output_len))) for row in rows]
    if not pool:
        raise SystemExit(f"{args.dataset}: no usable prompt")
    if args.endpoint == "chat" and not all(isinstance(sample.prompt, str) for sample in pool):
        raise SystemExit(f"{args.dataset}: chat prompts must be text, not token ids")
    return [pool[i % len(pool)] for i in range(args.num_prompts)]


def _body(endpoint: str, model: str, sample: Sample) -> dict:
    body = {"model": model, "max_tokens": sample.output_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        return dict(body, messages=[{"role": "user", "content": sample.prompt}])
    return dict(body, prompt=sample.prompt)


async def _one_request(http: httpx.AsyncClient, path: str, body: dict, result: RequestResult) -> None:
    """Send one streamed request and time its chunks into ``result``."""
    start = last = time.perf_counter()
    usage, first = None, True
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                return
            async for line in response.aiter_lines():
                payload = line[len("data:"):].strip() if line.startswith("data:") else None
                if payload is None or payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message')}"
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if first:
                        result.ttft_s, first = now - start, False
                    else:
                        result.itl_s.append(now - last)
                    last = now
                usage = chunk.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        result.latency_s = time.perf_counter() - start
    if result.error is None and usage is None:
        result.error = "the stream ended without a usage chunk"
    elif usage is not None:
        result.prompt_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]


async def _run(args, model: str, samples: list[Sample]) -> tuple[list[RequestResult], float]:
    """Send every sample on its arrival schedule; returns the results and the wall time of the run."""
    rng = random.Random(args.seed)
    results = [RequestResult(sample.output_len) for sample in samples]
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)

    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits) as http:
        async def send(sample: Sample, result: RequestResult) -> None:
            async with limit:
                await _one_request(http, PATHS[args.endpoint], _body(args.endpoint, model, sample), result)

        tasks = []
        start = time.perf_counter()
        arrival = 0.0
        for sample, result in zip(samples, results):
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(sample, result)))
            if math.isfinite(args.request_rate):
                arrival += rng.expovariate(args.request_rate)
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _stats_ms(values_s: list[float]) -> dict:
    """mean, median and P99 (linear interpolation, as numpy's and vLLM's) in ms; 0 when empty, as vLLM."""
    values = np.asarray(values_s or [0.0]) * 1e3
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p99": float(np.percentile(values, 99))}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """Counts, throughput and latency statistics over the successful requests."""
    done = [r for r in results if r.error is None]
    total_input, total_output = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {"completed": len(done), "failed": len(results) - len(done),
            "mismatched": sum(r.output_tokens != r.output_len for r in done), "duration_s": duration_s,
            "total_input_tokens": total_input, "total_output_tokens": total_output,
            "request_throughput": len(done) / duration_s, "output_throughput": total_output / duration_s,
            "total_token_throughput": (total_input + total_output) / duration_s,
            "ttft_ms": _stats_ms([r.ttft_s for r in done]), "tpot_ms": _stats_ms(tpot),
            "itl_ms": _stats_ms([gap for r in done for gap in r.itl_s]),
            "e2el_ms": _stats_ms([r.latency_s for r in done])}


def _line(label: str, value) -> str:
    return f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}"


def format_block(summary: dict, max_concurrency: int | None, request_rate: float) -> str:
    """vLLM's "Serving Benchmark Result" block: the same labels, order, widths and separator lines."""
    rows = [("Successful requests:", summary["completed"]), ("Failed requests:", summary["failed"])]
    if max_concurrency is not None:
        rows.append(("Maximum request concurrency:", max_concurrency))
    if math.isfinite(request_rate):
        rows.append(("Request rate configured (RPS):", float(request_rate)))
    rows += [("Benchmark duration (s):", summary["duration_s"]),
             ("Total input tokens:", summary["total_input_tokens"]),
             ("Total generated tokens:", summary["total_output_tokens"]),
             ("Request throughput (req/s):", summary["request_throughput"]),
             ("Output token throughput (tok/s):", summary["output_throughput"]),
             ("Total token throughput (tok/s):", summary["total_token_throughput"])]
    lines = [f"{' Serving Benchmark Result ':=^50}"] + [_line(label, value) for label, value in rows]
    for key, name, header in SECTIONS:
        stats = summary[key]
        lines += [f"{header:-^50}", _line(f"Mean {name} (ms):", stats["mean"]),
                  _line(f"Median {name} (ms):", stats["median"]), _line(f"P99 {name} (ms):", stats["p99"])]
    return "\n".join(lines + ["=" * 50])


def problems(results: list[RequestResult]) -> list[str]:
    """One line per failed request (with its error) and per request whose output length is not the one asked."""
    failed = [f"  request {i}: {r.error}" for i, r in enumerate(results) if r.error is not None]
    short = [f"  request {i}: asked for {r.output_len} tokens, got {r.output_tokens}"
             for i, r in enumerate(results) if r.error is None and r.output_tokens != r.output_len]
    lines = [f"Failed requests ({len(failed)}):", *failed] if failed else []
    return lines + ([f"Requests with another output length than asked ({len(short)}):", *short] if short else [])


async def _model_card(base_url: str, model: str | None) -> dict:
    """The card of ``model`` (default: the first) from GET /v1/models; just the name if the server lists none."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        response = await http.get("/v1/models")
    cards = response.json().get("data", []) if response.status_code == 200 else []
    if model is None and not cards:
        raise SystemExit(f"GET {base_url}/v1/models lists no model ({response.status_code}): pass --model")
    return next((card for card in cards if model in (None, card.get("id"))), {"id": model})


async def benchmark(args) -> dict:
    """Run the benchmark of ``args`` (from ``parse_args``), print vLLM's result block; returns the results."""
    card = await _model_card(args.base_url, args.model)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    samples = load_samples(args, tokenizer, card.get("max_model_len"))
    print(f"Traffic request rate: {args.request_rate}\nMaximum request concurrency: {args.max_concurrency}")
    results, duration_s = await _run(args, card["id"], samples)
    summary = summarize(results, duration_s)
    block, listed = format_block(summary, args.max_concurrency, args.request_rate), problems(results)
    print("\n".join(listed + [block]))
    return {"model": card["id"], "summary": summary, "block": block, "problems": listed,
            "requests": [asdict(r) for r in results]}


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


def main(argv: list[str] | None = None) -> int:
    """The command line: run, write serving.md and serving.json to ``--out``; 1 when a request failed or was short."""
    args = parse_args(argv)
    result = asyncio.run(benchmark(args))
    env = dict(environment(), cpu=_cpu_name())
    summary = result["summary"]
    text = (f"## Serving ({env['gpu']}, CPU {env['cpu']}, {env['date'][:10]})\n\n`{env['command']}`\n\n"
            f"Model `{result['model']}` at {args.base_url}, {PATHS[args.endpoint]}, dataset {args.dataset}, "
            f"{args.num_prompts} prompts.\n\n```\n" + "\n".join(result["problems"] + [result["block"]]) + "\n```")
    run_args = dict(vars(args), request_rate=str(args.request_rate))
    write_results(args.out, "serving", text, dict(result, environment=env, args=run_args), echo=False)
    if summary["failed"] or summary["mismatched"]:
        print(f"{summary['failed']} failed requests, {summary['mismatched']} with another output length than asked",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
