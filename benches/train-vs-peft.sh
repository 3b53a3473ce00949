#!/usr/bin/env bash
# CPU LoRA training throughput and peak memory of loraloop next to PyTorch + PEFT, same
# model (SmolLM2-135M-Instruct, the Q4_1 GGUF; PyTorch trains its float32 dequantization),
# same synthetic data, same LoRA (rank 16, alpha 2 x rank, all seven projections, both
# starting from the weights PEFT initializes: saved once, loaded by loraloop), same shapes,
# each run in its own process pinned to the same cores, runs alternated so drift on a shared
# machine hits both alike; with and without gradient checkpointing. Prints a markdown table
# with the ratios (loraloop / PyTorch + PEFT), then every step's loss of the first run of
# each side (they should agree without dropout; with it each side draws its own masks).
#
#   benches/train-vs-peft.sh [REPEATS]      (default 2; env: STEPS (5), WARMUP (1), SEQ_LEN (256),
#                                            MICRO_BATCH (4), RANK (16), LORA_DROPOUT (0),
#                                            CPUS (0,1), MODEL,
#                                            LORALOOP (a binary to use instead of building one))
#
# PyTorch side: benches/peft_train.py in the virtualenv target/peft-venv, created here on
# first use with the versions pinned below (torch from the default index; with its CUDA
# wheels the venv takes ~6 GB). Its first run converts the GGUF to float32 safetensors
# once, under target/peft-cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-2}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-1}
SEQ_LEN=${SEQ_LEN:-256}
MICRO_BATCH=${MICRO_BATCH:-4}
RANK=${RANK:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0}
ALPHA=$((2 * RANK)) # what loraloop bench train uses
CPUS=${CPUS:-0,1}
MODEL=${MODEL:-data/models/SmolLM2-135M-Instruct.Q4_1.gguf}

VENV=target/peft-venv
PINS=(torch==2.15.0 transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 tokenizers==0.23.3
  huggingface-hub==2.4.0 gguf==0.19.0 safetensors==0.8.0 numpy==2.4.6 psutil==7.2.2)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
frozen=$("$VENV/bin/pip" freeze 2>/dev/null | tr 'A-Z_' 'a-z-' || true)
for pin in "${PINS[@]}"; do
  if ! grep -qxF "$pin" <<<"$frozen"; then
    echo "installing the pinned PyTorch + PEFT stack into $VENV" >&2
    "$VENV/bin/pip" install -q --no-cache-dir "${PINS[@]}" >&2
    break
  fi
done

# LORALOOP=path/to/binary skips the build and runs that binary instead.
if [ -z "${LORALOOP:-}" ]; then
  cargo build --release -q --bin loraloop
  LORALOOP=target/release/loraloop
fi
[ -f "$MODEL" ] || "$LORALOOP" models fetch
[ -f "$MODEL" ] || { echo "missing $MODEL" >&2; exit 1; }

# Same cores for both; PyTorch's thread count is the number of cores in the list
# (CPUS is a comma-separated list, no ranges), loraloop sees only those cores.
THREADS=$(awk -F, '{print NF}' <<<"$CPUS")
PIN=()
if command -v taskset >/dev/null; then
  PIN=(taskset -c "$CPUS")
else
  echo "taskset not found: runs are not pinned" >&2
fi

results=$(mktemp)
trap 'rm -f "$results"' EXIT
# Keep the first JSON line (starting with `{`) a run prints on stdout, tagged with the gc setting.
record() {
  local gc=$1 out
  shift
  out=$("$@")
  grep -m1 '^{' <<<"$out" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["gc"]=sys.argv[1]; print(json.dumps(r))' "$gc" >>"$results"
}

# Convert the GGUF for PyTorch once (and catch a broken venv) outside the timed runs.
"$VENV/bin/python" benches/peft_train.py --model "$MODEL" --prepare >&2
# The LoRA both sides start from: PEFT's own initialization (torch seed 0), saved afresh
# each time (so it follows the pinned versions); loraloop loads it, so both train the same
# weights and their losses compare step by step.
INIT=target/peft-cache/$(basename "$MODEL" .gguf)-init-r$RANK-a$ALPHA
"$VENV/bin/python" benches/peft_train.py --model "$MODEL" --rank "$RANK" --alpha "$ALPHA" \
  --save-init "$INIT" >&2

for gc in off on; do
  flag=()
  pyflag=(--no-gradient-checkpointing)
  if [ "$gc" = on ]; then
    flag=(--gradient-checkpointing)
    pyflag=(--gradient-checkpointing)
  fi
  for i in $(seq "$REPEATS"); do
    echo "gradient checkpointing $gc, round $i/$REPEATS" >&2
    record "$gc" "${PIN[@]}" "$LORALOOP" bench train --model "$MODEL" --seq-len "$SEQ_LEN" \
      --micro-batch "$MICRO_BATCH" --rank "$RANK" --lora-dropout "$LORA_DROPOUT" --steps "$STEPS" \
      --warmup "$WARMUP" --init-adapter "$INIT" "${flag[@]}" --json
    record "$gc" "${PIN[@]}" "$VENV/bin/python" benches/peft_train.py --model "$MODEL" --seq-len "$SEQ_LEN" \
      --micro-batch "$MICRO_BATCH" --rank "$RANK" --alpha "$ALPHA" --lora-dropout "$LORA_DROPOUT" \
      --steps "$STEPS" --warmup "$WARMUP" \
      --threads "$THREADS" "${pyflag[@]}" --json
  done
done

python3 - "$results" "$CPUS" "$SEQ_LEN" "$MICRO_BATCH" "$RANK" "$STEPS" "$LORA_DROPOUT" <<'PY'
import json, statistics, sys
path, cpus, seq, mb, rank, steps, dropout = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
def agg(impl, gc):
    rs = [r for r in rows if r["impl"] == impl and r["gc"] == gc]
    return (statistics.median(r["tokens_per_s"] for r in rs), max(r["peak_rss_mb"] for r in rs),
            rs[-1].get("loss"), len(rs))
print(f"CPU LoRA training, cores {cpus}, seq {seq} x micro-batch {mb}, rank {rank}, LoRA dropout {dropout}, {steps} timed steps")
print()
# A second measure less sensitive to a burst of load from elsewhere on a shared machine:
# each run's median step, the median over runs (the same for both sides).
def med_step(impl, gc):
    rs = [r for r in rows if r["impl"] == impl and r["gc"] == gc]
    tok = int(mb) * int(seq)
    return statistics.median(tok / statistics.median(r["step_secs"]) for r in rs)
print("| impl | gradient checkpointing | tokens/s (median) | peak RSS MB (max) | final loss | tokens/s vs peft | RSS vs peft | median-step tokens/s | vs peft |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for gc in ("off", "on"):
    pt, pm, pl, _ = agg("pytorch-peft", gc)
    ps = med_step("pytorch-peft", gc)
    for impl in ("loraloop", "pytorch-peft"):
        t, m, l, n = agg(impl, gc)
        st = med_step(impl, gc)
        loss = "" if l is None else f"{l:.4f}"
        print(f"| {impl} | {gc} | {t:.1f} | {m:.0f} | {loss} | {t / pt:.2f}x | {m / pm:.2f}x | {st:.1f} | {st / ps:.2f}x |")
print()
print("Every run, in the order they ran (tokens/s):")
for gc in ("off", "on"):
    for impl in ("loraloop", "pytorch-peft"):
        runs = ", ".join(f"{r['tokens_per_s']:.1f}" for r in rows if r["impl"] == impl and r["gc"] == gc)
        print(f"- {impl}, gradient checkpointing {gc}: {runs}")
print()
print("Losses of every step (warm-up included) in the first run of each side, both from the same adapter:")
for gc in ("off", "on"):
    first = {impl: next(r["losses"] for r in rows if r["impl"] == impl and r["gc"] == gc)
             for impl in ("loraloop", "pytorch-peft")}
    a, b = first["loraloop"], first["pytorch-peft"]
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    print(f"- gradient checkpointing {gc}: loraloop {', '.join(f'{x:.5f}' for x in a)}; "
          f"PEFT {', '.join(f'{y:.5f}' for y in b)}; largest relative difference {worst:.1e}")
versions = next(r["versions"] for r in rows if r["impl"] == "pytorch-peft")
print()
print("PyTorch side: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
PY
