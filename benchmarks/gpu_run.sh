#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then every benchmark. Usage (on the device machine, repo root):
#   bash benchmarks/gpu_run.sh [STEP ...]       STEP in: tests prefill layouts decode merge cache gemm layer_chain
#                                              cascade moe
#                                              moe_tune (bench_moe.py --tune $MOE_TUNE_ARGS, e.g. "--shapes X":
#                                              the table it writes is installed in flashserve/kernels/moe_tuned/
#                                              for the later steps and copied to $OUT)
#                                              gemm_sweep (bench_gemm.py --sweep; the plan table it writes is
#                                              installed as flashserve/kernels/skinny_gemm_table.py for the later
#                                              steps and copied to $OUT with its markdown)
#                                              scores first_call sampler throughput latency
#                                              tp (tensor-parallel GPU tests and benchmarks/tp_latency.py; 2+ GPUs)
#                                              serving (needs the server wheels: see benchmarks/serving_gpu.sh)
#                                              structured (needs xgrammar and jsonschema wheels in .whl, without
#                                              their torch/transformers dependencies, which the image has:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     xgrammar==0.2.9 apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection typing-extensions \
#     jsonschema jsonschema-specifications referencing rpds-py attrs
# GPU_TESTS="tests/test_a.py tests/test_b.py" limits the tests step to those files. The tests step is verbose (each
# test's outcome as it ends: the names survive a step that runs out of time before pytest's summary).
# Per-step time limits: TIMEOUT_<step>=SECONDS (default STEP_TIMEOUT_S, else 300).
# Results go under $OUT (or ./out): one log, and results.tar.gz holding each benchmark's JSON, markdown and PNG.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
RESULTS=/tmp/flashserve-results
mkdir -p "$OUT" "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then  # carried wheels (server stack, xgrammar, jsonschema): installed once for every step
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
steps=${*:-tests prefill layouts decode merge cache}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  for step in $steps; do
    echo "=== $step $(date -u +%FT%TZ)"
    limit_var=TIMEOUT_${step}; limit=${!limit_var:-${STEP_TIMEOUT_S:-300}}
    case $step in
      tests) FLASHSERVE_AUTOTUNE=${FLASHSERVE_AUTOTUNE:-0} timeout "$limit" python3 -m pytest -v -m gpu \
               -n ${PYTEST_WORKERS:-12} --tb=short -rf --ignore=tests/test_tensor_parallel_gpu.py ${GPU_TESTS:-tests} ;;
      prefill) timeout "$limit" python3 benchmarks/bench_prefill.py --out "$RESULTS" ;;
      layouts) timeout "$limit" python3 benchmarks/bench_layouts.py --out "$RESULTS" ;;
      decode) timeout "$limit" python3 benchmarks/bench_decode.py --out "$RESULTS" ;;
      merge) timeout "$limit" python3 benchmarks/bench_merge.py --out "$RESULTS" ;;
      cache) timeout "$limit" python3 benchmarks/bench_cache_write.py --out "$RESULTS" ;;
      gemm) timeout "$limit" python3 benchmarks/bench_gemm.py --out "$RESULTS" ;;
      layer_chain) timeout "$limit" python3 benchmarks/bench_layer_chain.py --out "$RESULTS" ;;
      gemm_sweep) FLASHSERVE_AUTOTUNE=0 timeout "$limit" python3 benchmarks/bench_gemm.py --sweep \
                    --out "$RESULTS/gemm_sweep" ${GEMM_SWEEP_ARGS:-} \
                  && cp "$RESULTS/gemm_sweep/skinny_gemm_table.py" flashserve/kernels/skinny_gemm_table.py \
                  && cp "$RESULTS/gemm_sweep/skinny_gemm_table.py" "$RESULTS/gemm_sweep/bench_gemm_sweep.md" "$OUT/" ;;
      cascade) timeout "$limit" python3 benchmarks/bench_cascade.py --out "$RESULTS" ;;
      moe) timeout "$limit" python3 benchmarks/bench_moe.py --out "$RESULTS" ${MOE_ARGS:-} ;;
      moe_tune) timeout "$limit" python3 benchmarks/bench_moe.py --tune --skip-kernel --out "$RESULTS/moe_tune" \
                  ${MOE_TUNE_ARGS:-} \
                  && mkdir -p flashserve/kernels/moe_tuned "$OUT/moe_tuned" \
                  && cp "$RESULTS"/moe_tune/moe_tuned/*.json flashserve/kernels/moe_tuned/ \
                  && cp "$RESULTS"/moe_tune/moe_tuned/*.json "$OUT/moe_tuned/" ;;
      scores) timeout "$limit" python3 benchmarks/bench_attention_scores.py --out "$RESULTS" ;;
      first_call) timeout "$limit" python3 benchmarks/bench_first_call.py --out "$RESULTS" ;;
      sampler) timeout "$limit" python3 benchmarks/bench_sampler.py --out "$RESULTS" ;;
      throughput) timeout "$limit" python3 benchmarks/throughput.py --out "$RESULTS" ;;
      latency) timeout "$limit" python3 benchmarks/latency.py --out "$RESULTS" ${LATENCY_ARGS:-} ;;
      tp) FLASHSERVE_AUTOTUNE=${FLASHSERVE_AUTOTUNE:-0} timeout "$limit" python3 -m pytest -q -m gpu --tb=short -rf \
            tests/test_tensor_parallel_gpu.py
          timeout "$limit" python3 benchmarks/tp_latency.py --out "$RESULTS" ${TP_LATENCY_ARGS:-} ;;
      serving) timeout "$limit" bash benchmarks/serving_gpu.sh "$RESULTS/serving" ;;
      structured) timeout "$limit" python3 -m pytest -q -rs tests/test_structured_outputs_gpu.py
        timeout "$limit" python3 benchmarks/structured_outputs.py --out "$RESULTS" ;;
      *) echo "unknown step $step" ;;
    esac
  done
} 2>&1 | tee -a "$OUT/log.txt"
tar czf "$OUT/results.tar.gz" -C "$RESULTS" .
