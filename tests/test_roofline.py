"""The roofline arithmetic of benchmarks/throughput.py (benchmarks/roofline.py) on a schedule small enough to count
by hand."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import pytest  # noqa: E402
import roofline  # noqa: E402


def test_roofline_counts_weights_and_running_kv_per_step():
    figures = dict(weight_bytes=1000, layer_params=50, kv_bytes_per_token=10, attention_flops_per_pair=2)
    # request A: 10 prompt tokens, 3 output tokens (2 decode steps); B: 20 prompt tokens, 1 output (prefill only)
    result = roofline.roofline_seconds([10, 20], [3, 1], figures, copy_tbs=1e-9, matmul_tflops=1e-9,
                                       max_num_batched_tokens=16)
    # step 1: weights + A's 11 tokens; step 2: weights + A's 12 tokens (B finished with its prefill)
    assert result["decode_bytes"] == (1000 + 110) + (1000 + 120)
    assert result["decode_s"] == pytest.approx(result["decode_bytes"] / 1e3)
    flops = 2 * 50 * 30 + 2 * (10 * 11 // 2 + 20 * 21 // 2)
    assert result["prefill_flops"] == flops
    assert result["prefill_s"] == pytest.approx(max(flops / 1e3, 2 * 1000 / 1e3))  # two chunks of at most 16 tokens
    assert result["seconds"] == pytest.approx(result["prefill_s"] + result["decode_s"])
