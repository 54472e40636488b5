"""The roofline time of an offline generation run: the least time the GPU needs for the bytes and FLOPs the run
cannot avoid, to print beside the measured time (``throughput.py``).

Schedule assumed (the engine's, idealised): every request is admitted at once (the workloads here have at most
``max_num_seqs`` requests), its prompt is prefilled in chunks of ``max_num_batched_tokens`` tokens (each chunk
compute-bound: ``2 × layer parameters`` FLOPs per token plus causal attention, at the dense matmul rate), its first
token comes from the prefill, and then every decode step reads the weights once and the KV cache of every request
still running once (``in_r + t`` tokens for request r at step t), at the copy bandwidth. Sampling, norms and
launch gaps are not counted: a real engine can only be slower.
"""
import torch


def model_figures(model: torch.nn.Module, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  element_bytes: int) -> dict:
    """What the roofline needs of a dense flashserve decoder: its weight bytes (each parameter once), the
    parameters of its layers (what a prompt token multiplies: 2 FLOPs each; embedding and LM head left out, the LM
    head runs for one token per prompt), KV bytes per token over all layers, and attention FLOPs per (query, key)
    pair (q·k and p·v over every layer and head)."""
    return dict(weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                layer_params=sum(p.numel() for p in model.model.layers.parameters()),
                kv_bytes_per_token=num_layers * 2 * num_kv_heads * head_dim * element_bytes,
                attention_flops_per_pair=4 * num_layers * num_heads * head_dim)


def roofline_seconds(input_lens: list[int], output_lens: list[int], figures: dict, copy_tbs: float,
                     matmul_tflops: float, max_num_batched_tokens: int) -> dict:
    """Seconds of the idealised schedule (module docstring) and its parts: prefill_s, decode_s, decode_bytes."""
    total_input = sum(input_lens)
    prefill_flops = 2 * figures["layer_params"] * total_input + sum(
        figures["attention_flops_per_pair"] * n * (n + 1) // 2 for n in input_lens)
    chunks = -(-total_input // max_num_batched_tokens)
    prefill_s = max(prefill_flops / (matmul_tflops * 1e12), chunks * figures["weight_bytes"] / (copy_tbs * 1e12))
    decode_bytes = 0
    steps = max(output_lens) - 1
    order = sorted(zip(output_lens, input_lens))
    running_inputs, running = sum(input_lens), len(order)
    first = 0
    for step in range(1, steps + 1):
        while first < len(order) and order[first][0] <= step:  # finished after its step-th token
            running_inputs -= order[first][1]
            running -= 1
            first += 1
        decode_bytes += figures["weight_bytes"] + (running_inputs + running * step) * figures["kv_bytes_per_token"]
    decode_s = decode_bytes / (copy_tbs * 1e12)
    return dict(seconds=prefill_s + decode_s, prefill_s=prefill_s, decode_s=decode_s, decode_bytes=decode_bytes,
                prefill_flops=prefill_flops, copy_tbs=copy_tbs, matmul_tflops=matmul_tflops)


def measure_rates(device: torch.device) -> tuple[float, float]:
    """(copy TB/s, dense bf16 matmul TFLOP/s) measured now on a CUDA device (1 GiB copy, 8192³ product)."""
    import triton.testing

    def median_ms(fn) -> float:
        return triton.testing.do_bench(fn, warmup=50, rep=200)

    src = torch.randn(2 ** 29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_s = median_ms(lambda: dst.copy_(src)) * 1e-3
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_s = median_ms(lambda: a @ b) * 1e-3
    return 2 * src.numel() * 2 / copy_s / 1e12, 2 * 8192 ** 3 / matmul_s / 1e12
