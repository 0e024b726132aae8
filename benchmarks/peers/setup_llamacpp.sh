#!/usr/bin/env bash
# llama.cpp's llama-server, built from the source vendored in the llama-cpp-python sdist, under $PEERS.
# About 10 minutes on 2 cores. Usage: benchmarks/peers/setup_llamacpp.sh
# On a CPU with AMX (KVM guest) the AMX backend crashed at the first decode: NO_AMX=1 builds without it
# (AVX-512/VNNI kept). llama-cpp-python 0.3.36's llama.cpp then still crashed at load in its weight repacking
# (SIGSEGV); `--no-repack` (serve_llamacpp.sh ... --no-repack) serves.
set -euo pipefail
PEERS=${PEERS:-/tmp/peers}
mkdir -p "$PEERS/llamacpp"
cd "$PEERS/llamacpp"
if ! ls llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  PIP_CONSTRAINT= pip download --quiet --no-deps --no-binary :all: llama-cpp-python -d .
fi
SRC=$(ls -d llama_cpp_python-*/ 2>/dev/null | head -1 || true)
if [ -z "$SRC" ]; then
  tar xzf llama_cpp_python-*.tar.gz
  SRC=$(ls -d llama_cpp_python-*/ | head -1)
fi
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$SRC/vendor/llama.cpp" -B build "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
  ${NO_AMX:+-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF} >/dev/null
cmake --build build --target llama-server -j2
echo "built $PEERS/llamacpp/build/bin/llama-server ($SRC)"
