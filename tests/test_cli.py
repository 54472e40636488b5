"""The ``flashserve generate`` command on a tiny checkpoint."""
import pytest

from flashserve.cli import main
from flashserve.models.checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("cli-llama")), "LlamaForCausalLM", seed=5)


def test_generate_prints_completions_and_summary(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    status = main(["generate", "Hello", "The sky", "--model", model_dir, "--max-tokens", "4", "--temperature", "0",
                   "--ignore-eos", "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    assert out.count("Completion:") == 2 and "(4 tokens, length)" in out
    assert "8 generated tokens" in out and "prefill" in out and "decode" in out


def test_generate_reports_invalid_options(model_dir, capsys):
    status = main(["generate", "Hi", "--model", model_dir, "--top-p", "0", "--device", "cpu"])
    assert status == 2 and "top_p" in capsys.readouterr().err
