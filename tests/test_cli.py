"""The ``flashserve generate`` command on a tiny checkpoint."""
import ast

import pytest

from flashserve.cli import main
from flashserve.models.checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("cli-llama")), "LlamaForCausalLM", seed=5)


def test_generate_prints_completions_and_summary(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    status = main(["generate", "Hello", "The sky", "--model", model_dir, "--max-tokens", "4", "--temperature", "0",
                   "--ignore-eos", "--dtype", "float32", "--device", "cpu", "--enforce-eager",
                   "--max-cudagraph-capture-size", "8"])
    out = capsys.readouterr().out
    assert status == 0
    assert out.count("Completion:") == 2 and "(4 tokens, length)" in out
    assert "8 generated tokens" in out and "prefill" in out and "decode" in out


def test_generate_reports_invalid_options(model_dir, capsys, tmp_path):
    status = main(["generate", "Hi", "--model", model_dir, "--top-p", "0", "--device", "cpu"])
    assert status == 2 and "top_p" in capsys.readouterr().err
    status = main(["generate", "Hi", "--model", str(tmp_path), "--device", "cpu"])
    assert status == 2 and "config.json" in capsys.readouterr().err
    status = main(["generate", "Hi", "--model", model_dir, "--max-cudagraph-capture-size", "0", "--device", "cpu"])
    assert status == 2 and "max_cudagraph_capture_size" in capsys.readouterr().err


def test_generate_stop_strings_and_unicode_prompts(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    args = ["generate", "héllo 日本 🙂", "--model", model_dir, "--max-tokens", "6", "--temperature", "0",
            "--ignore-eos", "--dtype", "float32", "--device", "cpu"]
    assert main(args) == 0
    completion = capsys.readouterr().out.split("Completion: ")[1].split(" (")[0]
    stop = ast.literal_eval(completion)[1:3]  # a two-character stop string inside the greedy completion
    assert main(args + ["--stop", stop, "--stop", "never-generated"]) == 0
    out = capsys.readouterr().out
    assert "'héllo 日本 🙂'" in out and ", stop)" in out
