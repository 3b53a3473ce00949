#!/usr/bin/env bash
# Exported files in llama.cpp: greedy text of `llama-completion` on (a) the base GGUF with the
# exported LoRA GGUF (`--lora`) and (b) the exported merged GGUF (F16), next to loraloop's
# own greedy reply with the adapter unmerged, for the same ChatML prompt. Prints a
# markdown table: how many of the first N tokens of each agree with loraloop's.
#
#   scripts/bench-export.sh [ADAPTER_DIR]    (default: an adapter trained for 30 steps on
#                                             examples/quickstart.jsonl; env: MODEL, N,
#                                             LLAMA_COMPLETION, LORALOOP)
#
# llama.cpp's llama-completion: $LLAMA_COMPLETION if set, else built once into target/llama.cpp (see
# scripts/llama-cpp.sh). No llama.cpp code enters the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}
N=${N:-32}

. scripts/llama-cpp.sh
LLAMA_COMPLETION=${LLAMA_COMPLETION:-$(llama_cpp_tool llama-completion)}
if [ -z "${LORALOOP:-}" ]; then
  cargo build --release -q --bin loraloop
  LORALOOP=target/release/loraloop
fi
[ -f "$MODEL" ] || "$LORALOOP" models fetch

work=$(mktemp -d)
ADAPTER=${1:-}
if [ -z "$ADAPTER" ]; then
  ADAPTER=$work/adapter
  "$LORALOOP" -q fine-tune --model "$MODEL" --data-path examples/quickstart.jsonl \
    --max-steps 30 --learning-rate 1e-3 --output-dir "$ADAPTER" >/dev/null
fi
"$LORALOOP" -q export --adapter "$ADAPTER" --model "$MODEL" --output-dir "$work/lora"
"$LORALOOP" -q export --adapter "$ADAPTER" --model "$MODEL" --format merged --type f16 --output-dir "$work/merged"

SYSTEM="You are a helpful assistant."
QUESTION=${QUESTION:-"What is the capital of France?"}
PROMPT=$'<|im_start|>system\n'"$SYSTEM"$'<|im_end|>\n<|im_start|>user\n'"$QUESTION"$'<|im_end|>\n<|im_start|>assistant\n'
run_llama() {
  "$LLAMA_COMPLETION" "$@" -p "$PROMPT" -n "$N" --temp 0 -no-cnv --no-warmup -t "$(nproc)" \
    --no-display-prompt -s 1 2>/dev/null
}
run_llama -m "$MODEL" --lora "$work/lora/adapter.gguf" >"$work/llama-lora.txt"
run_llama -m "$work/merged/model-f16.gguf" >"$work/llama-merged.txt"
echo "$QUESTION" | "$LORALOOP" -q chat --json --system "$SYSTEM" \
  --model "$MODEL" --adapter "$ADAPTER" --temperature 0 --repetition-penalty 1 \
  --max-new-tokens "$N" >"$work/loraloop.json"

python3 - "$work" "$N" <<'PY'
import json, os, sys
work, n = sys.argv[1], int(sys.argv[2])
ours = json.loads(open(os.path.join(work, "loraloop.json")).read().splitlines()[0])["reply"]
def agree(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k
print("| llama.cpp run | characters agreeing with loraloop's unmerged reply | its text |")
print("| --- | --- | --- |")
for name in ("llama-lora", "llama-merged"):
    text = open(os.path.join(work, name + ".txt")).read()
    print(f"| {name} | {agree(ours, text)} of {len(ours)} | {text[:60]!r} |")
print(f"loraloop (adapter unmerged): {ours[:60]!r}")
PY
