"""Structured-outputs overhead: the engine's decode step with every request under one shared JSON schema vs none.

For the structured-outputs issue's bar: at batch 64 with one schema shared by all requests, the constrained decode
step costs at most 10% more than the unconstrained one (GPU, CUDA graphs on).

Model: a random-weight Qwen3-0.6B-shaped bf16 checkpoint (``throughput.QWEN3_0_6B``) with a synthetic byte-level
BPE vocabulary as large as Qwen's (151,643 tokens: the trained tokenizer's merges plus random word-like, numeric,
punctuation and multi-byte tokens), because xgrammar's per-step work grows with the vocabulary; ``--model DIR``
takes a real checkpoint (and its tokenizer) instead. Workload: ``--batch`` prompts of ``--prompt-len`` random
tokens, sampled at temperature 0.8 without EOS; the constrained run gives each the same long schema (an array of
at least 400 records with a bounded string, an integer, an enum list and a boolean), so no request ends while it
is timed. Each run steps until every request has its first token, takes 5 untimed decode steps, then times
``--decode-steps`` ``engine.step()`` calls with ``perf_counter`` (the step ends with the host reading the sampled
tokens); ms/step is the median. Both runs share one engine, one after the other, in the same process.

Also reported: the host time of xgrammar's batch bitmask fill in the timed constrained steps (``TokenBitmask.apply``
runs it while the GPU computes the step's forward pass), and the device time of the mask application alone.

Usage (GPU): ``python benchmarks/structured_outputs.py --out DIR``; ``--quick``: a tiny model on the CPU in float32
to check the script. Writes structured_outputs.json and structured_outputs.md to --out.
"""
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

import common
from throughput import QUICK_MODEL, QWEN3_0_6B

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "count": {"type": "integer", "minimum": 0, "maximum": 9999},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "count", "tags", "ok"]}
SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "items": RECORD, "minItems": 400}},
          "required": ["records"]}
QWEN_VOCAB_TOKENS = 151643
LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
PUNCTUATION = ".,;:!?'\"()[]{}<>-_/\\*&%$#@=+`~|^"


def synthetic_tokenizer(directory: str, num_tokens: int, seed: int) -> None:
    """Replace ``directory``'s tokenizer.json by the trained one's vocabulary (and merges) padded to
    ``num_tokens`` byte-level tokens."""
    from tokenizers import Tokenizer, pre_tokenizers

    path = os.path.join(directory, "tokenizer.json")
    spec = json.loads(Tokenizer.from_file(path).to_str())
    vocab = spec["model"]["vocab"]
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    space = "\u0120"  # the byte-level symbol of " "
    rng = random.Random(seed)
    weights = [len(LETTERS) - i for i in range(len(LETTERS))]
    while len(vocab) < num_tokens:
        style = rng.random()
        word = "".join(rng.choices(LETTERS, weights, k=rng.randint(1, 10)))
        if style < 0.6:
            token = space + word
        elif style < 0.75:
            token = word
        elif style < 0.83:
            token = space + word.capitalize()
        elif style < 0.88:
            token = "".join(rng.choices("0123456789", k=rng.randint(1, 3)))
        elif style < 0.93:
            token = "".join(rng.choices(PUNCTUATION, k=rng.randint(1, 3)))
        else:
            token = "".join(rng.choices(byte_chars, k=rng.randint(2, 4)))
        vocab.setdefault(token, len(vocab))
    spec["model"]["vocab"] = vocab
    with open(path, "w") as file:
        file.write(json.dumps(spec, ensure_ascii=False))


def build_model(args, directory: str) -> str:
    from flashserve.models.checkpoint import write_random_checkpoint

    shape = dict(QUICK_MODEL if args.quick else QWEN3_0_6B)
    dtype = torch.float32 if args.quick else torch.bfloat16
    vocab_tokens = 4000 if args.quick else QWEN_VOCAB_TOKENS
    shape["vocab_size"] = max(shape["vocab_size"], vocab_tokens)
    write_random_checkpoint(directory, "Qwen3ForCausalLM", seed=args.seed, dtype=dtype, **shape)
    synthetic_tokenizer(directory, vocab_tokens, args.seed)
    return directory


def timed_steps(llm, prompts: list[list[int]], params, decode_steps: int) -> dict:
    """Add the requests, step to their first tokens, then time ``decode_steps`` decode steps (see the module
    docstring); the requests are aborted afterwards."""
    engine = llm.engine
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    started = set()
    while len(started) < len(ids):
        started |= {output.request_id for output in engine.step() if output.outputs[0].token_ids}
    for _ in range(5):
        engine.step()
    times_ms, batch_sizes = [], []
    for _ in range(decode_steps):
        start = time.perf_counter()
        outputs = engine.step()
        times_ms.append((time.perf_counter() - start) * 1e3)
        batch_sizes.append(len(outputs))
    finished = sum(1 for request_id in ids if request_id not in engine.requests)
    engine.abort_request(ids)
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "max_ms": max(times_ms),
            "min_batch": min(batch_sizes), "finished_while_timed": finished}


class FillTimer:
    """Wraps the runner's batch matcher: host µs of every bitmask fill of the timed constrained steps."""

    def __init__(self, bitmask):
        import xgrammar

        self.fills_us: list[float] = []
        self.bitmask = bitmask
        self.matcher = xgrammar.BatchGrammarMatcher()
        bitmask._batch_matcher = self

    def batch_fill_next_token_bitmask(self, matchers, host, indices=None):
        start = time.perf_counter()
        self.matcher.batch_fill_next_token_bitmask(matchers, host, indices)
        self.fills_us.append((time.perf_counter() - start) * 1e6)


def apply_device_us(llm, batch: int) -> float:
    """Device µs of masking (batch, vocab) logits with a random bitmask (NaN off CUDA)."""
    runner = llm.engine.runner
    if runner.device.type != "cuda":
        return float("nan")
    bitmask, vocab = runner.token_bitmask, llm.engine.vocab_size
    logits = torch.randn(batch, vocab, device=runner.device)
    words = torch.randint(-2**31, 2**31 - 1, (batch, bitmask.host.shape[1]), dtype=torch.int32, device=runner.device)

    def apply():
        allowed = ((words.unsqueeze(2) >> bitmask.shifts) & 1).view(batch, -1)[:, :vocab]
        return logits.masked_fill(allowed == 0, float("-inf"))

    return common.bench_us(apply)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the synthetic one)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU (script check)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.prompt_len, args.decode_steps = 4, 8, 5
    from flashserve import LLM, SamplingParams
    from flashserve.sampling_params import StructuredOutputsParams

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or build_model(args, scratch)
        llm = LLM(model, dtype="float32" if args.quick else "auto", device="cpu" if args.quick else None,
                  max_model_len=4096, max_num_seqs=max(args.batch, 8), seed=args.seed)
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(1000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
        max_tokens = args.decode_steps + 64
        plain = SamplingParams(temperature=0.8, ignore_eos=True, max_tokens=max_tokens)
        start = time.perf_counter()
        constrained = SamplingParams(temperature=0.8, ignore_eos=True, max_tokens=max_tokens,
                                     structured_outputs=StructuredOutputsParams(json=SCHEMA))
        llm.engine._grammars().submit(constrained.structured_outputs).result()
        compile_s = time.perf_counter() - start
        timed_steps(llm, prompts, plain, 3)  # warm-up of both paths
        timed_steps(llm, prompts, constrained, 3)
        results = {"unconstrained": timed_steps(llm, prompts, plain, args.decode_steps)}
        timer = FillTimer(llm.engine.runner.token_bitmask)
        results["constrained"] = timed_steps(llm, prompts, constrained, args.decode_steps)
        fills = timer.fills_us[-args.decode_steps:]
        results["mask"] = {"fill_host_us_median": statistics.median(fills), "fill_host_us_max": max(fills),
                           "apply_device_us": apply_device_us(llm, args.batch)}
    overhead = results["constrained"]["median_ms"] / results["unconstrained"]["median_ms"] - 1
    env = common.environment()
    summary = dict(env, batch=args.batch, vocab_size=llm.engine.vocab_size, grammar_compile_s=compile_s,
                   overhead=overhead, bar_met=overhead <= 0.10, **results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "structured_outputs.json"), "w") as file:
        json.dump(summary, file, indent=2)
    rows = [[name, f"{run['median_ms']:.3f}", f"{run['min_ms']:.3f}", f"{run['max_ms']:.3f}", run["min_batch"],
             run["finished_while_timed"]] for name, run in (("unconstrained", results["unconstrained"]),
                                                            ("one shared JSON schema", results["constrained"]))]
    text = (common.section_header(f"Structured outputs: decode step at batch {args.batch}", env)
            + common.markdown_table(["requests", "median ms/step", "min", "max", "min batch",
                                     "finished while timed"], rows)
            + f"\n\nOverhead: {overhead * 100:.1f}% (bar: <= 10%: {'met' if overhead <= 0.10 else 'NOT met'}); "
            f"vocabulary {llm.engine.vocab_size}; grammar compiled in {compile_s:.2f} s; bitmask fill per step "
            f"{results['mask']['fill_host_us_median']:.0f} µs host median, {results['mask']['fill_host_us_max']:.0f}"
            f" max (overlapping the forward pass); mask application {results['mask']['apply_device_us']:.1f} µs "
            "device.\n")
    with open(os.path.join(args.out, "structured_outputs.md"), "w") as file:
        file.write(text)
    print(text)


if __name__ == "__main__":
    main()
