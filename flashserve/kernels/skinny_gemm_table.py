"""Measured launch plans of the small-M matrix product on one GPU model, for the plans' defaults when tuning is off.

``benchmarks/bench_gemm.py --sweep`` writes a file like this one (``skinny_gemm_table.py`` in its --out folder:
copy it over this file) after timing cuBLAS and every swept config at each projection shape of the supported
models and each row bucket, in bf16. ``PLANS`` maps (n_out, K, row bucket, gated) to the fastest: ``None`` for
cuBLAS (ours was not faster by the sweep's margin), else the ``GemmConfig`` fields (block_n, block_k, split_k,
num_warps, num_stages, use_dot, programs_per_sm). ``skinny_gemm_plans.default_config`` uses an entry for 2-byte
dtypes on a GPU named ``GPU``; shapes not listed, other GPUs and fp32 follow its rules. Empty until a sweep has
run.
"""
GPU = "NVIDIA H200"
MEASURED = ""  # the sweep's GPU, date, torch and triton versions
PLANS: dict[tuple[int, int, int, bool], tuple | None] = {}
