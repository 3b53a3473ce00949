#!/usr/bin/env bash
# GPU LoRA training throughput, peak GPU memory and model FLOPs utilization of loraloop
# next to PyTorch + PEFT on the same GPU, in one run: same random-initialised llama (made
# here with transformers, bf16 safetensors, read by both), same synthetic data, bf16 base,
# f32 LoRA weights and AdamW state, rank 16 (alpha 32) on all seven projections, same micro
# batch and sequence length; with and without gradient checkpointing; for SmolLM2-135M's
# shape and SmolLM2-1.7B's. Then the CPU-vs-GPU training parity check and decode tokens/s
# on the GPU. Prints markdown tables.
#
#   benches/train-vs-peft-cuda.sh          (env: LORALOOP (default .gpu/loraloop, a binary
#       built with `--features cuda`), PYTHON (python3 with torch + CUDA, transformers,
#       peft), SHAPES ("135m 1.7b"), STEPS (10), WARMUP (2), SEQ_LEN (512),
#       MICRO_BATCH (8), RANK (16), PEAK_TFLOPS (the GPU's dense bf16 peak; by default
#       989.4 for H100 SXM / H200, 756 for H100 PCIe), OUT (where models and logs go,
#       default target/gpu-bench), GGUF (a .gguf file for a second decode row, e.g. the
#       default SmolLM2-135M-Instruct.Q4_1.gguf, if it was carried over))
#
# Made for the lent GPU machine (no network, no Rust): the CUDA binary is built elsewhere
# (README, "CUDA") and carried over with this working tree.
#
# Model FLOPs per trained token (the same formula for both implementations; recomputation
# under gradient checkpointing is not counted, as MFU conventionally does not):
#   N = matmul weights of the base (7 projections x layers + the output head)
#   4N for the base: forward 2N + input gradients 2N (the frozen base has no weight gradients)
#   6 N_lora for the adapters (forward, input and weight gradients)
#   12 x layers x seq_len x q_dim for attention (QK^T and PV forward 4, backward 8; full,
#   not causally halved)
set -euo pipefail
cd "$(dirname "$0")/.."
LORALOOP=${LORALOOP:-.gpu/loraloop}
PYTHON=${PYTHON:-python3}
SHAPES=${SHAPES:-"135m 1.7b"}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
SEQ_LEN=${SEQ_LEN:-512}
MICRO_BATCH=${MICRO_BATCH:-8}
RANK=${RANK:-16}
ALPHA=$((2 * RANK)) # what loraloop bench train uses
OUT=${OUT:-target/gpu-bench}
mkdir -p "$OUT"
[ -x "$LORALOOP" ] || { echo "no loraloop binary at $LORALOOP (LORALOOP=...)" >&2; exit 1; }
"$LORALOOP" --version >&2

if [ -z "${PEAK_TFLOPS:-}" ]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  case "$gpu" in
    *H100*PCIe*) PEAK_TFLOPS=756 ;;
    *H100* | *H200*) PEAK_TFLOPS=989.4 ;;
    *) echo "unknown GPU '$gpu': set PEAK_TFLOPS for the MFU column" >&2; PEAK_TFLOPS=nan ;;
  esac
fi

results="$OUT/results.jsonl"
: >"$results"
# Keep the first JSON line a run prints, tagged with the shape; a failed run (out of
# memory, say) is recorded as such and the others go on.
record() {
  local shape=$1 log=$2 out
  shift 2
  if out=$("$@" 2>"$log"); then
    grep -m1 '^{' <<<"$out" | "$PYTHON" -c 'import json,sys; r=json.loads(sys.stdin.read()); r["shape"]=sys.argv[1]; print(json.dumps(r))' "$shape" >>"$results"
  else
    echo "failed: $* (see $log)" >&2
    tail -3 "$log" >&2
  fi
}

for shape in $SHAPES; do
  model="$OUT/random-$shape"
  [ -f "$model/tokenizer_config.json" ] || "$PYTHON" benches/peft_train_cuda.py --make-model "$model" --shape "$shape" >&2
  for gc in off on; do
    flag=()
    pyflag=(--no-gradient-checkpointing)
    if [ "$gc" = on ]; then
      flag=(--gradient-checkpointing)
      pyflag=(--gradient-checkpointing)
    fi
    echo "$shape, gradient checkpointing $gc" >&2
    record "$shape" "$OUT/loraloop-$shape-gc-$gc.log" "$LORALOOP" bench train --device cuda --dtype bf16 \
      --model "$model" --seq-len "$SEQ_LEN" --micro-batch "$MICRO_BATCH" --rank "$RANK" \
      --steps "$STEPS" --warmup "$WARMUP" "${flag[@]}" --json
    record "$shape" "$OUT/peft-$shape-gc-$gc.log" "$PYTHON" benches/peft_train_cuda.py --model "$model" \
      --seq-len "$SEQ_LEN" --micro-batch "$MICRO_BATCH" --rank "$RANK" --alpha "$ALPHA" \
      --steps "$STEPS" --warmup "$WARMUP" "${pyflag[@]}" --json
  done
done

"$PYTHON" - "$results" "$OUT" "$PEAK_TFLOPS" "$SEQ_LEN" "$MICRO_BATCH" "$RANK" "$STEPS" <<'PY'
import json, math, sys
path, out, peak, seq, mb, rank, steps = sys.argv[1:]
peak, seq, rank = float(peak) * 1e12, int(seq), int(rank)
rows = [json.loads(l) for l in open(path)]
def flops_per_token(shape):
    c = json.load(open(f"{out}/random-{shape}/config.json"))
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    n = L * sum(a * b for a, b in dims) + c["vocab_size"] * h
    n_lora = L * sum(rank * (a + b) for a, b in dims)
    return 4 * n + 6 * n_lora + 12 * L * seq * q
print(f"LoRA training on {next((r['device'] for r in rows if r['impl'] == 'pytorch-peft'), 'the GPU')}, "
      f"bf16 base, seq {seq} x micro-batch {mb}, rank {rank} on 7 projections, {steps} timed steps")
print()
print("| shape | impl | gradient checkpointing | tokens/s | vs peft | peak GPU MB | MFU | final loss |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for shape in dict.fromkeys(r["shape"] for r in rows):
    f = flops_per_token(shape)
    for gc in (False, True):
        rs = {r["impl"]: r for r in rows if r["shape"] == shape and r["gradient_checkpointing"] == gc}
        base = rs.get("pytorch-peft")
        for impl in ("loraloop", "pytorch-peft"):
            r = rs.get(impl)
            if r is None:
                print(f"| {shape} | {impl} | {'on' if gc else 'off'} | failed (see logs) | | | | |")
                continue
            t = r["tokens_per_s"]
            ratio = f"{t / base['tokens_per_s']:.2f}x" if base else "-"
            mem = r.get("peak_gpu_mb")
            mem = "-" if mem is None else f"{mem:.0f}"
            mfu = t * f / peak
            mfu = "-" if math.isnan(mfu) else f"{100 * mfu:.1f}%"
            print(f"| {shape} | {impl} | {'on' if gc else 'off'} | {t:.0f} | {ratio} | {mem} | {mfu} | {r['loss']:.4f} |")
v = next((r["versions"] for r in rows if r["impl"] == "pytorch-peft"), None)
if v:
    print()
    print("PyTorch side: " + ", ".join(f"{k} {x}" for k, x in v.items()))
PY

# Correctness before speed counts: the same LoRA steps on the CPU (f32) and the GPU (bf16)
# from the same seed and data, losses and adapter updates compared (exit 1 beyond tolerance).
echo
echo "parity, CPU f32 against CUDA bf16 (random-135m):"
"$LORALOOP" bench parity --device cuda --model "$OUT/random-135m" || echo "PARITY FAILED" >&2

# Decode on the GPU: the 135M shape in bf16 (the dense path), and the GGUF if given
# (quantized weights through candle's CUDA quantized matmul).
echo
echo "| model | device | pp128 base t/s | tg128 base t/s | tg128 rank-16 adapter t/s |"
echo "| --- | --- | --- | --- | --- |"
for m in "$OUT/random-135m" ${GGUF:-}; do
  [ -e "$m" ] || continue
  if j=$("$LORALOOP" bench generate --device cuda --model "$m" --json 2>"$OUT/generate-$(basename "$m").log"); then
    "$PYTHON" - "$(grep -m1 '^{' <<<"$j")" "$(basename "$m")" <<'PY'
import json, sys
r, name = json.loads(sys.argv[1]), sys.argv[2]
print(f"| {name} | {r['device']} | {r['base_prompt_tps']:.0f} | {r['base_decode_tps']:.1f} | {r['adapter_decode_tps']:.1f} |")
PY
  else
    echo "| $(basename "$m") | cuda | failed (see $OUT/generate-$(basename "$m").log) | | |"
  fi
done
