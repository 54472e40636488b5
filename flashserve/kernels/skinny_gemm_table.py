"""Measured launch plans of the small-M matrix product on one GPU model, for the plans' defaults when tuning is off.

``benchmarks/bench_gemm.py --sweep`` writes a file like this one (``skinny_gemm_table.py`` in its --out folder:
copy it over this file) after timing cuBLAS and every swept config at each projection shape of the supported
models and each row bucket, in bf16. ``PLANS`` maps (n_out, K, row bucket, gated) to the fastest: ``None`` for
cuBLAS (ours was not faster by the sweep's margin), else the ``GemmConfig`` fields (block_n, block_k, split_k,
num_warps, num_stages, use_dot, programs_per_sm, pdl, resident). ``skinny_gemm_plans.default_config`` uses an
entry for 2-byte dtypes on a GPU named ``GPU``; shapes not listed, other GPUs and fp32 follow its rules. Empty
until a sweep has run.
"""
GPU = 'NVIDIA H200'
MEASURED = ('2026-12-02, torch 2.11.0+cu130, triton 3.6.0, margin 0.02; M 1-8 re-swept with PDL (session 8); '
            'resident configs at Qwen3-0.6B M 1-2 and Llama-3.1-8B M 1 timed 2026-12-03 (session 11, a scratch '
            'sweep of 4-6 per shape)')
PLANS: dict[tuple[int, int, int, bool], tuple | None] = {
    # Qwen3-0.6B qkv, M 1: best ours 3.8 µs, cuBLAS 5.3 µs; resident fma n16w4 3.6 µs (session 11, below)
    (4096, 1024, 1, False): (16, 0, 1, 4, 1, False, 0, False, True),
    # Qwen3-0.6B qkv, M 2: best ours 3.8 µs, cuBLAS 5.3 µs
    (4096, 1024, 2, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B qkv, M 4: best ours 3.8 µs, cuBLAS 5.3 µs
    (4096, 1024, 4, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B qkv, M 8: best ours 3.9 µs, cuBLAS 5.3 µs
    (4096, 1024, 8, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B qkv, M 16: best ours 5.2 µs, cuBLAS 5.4 µs
    (4096, 1024, 16, False): (32, 256, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B qkv, M 32: best ours 5.6 µs, cuBLAS 5.4 µs
    (4096, 1024, 32, False): None,
    # Qwen3-0.6B qkv, M 64: best ours 6.2 µs, cuBLAS 5.5 µs
    (4096, 1024, 64, False): None,
    # Qwen3-0.6B o, M 1: best ours 3.7 µs, cuBLAS 12.9 µs; resident fma n8w4 2.4 µs (session 11)
    (1024, 2048, 1, False): (8, 0, 1, 4, 1, False, 0, False, True),
    # Qwen3-0.6B o, M 2: best ours 3.7 µs, cuBLAS 13.0 µs; resident fma n8w4 2.3 µs (session 11)
    (1024, 2048, 2, False): (8, 0, 1, 4, 1, False, 0, False, True),
    # Qwen3-0.6B o, M 4: best ours 3.7 µs, cuBLAS 8.3 µs
    (1024, 2048, 4, False): (32, 256, 4, 4, 4, True, 0, False),
    # Qwen3-0.6B o, M 8: best ours 3.7 µs, cuBLAS 5.8 µs
    (1024, 2048, 8, False): (32, 256, 4, 4, 4, True, 0, False),
    # Qwen3-0.6B o, M 16: best ours 5.3 µs, cuBLAS 5.9 µs
    (1024, 2048, 16, False): (32, 256, 4, 4, 4, True, 0, False),
    # Qwen3-0.6B o, M 32: best ours 6.0 µs, cuBLAS 5.9 µs
    (1024, 2048, 32, False): None,
    # Qwen3-0.6B o, M 64: best ours 6.9 µs, cuBLAS 5.9 µs
    (1024, 2048, 64, False): None,
    # Qwen3-0.6B gate_up, M 1: best ours 6.1 µs, cuBLAS 7.6 µs; resident fma n16w8 4.6 µs (session 11)
    (3072, 1024, 1, True): (16, 0, 1, 8, 1, False, 0, False, True),
    # Qwen3-0.6B gate_up, M 2: best ours 6.1 µs, cuBLAS 7.6 µs; resident fma n8w4 5.6 µs (session 11)
    (3072, 1024, 2, True): (8, 0, 1, 4, 1, False, 0, False, True),
    # Qwen3-0.6B gate_up, M 4: best ours 6.2 µs, cuBLAS 7.6 µs
    (3072, 1024, 4, True): (32, 256, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B gate_up, M 8: best ours 6.2 µs, cuBLAS 7.7 µs
    (3072, 1024, 8, True): (32, 256, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B gate_up, M 16: best ours 6.9 µs, cuBLAS 7.8 µs
    (3072, 1024, 16, True): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B gate_up, M 32: best ours 7.4 µs, cuBLAS 8.0 µs
    (3072, 1024, 32, True): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B gate_up, M 64: best ours 9.2 µs, cuBLAS 8.2 µs
    (3072, 1024, 64, True): None,
    # Qwen3-0.6B down, M 1: best ours 4.3 µs, cuBLAS 7.4 µs; resident fma n8w8 3.2 µs (session 11)
    (1024, 3072, 1, False): (8, 0, 1, 8, 1, False, 0, False, True),
    # Qwen3-0.6B down, M 2: best ours 4.3 µs, cuBLAS 7.5 µs; resident fma n8w8 3.4 µs (session 11)
    (1024, 3072, 2, False): (8, 0, 1, 8, 1, False, 0, False, True),
    # Qwen3-0.6B down, M 4: best ours 4.3 µs, cuBLAS 7.5 µs
    (1024, 3072, 4, False): (32, 256, 4, 4, 4, True, 0, False),
    # Qwen3-0.6B down, M 8: best ours 4.3 µs, cuBLAS 7.5 µs
    (1024, 3072, 8, False): (32, 256, 4, 4, 4, True, 0, False),
    # Qwen3-0.6B down, M 16: best ours 6.0 µs, cuBLAS 7.8 µs
    (1024, 3072, 16, False): (64, 128, 8, 4, 4, True, 0, False),
    # Qwen3-0.6B down, M 32: best ours 6.9 µs, cuBLAS 7.8 µs
    (1024, 3072, 32, False): (32, 256, 4, 4, 4, True, 0, False),
    # Qwen3-0.6B down, M 64: best ours 8.0 µs, cuBLAS 8.0 µs
    (1024, 3072, 64, False): None,
    # Qwen3-0.6B lm_head, M 1: best ours 77.1 µs, cuBLAS 82.6 µs
    (151936, 1024, 1, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B lm_head, M 2: best ours 77.7 µs, cuBLAS 83.0 µs
    (151936, 1024, 2, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B lm_head, M 4: best ours 78.5 µs, cuBLAS 83.7 µs
    (151936, 1024, 4, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B lm_head, M 8: best ours 79.7 µs, cuBLAS 84.6 µs
    (151936, 1024, 8, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B lm_head, M 16: best ours 80.7 µs, cuBLAS 83.5 µs
    (151936, 1024, 16, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B lm_head, M 32: best ours 82.6 µs, cuBLAS 85.3 µs
    (151936, 1024, 32, False): (64, 128, 1, 4, 4, True, 0, False),
    # Qwen3-0.6B lm_head, M 64: best ours 87.4 µs, cuBLAS 88.8 µs
    (151936, 1024, 64, False): None,
    # Llama-3.1-8B qkv, M 1: best ours 15.8 µs, cuBLAS 17.1 µs; resident fma n4w4 14.0 µs (session 11)
    (6144, 4096, 1, False): (4, 0, 1, 4, 1, False, 0, False, True),
    # Llama-3.1-8B qkv, M 2: best ours 15.8 µs, cuBLAS 17.0 µs
    (6144, 4096, 2, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B qkv, M 4: best ours 15.8 µs, cuBLAS 16.4 µs
    (6144, 4096, 4, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B qkv, M 8: best ours 16.0 µs, cuBLAS 16.5 µs
    (6144, 4096, 8, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B qkv, M 16: best ours 16.6 µs, cuBLAS 16.5 µs
    (6144, 4096, 16, False): None,
    # Llama-3.1-8B qkv, M 32: best ours 16.9 µs, cuBLAS 16.9 µs
    (6144, 4096, 32, False): None,
    # Llama-3.1-8B qkv, M 64: best ours 17.8 µs, cuBLAS 17.0 µs
    (6144, 4096, 64, False): None,
    # Llama-3.1-8B o, M 1: best ours 11.5 µs, cuBLAS 14.0 µs; resident fma n4w4 10.3 µs (session 11)
    (4096, 4096, 1, False): (4, 0, 1, 4, 1, False, 0, False, True),
    # Llama-3.1-8B o, M 2: best ours 11.5 µs, cuBLAS 13.9 µs
    (4096, 4096, 2, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B o, M 4: best ours 11.5 µs, cuBLAS 13.9 µs
    (4096, 4096, 4, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B o, M 8: best ours 11.6 µs, cuBLAS 13.9 µs
    (4096, 4096, 8, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B o, M 16: best ours 12.2 µs, cuBLAS 14.1 µs
    (4096, 4096, 16, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B o, M 32: best ours 14.0 µs, cuBLAS 14.4 µs
    (4096, 4096, 32, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B o, M 64: best ours 15.2 µs, cuBLAS 12.6 µs
    (4096, 4096, 64, False): None,
    # Llama-3.1-8B gate_up, M 1: best ours 60.6 µs, cuBLAS 65.3 µs; resident fma n4w4 57.5 µs (session 11)
    (14336, 4096, 1, True): (4, 0, 1, 4, 1, False, 0, False, True),
    # Llama-3.1-8B gate_up, M 2: best ours 60.6 µs, cuBLAS 65.9 µs
    (14336, 4096, 2, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B gate_up, M 4: best ours 60.7 µs, cuBLAS 65.6 µs
    (14336, 4096, 4, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B gate_up, M 8: best ours 61.1 µs, cuBLAS 66.0 µs
    (14336, 4096, 8, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B gate_up, M 16: best ours 61.0 µs, cuBLAS 66.8 µs
    (14336, 4096, 16, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B gate_up, M 32: best ours 62.0 µs, cuBLAS 67.5 µs
    (14336, 4096, 32, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B gate_up, M 64: best ours 65.0 µs, cuBLAS 69.7 µs
    (14336, 4096, 64, True): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B down, M 1: best ours 33.0 µs, cuBLAS 34.5 µs; kept on cuBLAS: inside the B1 decode graph ours made
    # the step 4.43 -> 5.29 ms (H200, session 8), a loss the chain of one shape does not show
    (4096, 14336, 1, False): None,
    # Llama-3.1-8B down, M 2: best ours 33.0 µs, cuBLAS 34.3 µs
    (4096, 14336, 2, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B down, M 4: best ours 33.1 µs, cuBLAS 34.4 µs
    (4096, 14336, 4, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B down, M 8: best ours 33.2 µs, cuBLAS 34.8 µs
    (4096, 14336, 8, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B down, M 16: best ours 33.5 µs, cuBLAS 34.5 µs
    (4096, 14336, 16, False): (32, 256, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B down, M 32: best ours 38.1 µs, cuBLAS 35.5 µs
    (4096, 14336, 32, False): None,
    # Llama-3.1-8B down, M 64: best ours 43.5 µs, cuBLAS 37.5 µs
    (4096, 14336, 64, False): None,
    # Llama-3.1-8B lm_head, M 1: best ours 241.4 µs, cuBLAS 252.3 µs
    (128256, 4096, 1, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B lm_head, M 2: best ours 242.2 µs, cuBLAS 251.8 µs
    (128256, 4096, 2, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B lm_head, M 4: best ours 243.4 µs, cuBLAS 252.7 µs
    (128256, 4096, 4, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B lm_head, M 8: best ours 245.1 µs, cuBLAS 254.6 µs
    (128256, 4096, 8, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B lm_head, M 16: best ours 247.1 µs, cuBLAS 251.8 µs
    (128256, 4096, 16, False): None,
    # Llama-3.1-8B lm_head, M 32: best ours 251.9 µs, cuBLAS 260.9 µs
    (128256, 4096, 32, False): (64, 128, 1, 4, 4, True, 0, False),
    # Llama-3.1-8B lm_head, M 64: best ours 263.0 µs, cuBLAS 275.2 µs
    (128256, 4096, 64, False): (64, 64, 1, 4, 4, True, 0, False),
}
