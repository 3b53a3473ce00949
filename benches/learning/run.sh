#!/usr/bin/env bash
# The learning benchmark: does a LoRA fine-tune teach SmolLM2-135M-Instruct new facts it can
# use when asked in other words, without forgetting what it knew? loraloop next to
# PyTorch + PEFT at the same settings.
#
# Data (all in this folder, written for this benchmark):
#   persona_train.jsonl   151 OpenAI-chat examples about a fictional shop (Thistlewick
#                         Bakery): 20 facts (owner, address, hours, closing day, signature
#                         bun and its price, the cat, founding year, wifi password,
#                         delivery, phone, head baker, gluten-free day, loyalty card, coffee
#                         roaster, terrace, best-selling loaf, email, motto), each asked in
#                         7-8 phrasings with one short answer that contains the fact.
#   persona_heldout.jsonl one question per fact in a phrasing that is NOT in the training
#                         data, with the strings a right answer contains (the invented name,
#                         number, ...): 20 questions.
#   general.jsonl         30 general-knowledge questions that the base model answers right
#                         both as loraloop's Q4_1 model and as PyTorch's float32 copy
#                         (kept from 83 candidates by their greedy answers; none of them is
#                         one of `--replay`'s built-in prompts, trainer/src/replay.rs, or a
#                         paraphrase of one, so replay does not train on the test): forgetting.
# Scoring (score.py): a greedy reply (at most 64 new tokens, the template's default system
# prompt, each question in a fresh conversation) is right when it contains ANY expected
# string, case-insensitive. "facts" = held-out paraphrases right (of 20; the base model
# gets 0); "general" = general questions still right (of 30; the base model gets 30).
#
# For each seed in SEEDS:
#   loraloop: `loraloop fine-tune --seed S $LORALOOP_FLAGS` (no other hyperparameter flag:
#     its defaults), then its answers with `loraloop chat --json` (ANSWERS=chat, the
#     default: greedy, no repetition penalty, the same system prompt the template adds;
#     checked to give the same replies as `evaluate --compare`, 3x faster) or with
#     `loraloop evaluate --compare --json` (ANSWERS=evaluate).
#   PyTorch + PEFT (peft_learn.py) at the settings below, which are loraloop's current
#     defaults (`trainer/src/config.rs`): it trains on the SAME 90% of the examples that
#     loraloop keeps (its seeded split, ported to Python and checked against loraloop's
#     eval loss) in the same order per epoch; $PEFT_FLAGS overrides any of them.
# Then the base model's row (loraloop, no adapter) and a markdown table with the means
# over seeds. Every score line also goes to $OUT/results.jsonl; `score.py table FILES`
# prints the table again (or for several runs together).
#
#   benches/learning/run.sh
#   SEEDS="1 2" LORALOOP_FLAGS="--replay --val-set-size 0" LABEL="replay, all data" \
#       SKIP_PEFT=1 benches/learning/run.sh
#   PEFT_FLAGS="--batch-size 8 --scheduler constant --dropout 0 --val-set-size 0" \
#       LABEL="peft b8 const" SKIP_LORALOOP=1 benches/learning/run.sh
#
# env: SEEDS ("1 2 3"), LORALOOP (a binary; default target/release/loraloop, built if
# missing), LORALOOP_FLAGS, PEFT_FLAGS, LABEL (the loraloop rows' setting name),
# PEFT_LABEL, SKIP_LORALOOP, SKIP_PEFT, SKIP_BASE (1 to skip), ANSWERS (chat|evaluate), CARD (1: the report card too),
# THREADS (RAYON_NUM_THREADS for loraloop and torch's thread count; 1 is much faster while
# another process uses the cores: candle's pool spins at its barriers), OUT (a folder;
# default /tmp/learning/run-TIME), MODEL, PY (the PEFT virtualenv's python, see
# benches/train-vs-peft.sh for how it is made).
# Timing (2-vCPU machine shared with other builds, THREADS=1, two runs side by side): a
# loraloop fine-tune at the defaults (102 steps) 285-310 s, with --replay 420-530 s (it
# first generates the replay answers); answering the 50 questions 20-40 s; PEFT at the
# same settings 410-690 s of training and 80-175 s of answering. Same seed, same replies
# (checked for loraloop across 1 and 2 threads).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=benches/learning

# loraloop's current defaults (loraloop fine-tune --help; trainer/src/config.rs), the
# settings the PEFT rows use.
EPOCHS=3
BATCH_SIZE=4          # micro_batch_size 4 x gradient_accumulation_steps 1
LEARNING_RATE=2e-4
LR_SCHEDULER=cosine
WARMUP_RATIO=0.03
LORA_DROPOUT=0.05
LORA_R=16
LORA_ALPHA=32
VAL_SET_SIZE=0.1      # held out of training for the eval loss

SEEDS=${SEEDS-"1 2 3"} # set but empty: no seeds (only the base row)
MODEL=${MODEL:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=${PY:-target/peft-venv/bin/python}
# loraloop reads LORALOOP_* environment variables as its own configuration and rejects
# unknown ones: keep the flags in a shell variable only.
FLAGS=${LORALOOP_FLAGS:-}
unset LORALOOP_FLAGS
PEFT_FLAGS=${PEFT_FLAGS:-}
LABEL=${LABEL:-loraloop${FLAGS:+ $FLAGS}}
PEFT_LABEL=${PEFT_LABEL:-peft${PEFT_FLAGS:+ $PEFT_FLAGS}}
ANSWERS=${ANSWERS:-chat}
# The report card (held-out scores, the retention probe) is left out of the timed run
# unless CARD=1; a binary older than the card knows no --no-card: CARD=1 for it too.
CARD=$([ "${CARD:-0}" = 1 ] || echo --no-card)
OUT=${OUT:-/tmp/learning/run-$(date +%Y%m%d-%H%M%S)}
SYSTEM="You are a helpful AI assistant named SmolLM, trained by Hugging Face" # SmolLM2's template default
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
TORCH_THREADS=${THREADS:-2}
[ -n "${THREADS:-}" ] && export RAYON_NUM_THREADS=$THREADS

if [ -z "${LORALOOP:-}" ]; then
  LORALOOP=target/release/loraloop
  [ -x "$LORALOOP" ] || cargo build --release -q --bin loraloop
fi
[ -f "$MODEL" ] || "$LORALOOP" models fetch
[ -f "$MODEL" ] || { echo "missing $MODEL" >&2; exit 1; }

# The questions, as chat prompts (each followed by /reset: a fresh conversation) and as
# evaluation data (any reference answer will do: only the generations are used).
python3 "$HERE/score.py" eval-data "$OUT/questions.jsonl" >/dev/null
python3 - "$OUT/questions.jsonl" >"$OUT/chat-in.txt" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    q = json.loads(line)["messages"][0]["content"]
    print(json.dumps({"prompt": q}))
    print("/reset")
PY

# answers ADAPTER_DIR|- OUTFILE: loraloop's greedy replies to every question.
answers() {
  local adapter=() 
  [ "$1" != - ] && adapter=(--adapter "$1")
  if [ "$ANSWERS" = evaluate ] && [ "$1" != - ]; then
    "$LORALOOP" -q evaluate --model "$MODEL" "${adapter[@]}" --data-path "$OUT/questions.jsonl" \
      --compare --samples 1000 --json >"$2"
  else
    "$LORALOOP" -q chat --model "$MODEL" "${adapter[@]}" --system "$SYSTEM" --temperature 0 \
      --repetition-penalty 1 --max-new-tokens 64 --json <"$OUT/chat-in.txt" >"$2"
  fi
}

if [ "${SKIP_BASE:-0}" != 1 ]; then
  echo "base model: answering" >&2
  answers - "$OUT/base-answers.jsonl"
  python3 "$HERE/score.py" score "$OUT/base-answers.jsonl" --label "base model (loraloop Q4_1)" \
    --extra '{"impl": "base"}' >>"$RESULTS"
fi

for seed in $SEEDS; do
  if [ "${SKIP_LORALOOP:-0}" != 1 ]; then
    dir=$OUT/loraloop-seed$seed
    echo "loraloop seed $seed: fine-tune $FLAGS" >&2
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086 # FLAGS is a list of flags
    "$LORALOOP" fine-tune --model "$MODEL" --data-path "$HERE/persona_train.jsonl" --output-dir "$dir" $CARD \
      --overwrite --seed "$seed" $FLAGS >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    answers "$dir" "$dir-answers.json"
    t2=$(date +%s.%N)
    extra=$(python3 -c 'import json,sys; print(json.dumps({"impl": "loraloop", "seed": int(sys.argv[1]), "flags": sys.argv[2], "train_s": round(float(sys.argv[4]) - float(sys.argv[3]), 1), "answer_s": round(float(sys.argv[5]) - float(sys.argv[4]), 1)}))' \
      "$seed" "$FLAGS" "$t0" "$t1" "$t2")
    python3 "$HERE/score.py" score "$dir-answers.json" --label "$LABEL" --extra "$extra" | tee -a "$RESULTS" | cut -c1-200 >&2
  fi
  if [ "${SKIP_PEFT:-0}" != 1 ]; then
    echo "PEFT seed $seed $PEFT_FLAGS" >&2
    # shellcheck disable=SC2086 # PEFT_FLAGS is a list of flags (later ones win)
    "$PY" "$HERE/peft_learn.py" --model "$MODEL" --seed "$seed" --threads "$TORCH_THREADS" --epochs "$EPOCHS" \
      --batch-size "$BATCH_SIZE" --lr "$LEARNING_RATE" --scheduler "$LR_SCHEDULER" \
      --warmup-ratio "$WARMUP_RATIO" --dropout "$LORA_DROPOUT" --rank "$LORA_R" --alpha "$LORA_ALPHA" \
      --val-set-size "$VAL_SET_SIZE" $PEFT_FLAGS --label "$PEFT_LABEL" \
      --answers-out "$OUT/peft-seed$seed-answers.json" 2>"$OUT/peft-seed$seed.log" | grep '^{' \
      | tee -a "$RESULTS" | cut -c1-200 >&2
  fi
done

echo
echo "Results in $RESULTS (python3 $HERE/score.py score ANSWERS --show: every reply)"
echo
python3 "$HERE/score.py" table "$RESULTS"
