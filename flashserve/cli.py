"""The ``flashserve`` command. ``flashserve generate [PROMPT...]`` prints completions and throughput;
``flashserve serve`` runs the OpenAI-compatible HTTP server.

Without ``--model`` it runs the built-in demo model: a small Llama-architecture checkpoint with RANDOM weights
(written on first use into ``$FLASHSERVE_CACHE_DIR``, default ``~/.cache/flashserve``), so its text is gibberish;
pass ``--model DIR`` (a local Hugging Face checkpoint directory) for real text.
"""
import argparse
import os
import sys
import time

DEFAULT_PROMPTS = ["Hello, my name is", "The capital of France is"]

# Engine options of ``flashserve serve`` passed to ``Config`` when given: (Config name, type, help).
SERVE_ENGINE_OPTIONS = [
    ("max_model_len", int, "context limit (default: the model's)"),
    ("max_num_seqs", int, "most requests running at once (default 256)"),
    ("max_num_batched_tokens", int, "token budget of one engine step (default 8192)"),
    ("block_size", int, "tokens per KV-cache block (default 16)"),
    ("num_kv_blocks", int, "KV pool size in blocks (default: sized from free memory)"),
    ("gpu_memory_utilization", float, "fraction of GPU memory the engine may use (default 0.9)"),
    ("max_cudagraph_capture_size", int, "largest decode batch captured in a CUDA graph "
                                        "(default min(2 * max_num_seqs, 512))"),
]
ENFORCE_EAGER_HELP = "capture no CUDA graphs: run every step eagerly"
TENSOR_PARALLEL_HELP = ("split the model over N GPUs (N - 1 worker processes are started; under torchrun, the "
                        "world size); on the CPU over N gloo processes (default 1)")



def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate completions for prompts and print throughput")
    generate.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (two examples when none)")
    generate.add_argument("--model", help="local checkpoint directory (default: the built-in random demo model)")
    generate.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    generate.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (default 0: all)")
    generate.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    generate.add_argument("--stop", action="append", default=None, metavar="STRING",
                          help="stop when the completion contains STRING (repeatable; cut from the text)")
    generate.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    generate.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    generate.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    generate.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    generate.add_argument("--enforce-eager", action="store_true", help=ENFORCE_EAGER_HELP)
    generate.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N", help=TENSOR_PARALLEL_HELP)
    generate.add_argument("--max-cudagraph-capture-size", type=int, default=None,
                          help="largest decode batch captured in a CUDA graph (default min(2 * max_num_seqs, 512))")
    serve = commands.add_parser("serve", help="serve an OpenAI-compatible API (completions, chat completions)")
    serve.add_argument("model_dir", nargs="?", metavar="MODEL", help="local checkpoint directory (as --model)")
    serve.add_argument("--model", help="local checkpoint directory (default: the built-in random demo model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients use (default: the "
                       "model directory's basename)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    for name, kind, help_text in SERVE_ENGINE_OPTIONS:
        serve.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    serve.add_argument("--enforce-eager", action="store_true", help=ENFORCE_EAGER_HELP)
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N", help=TENSOR_PARALLEL_HELP)
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV cache of shared prompt prefixes (default on)")
    serve.add_argument("--seed", type=int, default=0, help="seed of requests without their own (default 0)")
    serve.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                       help="launch each step before reading the previous one's tokens (default on)")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a Jinja chat template file replacing the tokenizer's")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                       "(default: $FLASHSERVE_API_KEY, else no key)")
    serve.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                       help="comma-separated origins allowed by CORS, or '*' (default: CORS off)")
    serve.add_argument("--max-prompt-bytes", type=int, default=4 << 20,
                       help="the largest request body accepted, 413 above it (default 4 MiB)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="the most requests waiting for the engine, 503 above it (default unbounded)")
    serve.add_argument("--enable-log-requests", action="store_true", help="log every request at INFO")
    serve.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                       help="parse chat replies for tool calls (tool_choice 'auto') in this model family's format")
    serve.add_argument("--no-ui", dest="ui", action="store_false", help="do not serve the chat page at /")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help="uvicorn's log level (default info)")
    return parser


def _model_or_demo(model: str | None) -> str:
    """``model``, or the demo model's directory (with a warning that its weights are random) when None."""
    if model is not None:
        return model
    from flashserve.models.demo import demo_model_path

    model = demo_model_path()
    print(f"Using the built-in demo model at {model}: its weights are RANDOM, so its text is gibberish. "
          "Pass --model DIR (a local Hugging Face checkpoint) for real text.", file=sys.stderr)
    return model


def _generate(args: argparse.Namespace) -> int:
    from flashserve import LLM, SamplingParams

    model = _model_or_demo(args.model)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
        llm = LLM(model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                  enforce_eager=args.enforce_eager, max_cudagraph_capture_size=args.max_cudagraph_capture_size,
                  tensor_parallel_size=args.tensor_parallel_size)
        prompts = args.prompts or DEFAULT_PROMPTS
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    except ValueError as error:
        print(f"flashserve generate: error: {error}", file=sys.stderr)
        return 2
    if not llm.engine.is_driver:  # another rank under torchrun: rank 0 prints
        llm.close()
        return 0
    for output in outputs:
        completion = output.outputs[0]
        print(f"Prompt: {output.prompt!r}")
        print(f"Completion: {completion.text!r} ({len(completion.token_ids)} tokens, {completion.finish_reason})")
        print()
    stats = llm.stats
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{len(outputs)} prompts, {prompt_tokens} prompt tokens, {generated} generated tokens in {elapsed:.2f} s "
          f"on {llm.engine.runner.device}")
    print(f"prefill {stats.prefill_tokens_per_s:.1f} tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s")
    llm.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flashserve.server.launch import serve
    from flashserve.server.options import ServerOptions

    if args.model_dir is not None and args.model is not None and args.model_dir != args.model:
        print(f"flashserve serve: error: two models given: {args.model_dir!r} and --model {args.model!r}",
              file=sys.stderr)
        return 2
    options = {name: getattr(args, name) for name, _, _ in SERVE_ENGINE_OPTIONS if getattr(args, name) is not None}
    server = ServerOptions(host=args.host, port=args.port, served_model_name=args.served_model_name,
                           api_key=args.api_key or os.environ.get("FLASHSERVE_API_KEY") or None,
                           allowed_origins=args.allowed_origins, chat_template=args.chat_template,
                           uvicorn_log_level=args.uvicorn_log_level, max_prompt_bytes=args.max_prompt_bytes,
                           max_waiting_requests=args.max_waiting_requests, log_requests=args.enable_log_requests,
                           tool_call_parser=args.tool_call_parser, ui=args.ui)
    try:
        server.check()  # a bad port or template fails before the model loads
        model = _model_or_demo(args.model_dir or args.model)
        serve(model, server, dtype=args.dtype, device=args.device, enforce_eager=args.enforce_eager,
              enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
              tensor_parallel_size=args.tensor_parallel_size, async_scheduling=args.async_scheduling, **options)
    except ValueError as error:
        print(f"flashserve serve: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flashserve`` command; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        return _serve(args)
    return 2
