#!/usr/bin/env python3
"""CPU LoRA training throughput of PyTorch + PEFT on SmolLM2-135M, the baseline for
``loraloop bench train`` (benches/train-vs-peft.sh runs both, alternated).

    target/peft-venv/bin/python benches/peft_train.py --steps 3 [--gradient-checkpointing] [--json]

Model: the GGUF file (default data/models/SmolLM2-135M-Instruct.Q4_1.gguf) as transformers
loads it, dequantized to float32 (transformers undoes llama.cpp's q/k row permutation).
Converting the GGUF takes ~20 s and its peak memory (~1.5 GB) would swamp the training
peak, so the first run saves the converted model once, in a child process, as float32
safetensors under target/peft-cache/, and every run trains from that copy.

Training: peft LoRA (r, alpha, dropout --lora-dropout (default 0), bias none) on all seven projections q, k, v, o,
gate, up, down_proj; AdamW (lr 1e-4, weight decay 0, torch defaults otherwise) on the LoRA
parameters only; float32; model in train mode, use_cache False, attention as transformers
picks by default for Llama (``sdpa``: torch's scaled_dot_product_attention, causal);
gradient checkpointing optional (non-reentrant). Every position is labelled
(labels = input_ids; transformers shifts inside, so each row scores seq_len - 1 tokens and
the loss is the mean cross-entropy over them).

Data, deterministic and synthetic (loraloop uses the same formula): the token at position j
of row r of the micro-batch at step s is

    token(s, r, j) = (1 + (s * micro_batch + r) * 7919 + j * 104729) % 49152

where s counts every step run, warmup included, from 0 (so the timed steps are
s = warmup .. warmup + steps - 1). One optimizer step = one micro-batch: forward, backward,
optimizer.step(), zero_grad().

``--save-init DIR`` writes the LoRA weights training starts from (the seed below makes
them the same in every run) as a PEFT folder and exits; train-vs-peft.sh passes that
folder to ``loraloop bench train --init-adapter``, so both sides train the same weights.

Timing: the `warmup` steps are excluded; then `steps` steps are timed.
tokens/s = micro_batch * seq_len * steps / elapsed. Peak RSS is ru_maxrss of this process
(its whole life: loading the cached float32 model and training). ``--json`` prints one line:
{"impl":"pytorch-peft","tokens_per_s":..,"peak_rss_mb":..,"gradient_checkpointing":..,
"steps":..,"seq_len":..,"micro_batch":..,"rank":..,"loss":..,"versions":{..}, ...}.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "data", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
CACHE = os.path.join(ROOT, "target", "peft-cache")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 49152


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default=None, help="attn_implementation (default: transformers' own, sdpa)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--prepare", action="store_true", help="only build the float32 copy of the model, if missing")
    p.add_argument(
        "--save-init",
        metavar="DIR",
        help="save the LoRA adapter training starts from (torch seed 0) to DIR in PEFT's format and exit",
    )
    p.add_argument("--convert-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def cache_dir(gguf):
    return os.path.join(CACHE, os.path.splitext(os.path.basename(gguf))[0] + "-f32")


def convert(gguf, out):
    """GGUF -> float32 safetensors folder (run in a child process: its memory peak stays there)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )
    c = model.config
    shape = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size)
    assert shape == (30, 576, 9, 3, 49152) and c.tie_word_embeddings, f"not SmolLM2-135M: {shape}"
    # save_pretrained refuses a model loaded from GGUF; the weights are plain float32 now, so
    # write them directly (lm_head.weight is the tied embedding) with a config that says so.
    from safetensors.torch import save_file

    if hasattr(c, "quantization_config"):
        del c.quantization_config
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    c.save_pretrained(tmp)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, out)


def ensure_cache(gguf):
    out = cache_dir(gguf)
    if not os.path.isdir(out):
        if not os.path.isfile(gguf):
            sys.exit(f"missing model {gguf} (loraloop models fetch)")
        os.makedirs(CACHE, exist_ok=True)
        print(f"converting {gguf} to float32 safetensors in {out} (once)", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--convert-only", "--model", gguf], check=True)
    return out


def batch(step, micro_batch, seq_len, torch):
    # token(s, r, j) = (1 + (s * micro_batch + r) * 7919 + j * 104729) % 49152
    s = torch.tensor(step, dtype=torch.int64)
    r = torch.arange(micro_batch, dtype=torch.int64)[:, None]
    j = torch.arange(seq_len, dtype=torch.int64)[None, :]
    return (1 + (s * micro_batch + r) * 7919 + j * 104729) % VOCAB


def main():
    args = parse_args()
    if args.convert_only:
        convert(args.model, cache_dir(args.model))
        return

    if args.prepare:
        print(ensure_cache(args.model))
        return

    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes on every step
    src = ensure_cache(args.model)
    torch.manual_seed(0)  # LoRA A init (kaiming uniform; B starts at zero)
    kw = {} if args.attn is None else {"attn_implementation": args.attn}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.lora_dropout,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    if args.save_init:
        # The weights every run starts from (the seed above makes them the same each time);
        # `loraloop bench train --init-adapter DIR` starts from them too.
        model.save_pretrained(args.save_init)
        print(args.save_init)
        return
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step(s):
        ids = batch(s, args.micro_batch, args.seq_len, torch)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses, step_secs = [], []
    for s in range(args.warmup):
        losses.append(step(s))
    for s in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(s))
        step_secs.append(time.perf_counter() - t0)
    elapsed = sum(step_secs)

    tokens = args.micro_batch * args.seq_len * args.steps
    out = {
        "impl": "pytorch-peft",
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "warmup": args.warmup,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "rank": args.rank,
        "alpha": args.alpha,
        "loss": losses[-1],
        "losses": losses,
        "s_per_step": elapsed / args.steps,
        "step_secs": step_secs,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.base_model.model.config._attn_implementation,
        "trainable_params": n_trainable,
        "rss_after_load_mb": rss_loaded,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"pytorch-peft: {out['tokens_per_s']:.1f} tokens/s (step times: "
            f"{', '.join(f'{x:.2f}s' for x in step_secs)}), "
            f"peak RSS {out['peak_rss_mb']:.0f} MB, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}, attention {out['attn_implementation']}, "
            f"{n_trainable} trainable, losses {', '.join(f'{l:.4f}' for l in losses)}"
        )
        print(f"versions: {out['versions']}")


if __name__ == "__main__":
    main()
