#!/usr/bin/env bash
# CPU generation speed of loraloop next to llama.cpp, same GGUF file, same threads, runs
# alternated so drift on a shared machine hits both alike. Prints a markdown table with
# the ratios (loraloop / llama.cpp).
#
#   scripts/bench-generate.sh [ROUNDS]        (default 3; env: THREADS, MODEL, PROFILE, LLAMA_BENCH,
#                                              LORALOOP: a binary to use instead of building one)
#
# llama.cpp's llama-bench: $LLAMA_BENCH if set, else built once into target/llama.cpp
# from the vendored tree of the llama-cpp-python source distribution (needs cmake, which
# `pip install cmake` provides). No llama.cpp code enters the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
THREADS=${THREADS:-$(nproc)}
MODEL=${MODEL:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}

. scripts/llama-cpp.sh
LLAMA_BENCH=${LLAMA_BENCH:-$(llama_cpp_tool llama-bench)}
# PROFILE=dev reuses the test build (dependencies and the model crate are optimized
# there too); the default is the release binary users run.
PROFILE=${PROFILE:-release}
if [ -n "${LORALOOP:-}" ]; then
  : # a binary given by the caller
elif [ "$PROFILE" = release ]; then
  cargo build --release -q --bin loraloop
  LORALOOP=target/release/loraloop
else
  cargo build -q --bin loraloop
  LORALOOP=target/debug/loraloop
fi
[ -f "$MODEL" ] || "$LORALOOP" models fetch

results=$(mktemp)
for i in $(seq "$ROUNDS"); do
  echo "round $i/$ROUNDS" >&2
  "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p 128 -n 128 -r 3 -o json | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    kind = "pp" if r["n_prompt"] else "tg"
    print(json.dumps({"who": "llama.cpp", kind: r["avg_ts"]}))' >>"$results"
  # candle's thread pool (and the kernels' own) take their size from RAYON_NUM_THREADS.
  RAYON_NUM_THREADS="$THREADS" "$LORALOOP" -q bench generate --model "$MODEL" --repeats 3 --json >>"$results"
done

python3 - "$results" "$THREADS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def mean(key, who):
    xs = [r[key] for r in rows if r.get("who", "loraloop") == who and key in r]
    return statistics.mean(xs)
lp, lt = mean("pp", "llama.cpp"), mean("tg", "llama.cpp")
bp, bt = mean("base_prompt_tps", "loraloop"), mean("base_decode_tps", "loraloop")
ap, at = mean("adapter_prompt_tps", "loraloop"), mean("adapter_decode_tps", "loraloop")
swap = mean("adapter_load_ms", "loraloop")
print(f"| {sys.argv[2]} threads | llama.cpp (no adapter) | loraloop, no adapter | loraloop, rank-16 adapter on 7 projections |")
print("| --- | --- | --- | --- |")
print(f"| prompt 128 tokens, t/s | {lp:.1f} | {bp:.1f} ({bp/lp:.2f}x) | {ap:.1f} ({ap/lp:.2f}x) |")
print(f"| decode 128 tokens, t/s | {lt:.1f} | {bt:.1f} ({bt/lt:.2f}x) | {at:.1f} ({at/lt:.2f}x) |")
print(f"adapter load + validate: {swap:.1f} ms")
PY
