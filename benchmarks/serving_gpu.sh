#!/usr/bin/env bash
# The server issue's serving runs on the GPU machine, in one call: a random-weight Qwen3-0.6B-shaped checkpoint,
# `flashserve serve` on it, then benchmarks/serving.py with 4K in : 1K out and 8K in : 64 out at concurrency 16,
# the inter-token latency under a flood of long prompts (benchmarks/itl_flood.py), the /metrics text, and the
# server's GPU test. Usage (repo root, on the device machine):
#   bash benchmarks/serving_gpu.sh OUT_DIR
# SMOKE=1 checks the script on a CPU: a tiny model, 4 prompts of 32 tokens asking for 8, no GPU test.
#
# The device image has no fastapi/uvicorn/pydantic: download their wheels, dependencies included, here first (into
# .whl, git-ignored) and name .whl in the run's `carry`:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastapi uvicorn
set -uo pipefail
out=${1:-out}
smoke=${SMOKE:-0}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import fastapi, uvicorn" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 -c "import fastapi, uvicorn" || { echo "the server stack does not import: see the header"; exit 1; }
model=$(mktemp -d)
python3 benchmarks/throughput.py --write-checkpoint "$model" $([ "$smoke" = 1 ] && echo --quick) || exit 1
if [ "$smoke" = 1 ]; then
  engine=(--device cpu --dtype float32 --max-model-len 128); workloads=("32 8"); prompts=4
else
  engine=(--max-model-len 10240); workloads=("4096 1024" "8192 64"); prompts=64
fi
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
python3 -m flashserve serve "$model" --port "$port" --served-model-name qwen3-0.6b-random "${engine[@]}" \
  --uvicorn-log-level warning 2> "$out/server.log" &
server=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  kill -0 "$server" 2> /dev/null || { echo "the server exited:"; tail -20 "$out/server.log"; exit 1; }
  sleep 1
done
for workload in "${workloads[@]}"; do
  set -- $workload
  python3 benchmarks/serving.py --base-url "http://127.0.0.1:$port" --tokenizer "$model" --num-prompts "$prompts" \
    --random-input-len "$1" --random-output-len "$2" --max-concurrency 16 --out "$out/serving-$1-$2"
done
if [ "$smoke" = 1 ]; then
  flood=(--streams 2 --output-len 16 --flood 2 --flood-bytes 200000 --prefill-words 10)
else
  flood=(--streams 8 --output-len 256 --flood 4 --flood-bytes 1000000 --prefill-words 800)
fi
python3 benchmarks/itl_flood.py --base-url "http://127.0.0.1:$port" "${flood[@]}" --out "$out"
curl -s "http://127.0.0.1:$port/metrics" > "$out/metrics.txt"
kill "$server"
wait "$server"
[ "$smoke" = 1 ] || python3 -m pytest -q -m gpu tests/test_server.py 2>&1 | tail -5
rm -rf "$model"
