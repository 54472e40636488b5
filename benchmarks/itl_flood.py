"""Inter-token latency of running streams while a flood of long prompts arrives (the server issue's stall bar).

Against a running ``flashserve serve`` (or any OpenAI-compatible server): ``--streams`` greedy streams of
``--output-len`` tokens run three times, and their inter-token gaps are measured:

- ``unloaded``: nothing else arrives;
- ``tokenize-flood``: ``--flood`` requests at a time, each a ``--flood-bytes`` text prompt far longer than the
  model's context, keep arriving until the streams end: every one is tokenized (seconds of work each) and then
  refused with a 400, so only the tokenization can slow the streams;
- ``prefill-flood``: ``--flood`` requests at a time of ``--prefill-words`` random words asking for one token:
  they are admitted, and their chunked prefill shares the steps with the streams.

Prints median and P99 ITL of each phase and the ratio to ``unloaded`` (the bar: tokenize-flood within 2×), and
writes JSON. Usage: ``python benchmarks/itl_flood.py --base-url http://127.0.0.1:8000 --out DIR``.
"""
import asyncio
import random
import time

import httpx
import numpy as np

from common import argument_parser, environment, write_results
from serving import RequestResult, _one_request


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="served model name (default: the first of GET /v1/models)")
    parser.add_argument("--streams", type=int, default=8, help="running greedy streams (default 8)")
    parser.add_argument("--output-len", type=int, default=256, help="tokens per stream (default 256)")
    parser.add_argument("--flood", type=int, default=4, help="flood requests in flight at a time (default 4)")
    parser.add_argument("--flood-bytes", type=int, default=1_000_000, help="tokenize-flood prompt size (1 MB)")
    parser.add_argument("--prefill-words", type=int, default=800, help="prefill-flood prompt words (800)")
    return parser.parse_args(argv)


async def _phase(http: httpx.AsyncClient, args, model: str, flood_body) -> dict:
    """Run the streams, with ``flood_body()`` requests kept in flight meanwhile (None: no flood)."""
    results = [RequestResult(args.output_len) for _ in range(args.streams)]
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": args.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    streams = [asyncio.ensure_future(_one_request(http, "/v1/completions", body, result)) for result in results]
    statuses: list[int] = []
    refusals: list[str] = []

    async def flood_worker():
        while not all(stream.done() for stream in streams):
            response = await http.post("/v1/completions", json=flood_body())
            statuses.append(response.status_code)
            if response.status_code != 200 and not refusals:
                refusals.append(response.json()["error"]["message"][:200])

    workers = [asyncio.ensure_future(flood_worker()) for _ in range(args.flood if flood_body else 0)]
    await asyncio.gather(*streams)
    await asyncio.gather(*workers)
    gaps_ms = np.asarray([gap for result in results for gap in result.itl_s] or [0.0]) * 1e3
    errors = [result.error for result in results if result.error]
    return {"itl_median_ms": float(np.median(gaps_ms)), "itl_p99_ms": float(np.percentile(gaps_ms, 99)),
            "num_gaps": int(gaps_ms.size), "flood_requests": len(statuses),
            "flood_statuses": sorted(set(statuses)), "flood_refusal": refusals[0] if refusals else None,
            "stream_errors": errors}


async def run(args) -> dict:
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=600) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        words = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
        huge = " ".join(rng.choice(words) for _ in range(args.flood_bytes // 6))

        def tokenize_flood():
            return {"model": model, "prompt": huge, "max_tokens": 4}

        def prefill_flood():
            prompt = " ".join(rng.choice(words) for _ in range(args.prefill_words))
            return {"model": model, "prompt": prompt, "max_tokens": 1}

        phases = {}
        for name, flood_body in (("unloaded", None), ("tokenize-flood", tokenize_flood),
                                 ("prefill-flood", prefill_flood)):
            start = time.perf_counter()
            phases[name] = await _phase(http, args, model, flood_body)
            phases[name]["duration_s"] = time.perf_counter() - start
        base = phases["unloaded"]["itl_median_ms"]
        for phase in phases.values():
            phase["median_ratio_to_unloaded"] = phase["itl_median_ms"] / base if base else None
        return {"model": model, "streams": args.streams, "output_len": args.output_len, "flood": args.flood,
                "phases": phases}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    lines = ["| phase | ITL median ms | ITL P99 ms | × unloaded (median) | flood requests (statuses) |",
             "|---|---|---|---|---|"]
    for name, phase in result["phases"].items():
        lines.append(f"| {name} | {phase['itl_median_ms']:.2f} | {phase['itl_p99_ms']:.2f} | "
                     f"{phase['median_ratio_to_unloaded']:.2f} | {phase['flood_requests']} "
                     f"{phase['flood_statuses']} |")
    write_results(args.out, "itl_flood", "\n".join(lines), {"environment": environment(), **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
