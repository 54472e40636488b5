"""Measured launch plans of the small-M matrix product on one GPU model, for the plans' defaults when tuning is off.

``benchmarks/bench_gemm.py --sweep`` writes a file like this one (``skinny_gemm_table.py`` in its --out folder:
copy it over this file) after timing cuBLAS and every swept config at each projection shape of the supported
models and each row bucket, in bf16. ``PLANS`` maps (n_out, K, row bucket, gated) to the fastest: ``None`` for
cuBLAS (ours was not faster by the sweep's margin), else the ``GemmConfig`` fields (block_n, block_k, split_k,
num_warps, num_stages, use_dot, programs_per_sm). ``skinny_gemm_plans.default_config`` uses an entry for 2-byte
dtypes on a GPU named ``GPU``; shapes not listed, other GPUs and fp32 follow its rules. Empty until a sweep has
run.
"""
GPU = 'NVIDIA H200'
MEASURED = '2026-12-02, torch 2.11.0+cu130, triton 3.6.0, margin 0.02'
PLANS: dict[tuple[int, int, int, bool], tuple | None] = {
    # Llama-3.1-8B qkv, M 1: best ours 16.1 µs, cuBLAS 17.2 µs
    (6144, 4096, 1, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B qkv, M 8: best ours 16.4 µs, cuBLAS 16.4 µs
    (6144, 4096, 8, False): None,
    # Llama-3.1-8B o, M 1: best ours 11.6 µs, cuBLAS 13.9 µs
    (4096, 4096, 1, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B o, M 8: best ours 11.7 µs, cuBLAS 13.7 µs
    (4096, 4096, 8, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B gate_up, M 1: best ours 60.2 µs, cuBLAS 64.9 µs
    (14336, 4096, 1, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B gate_up, M 8: best ours 60.6 µs, cuBLAS 62.1 µs
    (14336, 4096, 8, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B down, M 1: best ours 33.1 µs, cuBLAS 33.5 µs
    (4096, 14336, 1, False): None,
    # Llama-3.1-8B down, M 8: best ours 33.3 µs, cuBLAS 33.8 µs
    (4096, 14336, 8, False): None,
    # Llama-3.1-8B lm_head, M 1: best ours 237.2 µs, cuBLAS 244.5 µs
    (128256, 4096, 1, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B lm_head, M 8: best ours 241.0 µs, cuBLAS 247.4 µs
    (128256, 4096, 8, False): (64, 128, 1, 4, 4, True, 0, False),
}
