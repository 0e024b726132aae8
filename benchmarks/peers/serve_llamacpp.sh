#!/usr/bin/env bash
# Serve a GGUF file with llama-server: 16 slots, 2 threads. Usage: serve_llamacpp.sh MODEL.gguf PORT [extra args]
set -euo pipefail
PEERS=${PEERS:-/tmp/peers}
GGUF=$1; PORT=$2; shift 2
exec "$PEERS/llamacpp/build/bin/llama-server" -m "$GGUF" --host 127.0.0.1 --port "$PORT" \
  -np "${SLOTS:-16}" -c "${CONTEXT:-65536}" -t 2 --alias smollm2 "$@"
