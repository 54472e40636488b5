#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then every benchmark. Usage (on the device machine, repo root):
#   bash benchmarks/gpu_run.sh [STEP ...]       STEP in: tests prefill layouts decode merge cache sampler throughput
#                                              latency
#                                              serving (needs the server wheels: see benchmarks/serving_gpu.sh)
# Per-step time limits: TIMEOUT_<step>=SECONDS (default STEP_TIMEOUT_S, else 300).
# Results go under $OUT (or ./out): one log, and results.tar.gz holding each benchmark's JSON, markdown and PNG.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
RESULTS=/tmp/flashserve-results
mkdir -p "$OUT" "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-tests prefill layouts decode merge cache}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  for step in $steps; do
    echo "=== $step $(date -u +%FT%TZ)"
    limit_var=TIMEOUT_${step}; limit=${!limit_var:-${STEP_TIMEOUT_S:-300}}
    case $step in
      tests) FLASHSERVE_AUTOTUNE=${FLASHSERVE_AUTOTUNE:-0} timeout "$limit" python3 -m pytest -q -m gpu \
               -n ${PYTEST_WORKERS:-12} --tb=short -rf tests ;;
      prefill) timeout "$limit" python3 benchmarks/bench_prefill.py --out "$RESULTS" ;;
      layouts) timeout "$limit" python3 benchmarks/bench_layouts.py --out "$RESULTS" ;;
      decode) timeout "$limit" python3 benchmarks/bench_decode.py --out "$RESULTS" ;;
      merge) timeout "$limit" python3 benchmarks/bench_merge.py --out "$RESULTS" ;;
      cache) timeout "$limit" python3 benchmarks/bench_cache_write.py --out "$RESULTS" ;;
      sampler) timeout "$limit" python3 benchmarks/bench_sampler.py --out "$RESULTS" ;;
      throughput) timeout "$limit" python3 benchmarks/throughput.py --out "$RESULTS" ;;
      latency) timeout "$limit" python3 benchmarks/latency.py --out "$RESULTS" ${LATENCY_ARGS:-} ;;
      serving) timeout "$limit" bash benchmarks/serving_gpu.sh "$RESULTS/serving" ;;
      *) echo "unknown step $step" ;;
    esac
  done
} 2>&1 | tee -a "$OUT/log.txt"
tar czf "$OUT/results.tar.gz" -C "$RESULTS" .
