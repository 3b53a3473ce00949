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
# vendored tree of the llama-cpp-python source distribution (scripts/llama-cpp.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
MODEL=${MODEL:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}
CLIENTS=${CLIENTS:-1,8,32}
REQUESTS=${REQUESTS:-2}
MAX_TOKENS=${MAX_TOKENS:-64}
ADAPTERS=${ADAPTERS:-8}
PORT=${PORT:-18093}

. scripts/llama-cpp.sh
LLAMA_SERVER=${LLAMA_SERVER:-$(llama_cpp_tool llama-server)}
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
