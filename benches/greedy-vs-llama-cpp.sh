#!/usr/bin/env bash
# How often loraloop's greedy chat replies are llama.cpp's on the same GGUF: each prompt
# (the learning bench's 50 questions, then ten of our own) in a fresh conversation with
# SmolLM2's default system prompt, 24 new tokens, through `loraloop chat --json` and
# llama.cpp's `llama-simple` (greedy; built from the llama-cpp-python sdist by
# scripts/llama-cpp.sh). A reply agrees when one text is a prefix of the other.
#
#   benches/greedy-vs-llama-cpp.sh      (env: LORALOOP, MODEL, TOKENS 24)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}
TOKENS=${TOKENS:-24}
LORALOOP=${LORALOOP:-target/release/loraloop}
. scripts/llama-cpp.sh
SIMPLE=$(llama_cpp_tool llama-simple)
OUT=$(mktemp -d)
python3 benches/learning/score.py eval-data "$OUT/questions.jsonl" >/dev/null
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
qs = [json.loads(l)["messages"][0]["content"] for l in open(f"{out}/questions.jsonl")]
qs += ["What is the capital of France?", "Tell me a story about a fox.", "What is 12 times 12?",
       "Name three primary colors.", "Who wrote Romeo and Juliet?",
       "What is the boiling point of water?", "Explain photosynthesis in one sentence.",
       "What is the largest planet in our solar system?", "How many continents are there?",
       "What language is spoken in Brazil?"]
json.dump(qs, open(f"{out}/qs.json", "w"))
with open(f"{out}/chat-in.txt", "w") as f:
    for q in qs:
        f.write(json.dumps({"prompt": q}) + "\n/reset\n")
PY
SYSTEM="You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"$LORALOOP" -q chat --model "$MODEL" --system "$SYSTEM" --temperature 0 --repetition-penalty 1 \
  --max-new-tokens "$TOKENS" --json <"$OUT/chat-in.txt" >"$OUT/loraloop.jsonl"
python3 - "$OUT" "$SIMPLE" "$MODEL" "$TOKENS" "$SYSTEM" <<'PY'
import json, subprocess, sys
out, simple, model, tokens, system = sys.argv[1:]
qs = json.load(open(f"{out}/qs.json"))
ours = [json.loads(l)["reply"] for l in open(f"{out}/loraloop.jsonl") if '"reply"' in l]
start = "<|im_start|>assistant\n"
agree, common = 0, 0
for q, a in zip(qs, ours):
    p = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n{start}"
    t = subprocess.run([simple, "-m", model, "-n", tokens, p], capture_output=True, text=True).stdout
    b = t[t.rfind(start) + len(start):].replace("<|im_end|>", "").strip()
    a = a.strip()
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    agree += k >= min(len(a), len(b))
    common += k
print(f"{agree} of {len(qs)} replies agree with llama.cpp's; "
      f"mean common prefix {common / len(qs):.1f} characters")
PY
