#!/usr/bin/env python3
"""GPU LoRA training throughput of PyTorch + PEFT, the baseline for
``loraloop bench train --device cuda`` (benches/train-vs-peft-cuda.sh runs both in one go),
and the random-weight models both sides train.

    python3 benches/peft_train_cuda.py --make-model DIR --shape 135m|1.7b
    python3 benches/peft_train_cuda.py --model DIR --steps 10 [--gradient-checkpointing] [--json]

--make-model writes a random-initialised llama of the given shape with transformers
(``LlamaForCausalLM(LlamaConfig(...))``, torch seed 0, the default init), in bf16, as a
Hugging Face folder loraloop loads too: config.json, model.safetensors, and a byte-level
tokenizer.json / tokenizer_config.json (every byte a token plus the ChatML markers; the
benchmark feeds token ids, the tokenizer is only there because the loader needs one).
Training speed does not depend on the weight values; both sides read the same file.

Training: bf16 base on CUDA, peft LoRA (r, alpha = 2r, dropout 0, bias none) on all seven
projections; PEFT keeps the adapter weights in f32 (``autocast_adapter_dtype``) as loraloop
does; AdamW (lr 1e-4, weight decay 0) on the LoRA parameters only, its state f32;
attention as transformers picks for Llama (``sdpa``); gradient checkpointing optional
(non-reentrant). Data: the synthetic rows of benches/peft_train.py (token(s, r, j) =
(1 + (s * micro_batch + r) * 7919 + j * 104729) % 49152), every position labelled.

Timing: ``warmup`` steps untimed, then ``steps`` steps, each ended by a CUDA synchronize.
Peak GPU memory: the most device memory in use (total - free from cudaMemGetInfo, as
nvidia-smi counts it) seen by a thread sampling every 5 ms over the whole run, the same
measure loraloop's bench reports; torch's own max_memory_allocated is printed as well.
"""

import argparse
import json
import os
import platform
import threading
import time
import warnings

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 49152
SHAPES = {
    # SmolLM2-135M's config.
    "135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                 num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    # SmolLM2-1.7B's config.
    "1.7b": dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=8192,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0),
}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make-model", metavar="DIR", help="write a random model of --shape to DIR and exit")
    p.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    p.add_argument("--model", help="a folder written by --make-model")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def make_model(out, shape):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, hidden_act="silu", bos_token_id=None,
                      eos_token_id=None, **SHAPES[shape])
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)  # safetensors (the default), possibly in several shards
    plain_rope_config(out, shape)
    write_tokenizer(out)
    print(out)


def plain_rope_config(out, shape):
    """transformers 5 writes the rope settings as `rope_parameters` (and may mirror them in
    `rope_scaling`); loraloop reads llama's classic top-level `rope_theta` and takes a
    `rope_scaling` only for llama3 scaling. Rewrite config.json in the plain-rope form,
    which both read."""
    path = os.path.join(out, "config.json")
    c = json.load(open(path))
    c["rope_theta"] = SHAPES[shape]["rope_theta"]
    for k in ("rope_scaling", "rope_parameters"):
        v = c.get(k)
        if isinstance(v, dict) and v.get("rope_type", v.get("type", "default")) == "default":
            c.pop(k)
    with open(path, "w") as f:
        json.dump(c, f, indent=2)


def write_tokenizer(out):
    """A byte-level tokenizer (every byte a token, plus the ChatML markers) with a ChatML
    template: the one loraloop's own test models use (model/src/testing.rs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "bos_token": None, "eos_token": "<|im_end|>"}, f)


def batch(step, micro_batch, seq_len, torch, device):
    s = torch.tensor(step, dtype=torch.int64)
    r = torch.arange(micro_batch, dtype=torch.int64)[:, None]
    j = torch.arange(seq_len, dtype=torch.int64)[None, :]
    return ((1 + (s * micro_batch + r) * 7919 + j * 104729) % VOCAB).to(device)


class GpuPeak:
    """Most device memory in use (total - free), sampled every 5 ms on a thread."""

    def __init__(self, torch):
        self.torch, self.peak, self.stop = torch, 0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while True:
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            if self.stop:
                return
            time.sleep(0.005)

    def finish(self):
        self.stop = True
        self.t.join()
        return self.peak / 2**20


def main():
    args = parse_args()
    if args.make_model:
        make_model(args.make_model, args.shape)
        return
    import torch
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    dev = torch.device("cuda")
    torch.cuda.init()
    peak = GpuPeak(torch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(dev)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora_dtypes = sorted({str(p.dtype) for p in params})
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def step(s):
        ids = batch(s, args.micro_batch, args.seq_len, torch, dev)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        v = loss.item()
        torch.cuda.synchronize()
        return v

    losses, step_secs = [], []
    for s in range(args.warmup):
        losses.append(step(s))
    for s in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(s))
        step_secs.append(time.perf_counter() - t0)
    peak_mb = peak.finish()
    out = {
        "impl": "pytorch-peft",
        "device": torch.cuda.get_device_name(0),
        "tokens_per_s": args.micro_batch * args.seq_len * args.steps / sum(step_secs),
        "peak_gpu_mb": peak_mb,
        "torch_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "rank": args.rank,
        "loss": losses[-1],
        "losses": losses,
        "step_secs": step_secs,
        "lora_dtypes": lora_dtypes,
        "attn_implementation": model.base_model.model.config._attn_implementation,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"pytorch-peft: {out['tokens_per_s']:.0f} tokens/s, peak GPU {peak_mb:.0f} MB, "
              f"losses {', '.join(f'{x:.4f}' for x in losses)}, LoRA dtypes {lora_dtypes}")


if __name__ == "__main__":
    main()
