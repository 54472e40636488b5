"""benchmarks/serving.py against a real server (``test_server``'s: uvicorn from a thread, a tiny random checkpoint,
the PyTorch reference attention): both endpoints, the random, JSONL and ShareGPT datasets, a finite request rate
and a concurrency limit; the totals, metrics, vLLM's printed block, and failed or short requests being reported."""
import json
import os
import sys

import pytest
from transformers import AutoTokenizer

from flashserve.models.checkpoint import write_random_checkpoint
from test_server import ENGINE_OPTIONS, MODEL_NAME, _running_server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import serving  # noqa: E402

NUM_PROMPTS, PROMPT_LEN, OUTPUT_LEN = 4, 16, 8
VLLM_LABELS = ["Successful requests:", "Failed requests:", "Maximum request concurrency:",
               "Request rate configured (RPS):", "Benchmark duration (s):", "Total input tokens:",
               "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
               "Total token throughput (tok/s):", "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):",
               "Mean TPOT (ms):", "Median TPOT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):", "Median ITL (ms):",
               "P99 ITL (ms):", "Mean E2EL (ms):", "Median E2EL (ms):", "P99 E2EL (ms):"]
VLLM_SEPARATORS = ["============ Serving Benchmark Result ============",
                   "---------------Time to First Token----------------",
                   "-----Time per Output Token (excl. 1st token)------",
                   "---------------Inter-token Latency----------------",
                   "----------------End-to-end Latency----------------", "=" * 50]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("bench-llama")), "LlamaForCausalLM", seed=5)


@pytest.fixture(scope="module")
def base_url(model_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
        with _running_server(model_dir, ENGINE_OPTIONS) as (url, _):
            yield url


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _sharegpt(path, tokenizer) -> tuple[str, set[int]]:
    """A ShareGPT file (one conversation too long for max_model_len, one without a gpt turn) and the output lengths
    (tokens) of its usable conversations."""
    answers = ["the sky is blue today", "water is wet and cold", "one two three four five six"]
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": f"question {i} about the world"},
                                             {"from": "gpt", "value": answer}, {"from": "human", "value": "more"}]}
            for i, answer in enumerate(answers)]
    rows.append({"conversations": [{"from": "human", "value": "long"}, {"from": "gpt", "value": "word " * 300}]})
    rows.append({"conversations": [{"from": "human", "value": "no answer"}]})
    path.write_text(json.dumps(rows))
    return str(path), {len(tokenizer.encode(answer, add_special_tokens=False)) for answer in answers}


def _run(base_url, tmp_path, capsys, *extra) -> tuple[int, dict, str]:
    """serving.main with the common flags; returns (exit status, serving.json, what it printed)."""
    out = tmp_path / "out"
    argv = ["--base-url", base_url, "--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(PROMPT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--max-concurrency", "2", "--request-rate", "50",
            "--out", str(out), *extra]
    status = serving.main(argv)
    with open(out / "serving.json") as f:
        payload = json.load(f)
    assert (out / "serving.md").read_text().count("Serving Benchmark Result") == 1
    return status, payload, capsys.readouterr().out


@pytest.mark.parametrize("endpoint, dataset", [("completions", "random"), ("chat", "random"),
                                               ("completions", "jsonl"), ("chat", "sharegpt")])
def test_benchmark_reports_vllm_metrics(base_url, model_dir, tmp_path, capsys, endpoint, dataset):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    expected_output = NUM_PROMPTS * OUTPUT_LEN
    extra = ["--endpoint", endpoint]
    if dataset == "random" and endpoint == "completions":
        extra += ["--tokenizer", model_dir]  # token ids below the tiny vocabulary's size
    elif dataset == "jsonl":
        rows = [{"prompt": "Hello, my name is"}, {"prompt": tokenizer.encode("The sky")}, {"prompt": "a b c d"}]
        extra += ["--dataset", _write_jsonl(tmp_path / "prompts.jsonl", rows)]
    elif dataset == "sharegpt":
        path, lengths = _sharegpt(tmp_path / "sharegpt.json", tokenizer)
        extra += ["--dataset", path, "--tokenizer", model_dir]
    status, payload, printed = _run(base_url, tmp_path, capsys, *extra)
    if dataset == "sharegpt":
        asked = [r["output_len"] for r in payload["requests"]]
        assert set(asked) == lengths and len(lengths) > 1  # every usable conversation, reused in turn
        expected_output = sum(asked)

    summary = payload["summary"]
    assert status == 0 and payload["model"] == MODEL_NAME and payload["problems"] == []
    assert summary["completed"] == NUM_PROMPTS and summary["failed"] == summary["mismatched"] == 0
    assert summary["total_output_tokens"] == expected_output
    assert all(r["output_tokens"] == r["output_len"] and r["error"] is None for r in payload["requests"])
    if endpoint == "completions" and dataset == "random":
        assert summary["total_input_tokens"] == NUM_PROMPTS * PROMPT_LEN
    assert summary["total_input_tokens"] >= NUM_PROMPTS
    for key in ("duration_s", "request_throughput", "output_throughput", "total_token_throughput"):
        assert summary[key] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < summary[key]["median"] <= summary[key]["p99"] and summary[key]["mean"] > 0
    assert all(len(r["itl_s"]) == r["output_tokens"] - 1 for r in payload["requests"])  # one chunk per token

    lines = printed.splitlines()
    block = lines[lines.index(VLLM_SEPARATORS[0]):]
    assert block[-1] == "=" * 50 and "\n".join(block) == payload["block"]
    assert [line for line in block if line.startswith(("=", "-"))] == VLLM_SEPARATORS
    assert [line[:40].rstrip() for line in block[1:-1] if not line.startswith("-")] == VLLM_LABELS
    assert f"{'Successful requests:':<40} {NUM_PROMPTS:<10}" in block
    assert f"{'Total generated tokens:':<40} {expected_output:<10}" in block
    assert f"{'Request rate configured (RPS):':<40} {50.0:<10.2f}" in block
    assert all(len(line) == 51 for line in block[1:-1] if not line.startswith("-"))


def test_failed_requests_are_counted_and_listed(base_url, tmp_path, capsys):
    rows = [{"prompt": "Hi"}, {"prompt": "too long", "output_len": 500}]
    status, payload, printed = _run(base_url, tmp_path, capsys, "--dataset",
                                    _write_jsonl(tmp_path / "prompts.jsonl", rows))
    summary = payload["summary"]
    assert status == 1 and summary["completed"] == 2 and summary["failed"] == 2
    assert summary["total_output_tokens"] == 2 * OUTPUT_LEN
    assert "Failed requests (2):" in printed and printed.count("maximum context length") == 2
    assert f"{'Failed requests:':<40} {2:<10}" in printed.splitlines()
    assert [r["error"] is not None for r in payload["requests"]] == [False, True, False, True]


def test_short_outputs_are_reported():
    results = [serving.RequestResult(8, 4, 8, 0.1, 0.8, [0.1] * 7), serving.RequestResult(8, 4, 5, 0.1, 0.5)]
    summary = serving.summarize(results, 1.0)
    assert summary["completed"] == 2 and summary["mismatched"] == 1 and summary["total_output_tokens"] == 13
    assert summary["tpot_ms"]["median"] == pytest.approx(100.0)
    assert serving.problems(results)[1:] == ["  request 1: asked for 8 tokens, got 5"]
