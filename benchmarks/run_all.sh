#!/usr/bin/env bash
# Every measurement behind BENCHMARKS.md, one system at a time (never two at once: two OpenMP processes on two
# cores stall each other), then the report. From the repository root, after `make setup`:
#
#   bash benchmarks/run_all.sh            # peers are set up under $PEERS (default /tmp/peers) if missing
#   RUNS=3 W3_PEER_RUNS=2 bash benchmarks/run_all.sh
#
# Writes benchmarks/results/*.json and *.png, and the generated tables in benchmarks/results/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEERS=${PEERS:-/tmp/peers}
RUNS=${RUNS:-2}                  # runs of each workload (the report takes the median)
W3_PEER_RUNS=${W3_PEER_RUNS:-1}  # W3 on a peer takes 6-9 minutes per run
export PEERS

[ -x "$PEERS/llamacpp/build/bin/llama-server" ] || bash benchmarks/peers/setup_llamacpp.sh
[ -x "$PEERS/vllm-venv/bin/python" ] || bash benchmarks/peers/setup_vllm.sh
[ -f "$PEERS/smollm2-hf/config.json" ] || "$PY" benchmarks/peers/export_hf.py "$PEERS/smollm2-hf"

"$PY" benchmarks/workloads.py pagoda --runs "$RUNS" --server-args --kv-cache-memory 4GiB
"$PY" benchmarks/workloads.py llamacpp --only W1 W2 --runs "$RUNS"
"$PY" benchmarks/workloads.py llamacpp --only W3 --runs "$W3_PEER_RUNS" --label llamacpp-w3
"$PY" benchmarks/workloads.py vllm --label vllm-fp32 --hf-dir "$PEERS/smollm2-hf" --only W1 W2 --runs "$RUNS" \
  --server-args --dtype float32
"$PY" benchmarks/workloads.py vllm --label vllm-fp32-w3 --hf-dir "$PEERS/smollm2-hf" --only W3 \
  --runs "$W3_PEER_RUNS" --server-args --dtype float32
# a third W1 run for both single-stream contenders (W1 varies most between runs), in fresh servers
"$PY" benchmarks/workloads.py pagoda --label pagoda-w1 --only W1 --runs 1 --first-run 3
"$PY" benchmarks/workloads.py llamacpp --label llamacpp-w1 --only W1 --runs 1 --first-run 3
"$PY" benchmarks/batching.py --runs "$RUNS"
"$PY" benchmarks/kv_capacity.py
"$PY" benchmarks/hf_baseline.py
"$PY" benchmarks/ceilings.py
"$PY" benchmarks/report.py
