#!/usr/bin/env bash
# Many concurrent streaming chats: loraloop `serve` next to llama.cpp's `llama-server`
# (continuous batching, -np N -cb), same GGUF, same threads, the same clients in one run
# (`loraloop bench load --against`). loraloop's clients spread over ADAPTERS random
# rank-16 adapters; llama-server's run on the bare model. Prints a markdown table with
# aggregate tokens/s, time to first token and reply time per number of clients.
#
#   scripts/bench-serve.sh            (env: CLIENTS "1,8,32", REQUESTS 2, MAX_TOKENS 64,
#                                      ADAPTERS 8, THREADS, MODEL, LORALOOP, LLAMA_SERVER)
#
# llama-server: $LLAMA_SERVER if set, else built once into target/llama.cpp from the
# vendored tree of the llama-cpp-python source distribution, as scripts/bench-generate.sh
# builds llama-bench. No llama.cpp code enters the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
MODEL=${MODEL:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}
CLIENTS=${CLIENTS:-1,8,32}
REQUESTS=${REQUESTS:-2}
MAX_TOKENS=${MAX_TOKENS:-64}
ADAPTERS=${ADAPTERS:-8}
PORT=${PORT:-18093}

if [ -z "${LLAMA_SERVER:-}" ]; then
  LLAMA_SERVER=target/llama.cpp/build/bin/llama-server
  if [ ! -x "$LLAMA_SERVER" ]; then
    echo "building llama-server from the llama-cpp-python sdist (once, ~10 min on 2 cores)" >&2
    if [ ! -f target/llama.cpp/CMakeLists.txt ]; then
      tmp=$(mktemp -d)
      python3 -m pip install -q scikit-build-core cmake >&2
      python3 -m pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d "$tmp" >&2
      tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
      mkdir -p target/llama.cpp && cp -r "$tmp"/llama_cpp_python-*/vendor/llama.cpp/. target/llama.cpp/
    fi
    cmake -S target/llama.cpp -B target/llama.cpp/build -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON >&2
    cmake --build target/llama.cpp/build -j"$THREADS" --target llama-server >&2
  fi
fi
if [ -z "${LORALOOP:-}" ]; then
  cargo build --release -q --bin loraloop
  LORALOOP=target/release/loraloop
fi
[ -f "$MODEL" ] || "$LORALOOP" models fetch

# One slot per client at the largest count, each with room for the prompt and the reply.
SLOTS=$(echo "$CLIENTS" | tr ',' '\n' | sort -n | tail -1)
"$LLAMA_SERVER" -m "$MODEL" -t "$THREADS" -np "$SLOTS" -cb -c $((SLOTS * 512)) \
  --host 127.0.0.1 --port "$PORT" --log-disable >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  sleep 0.5
done
RAYON_NUM_THREADS=$THREADS "$LORALOOP" -q bench load --model "$MODEL" --clients "$CLIENTS" \
  --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --adapters "$ADAPTERS" \
  --against "http://127.0.0.1:$PORT"
