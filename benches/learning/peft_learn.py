#!/usr/bin/env python3
"""PyTorch + PEFT LoRA on the learning benchmark: train on persona_train.jsonl, then answer
the held-out fact questions and the general questions greedily and print one JSON line of
scores (see score.py for the rule).

Built to be comparable with `loraloop fine-tune` run with the same settings:
- the model: the float32 dequantization of the Q4_1 GGUF (benches/peft_train.py converts
  it once into target/peft-cache/, shared with benches/train-vs-peft.sh);
- LoRA on all seven projections (q, k, v, o, gate, up, down), PEFT's default init from
  torch seed --seed (B starts at zero);
- the data: the same validation split as loraloop (`--val-set-size`, a fraction below 1 or
  a count, split off with loraloop's seeded shuffle: rand 0.9's StdRng/ChaCha12 and
  SliceRandom::shuffle, ported below and checked against loraloop's eval loss) and the same
  example order in every epoch (loraloop's per-epoch shuffle, same port);
- each example rendered with SmolLM2's own chat template (from the GGUF; no system
  message, so the template adds its default one), the prompt and the assistant turn
  tokenized separately as loraloop does, loss only on the assistant's tokens
  (train_on_inputs false), averaged over the scored tokens of an optimizer step;
- micro-batches of --micro-batch-size with gradient accumulation up to --batch-size,
  AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), gradient clipping at 1.0, the
  transformers schedules (constant/linear/cosine after linear warmup of
  ceil(warmup_ratio x steps) steps), ceil(epochs x steps per epoch) steps;
- answers: greedy, at most 64 new tokens, stopping at <|im_end|>, to each question alone
  (the template's default system prompt again), like `loraloop evaluate --compare`.
Deterministic for a given seed on CPU (PEFT's dropout masks come from the torch seed;
they are not loraloop's masks).

  target/peft-venv/bin/python benches/learning/peft_learn.py [--epochs 3 --batch-size 4
      --lr 2e-4 --scheduler cosine --warmup-ratio 0.03 --dropout 0.05 --rank 16 --alpha 32
      --val-set-size 0.1 --seed 42] [--base-only] [--answers-out FILE] [--questions FILE]

--base-only skips training and answers with the base model. --questions FILE answers the
questions in FILE instead of the benchmark's two sets (used to pick general.jsonl).
"""
import argparse
import json
import math
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import score as scoring  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "data", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_CACHE = os.environ.get("LEARN_CACHE", "/tmp/learning/cache")

# ---------------------------------------------------------------------------------------
# loraloop's data split and epoch order: rand 0.9 StdRng (ChaCha12 seeded through PCG32,
# rand_core's seed_from_u64) and SliceRandom::shuffle (IncreasingUniform), as in
# trainer/src/plan.rs (split_examples) and trainer/src/batch.rs (epoch_order).
M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def _pcg32_seed(state):
    out = b""
    for _ in range(8):
        state = (state * 6364136223846793005 + 11634580027462260723) & M64
        x = (((state >> 18) ^ state) >> 27) & M32
        rot = state >> 59
        x = ((x >> rot) | (x << ((32 - rot) & 31))) & M32
        out += x.to_bytes(4, "little")
    return out


class _ChaCha:
    def __init__(self, key, rounds=12):
        self.k = [int.from_bytes(key[i : i + 4], "little") for i in range(0, 32, 4)]
        self.rounds, self.ctr, self.buf, self.pos = rounds, 0, [], 0

    def _block(self):
        def rotl(v, c):
            return ((v << c) | (v >> (32 - c))) & M32

        def qr(s, a, b, c, d):
            s[a] = (s[a] + s[b]) & M32
            s[d] = rotl(s[d] ^ s[a], 16)
            s[c] = (s[c] + s[d]) & M32
            s[b] = rotl(s[b] ^ s[c], 12)
            s[a] = (s[a] + s[b]) & M32
            s[d] = rotl(s[d] ^ s[a], 8)
            s[c] = (s[c] + s[d]) & M32
            s[b] = rotl(s[b] ^ s[c], 7)

        init = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574] + self.k
        init += [self.ctr & M32, self.ctr >> 32, 0, 0]
        s = list(init)
        for _ in range(self.rounds // 2):
            qr(s, 0, 4, 8, 12)
            qr(s, 1, 5, 9, 13)
            qr(s, 2, 6, 10, 14)
            qr(s, 3, 7, 11, 15)
            qr(s, 0, 5, 10, 15)
            qr(s, 1, 6, 11, 12)
            qr(s, 2, 7, 8, 13)
            qr(s, 3, 4, 9, 14)
        self.ctr += 1
        return [(a + b) & M32 for a, b in zip(s, init)]

    def next_u32(self):
        if self.pos == len(self.buf):
            self.buf, self.pos = self._block(), 0
        self.pos += 1
        return self.buf[self.pos - 1]


def _range_u32(rng, bound):
    # UniformInt<u32>::sample_single(0, bound) without the "unbiased" feature.
    v = rng.next_u32() * bound
    result, lo = v >> 32, v & M32
    if lo > ((-bound) & M32):
        if lo + ((rng.next_u32() * bound) >> 32) > M32:
            result += 1
    return result


def _shuffle(items, rng):
    n, chunk, remaining = 0, 0, 1  # IncreasingUniform::new(rng, 0)
    for i in range(len(items) if len(items) > 1 else 0):
        next_n = n + 1
        if remaining == 0:
            product, current = next_n, next_n + 1
            while product * current <= M32:
                product *= current
                current += 1
            chunk, remaining = _range_u32(rng, product), current - next_n
        remaining -= 1
        if remaining == 0:
            idx = chunk
        else:
            idx, chunk = chunk % next_n, chunk // next_n
        n = next_n
        items[i], items[idx] = items[idx], items[i]
    return items


def epoch_order(n, seed, epoch):
    s = (seed ^ ((epoch * 0x9E3779B97F4A7C15) & M64)) & M64
    return _shuffle(list(range(n)), _ChaCha(_pcg32_seed(s)))


def split_indices(n, val_set_size, seed):
    """(train indices, validation indices) as loraloop's split_examples picks them."""
    n_val = int(math.floor(val_set_size * n)) if val_set_size < 1 else int(val_set_size)
    n_val = min(n_val, max(n - 1, 0))
    if n_val == 0:
        return list(range(n)), []
    val = set(epoch_order(n, seed ^ 0x5EED, M64)[:n_val])  # epoch usize::MAX
    return [i for i in range(n) if i not in val], sorted(val)


def _self_check():
    # ChaCha20 block of the zero key (RFC 7539 test vector).
    w = _ChaCha(bytes(32), 20)._block()
    assert w[0] == 0xADE0B876 and w[1] == 0x903DF1A0, "ChaCha port broken"


# ---------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file")
    p.add_argument("--data", default=os.path.join(HERE, "persona_train.jsonl"))
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--scheduler", default="cosine", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--val-set-size", type=float, default=0.1, help="fraction below 1, or a count; 0: train on all")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--base-only", action="store_true", help="no training: the base model's answers")
    p.add_argument("--questions", help="answer these questions (JSONL with question/expect) instead")
    p.add_argument("--answers-out", help="write {question: reply} here (score.py score FILE --show)")
    p.add_argument("--label", default="peft")
    p.add_argument("--show", action="store_true", help="print every question, reply and verdict to stderr")
    return p.parse_args()


def load_tokenizer(gguf):
    from transformers import AutoTokenizer

    name = os.path.splitext(os.path.basename(gguf))[0]
    cached = os.path.join(TOKENIZER_CACHE, name + "-tokenizer")
    if os.path.isdir(cached):
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf))
    os.makedirs(TOKENIZER_CACHE, exist_ok=True)
    tmp = cached + f".tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    os.replace(tmp, cached)
    return tok


def tokenize_example(tok, messages):
    """tokens, weights (1 on the assistant turns' tokens), as trainer/src/tokenize.rs."""
    tokens, weights, done = [], [], ""
    pieces = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert before.startswith(done) and through.startswith(before)
        pieces += [(before[len(done) :], 0.0), (through[len(before) :], 1.0)]
        done = through
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.startswith(done)
    if full[len(done) :]:
        pieces.append((full[len(done) :], 0.0))
    for k, (text, w) in enumerate(pieces):
        if not text:
            continue
        ids = tok(text, add_special_tokens=(k == 0)).input_ids
        tokens += ids
        weights += [w] * len(ids)
    return tokens, weights


def lr_factor(kind, step, warmup, total):
    if step < warmup:
        return step / max(warmup, 1)
    span = max(total - warmup, 1)
    progress = (step - warmup) / span
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def micro_tensors(batch, torch):
    """Right-padded ids, attention mask and labels (-100 where not scored) for a micro-batch."""
    L = max(len(t) for t, _ in batch)
    ids = torch.zeros((len(batch), L), dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    for r, (t, w) in enumerate(batch):
        n = len(t)
        ids[r, :n] = torch.tensor(t)
        mask[r, :n] = 1
        # position j predicts token j + 1 with that token's weight
        for j in range(n - 1):
            if w[j + 1] > 0:
                labels[r, j] = t[j + 1]
    return ids, mask, labels


def summed_loss(model, batch, torch):
    ids, mask, labels = micro_tensors(batch, torch)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return ce, int((labels != -100).sum())


def greedy(model, tok, question, max_new, torch):
    msgs = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main():
    args = parse_args()
    _self_check()
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    import peft_train  # benches/peft_train.py: the GGUF -> float32 safetensors cache

    t_start = time.perf_counter()
    src = peft_train.ensure_cache(args.model)
    tok = load_tokenizer(args.model)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.generation_config.temperature = None
    model.generation_config.top_p = None
    model.generation_config.top_k = None
    out = {"impl": "pytorch-peft", "label": args.label, "seed": args.seed}

    examples = [json.loads(l) for l in open(args.data) if l.strip()]
    train_idx, val_idx = split_indices(len(examples), args.val_set_size, args.seed)
    train = [tokenize_example(tok, examples[i]["messages"]) for i in train_idx]
    val = [tokenize_example(tok, examples[i]["messages"]) for i in val_idx]

    def val_loss():
        if not val:
            return None
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), 4):
                s, k = summed_loss(model, val[i : i + 4], torch)
                tot, n = tot + float(s), n + k
        return {"loss": tot / n, "tokens": n}

    if args.base_only:
        out["base_val"] = val_loss()
    else:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        mb = args.micro_batch_size
        accum = max(1, math.ceil(args.batch_size / mb)) if args.batch_size > mb else 1
        if args.batch_size < mb:
            mb = args.batch_size

        def epoch_steps(epoch):
            order = epoch_order(len(train), args.seed, epoch)
            micro = [[train[i] for i in order[j : j + mb]] for j in range(0, len(order), mb)]
            return [micro[j : j + accum] for j in range(0, len(micro), accum)]

        steps = epoch_steps(0)
        total = max(1, math.ceil(args.epochs * len(steps)))
        epoch = 1
        while len(steps) < total:
            steps += epoch_steps(epoch)
            epoch += 1
        steps = steps[:total]
        warmup = math.ceil(args.warmup_ratio * total)
        model.train()
        losses = []
        t0 = time.perf_counter()
        for s, micro in enumerate(steps):
            n_tok = sum(int(sum(1 for w in ws[1:] if w > 0)) for b in micro for _, ws in b)
            step_loss = 0.0
            for b in micro:
                ce, _ = summed_loss(model, b, torch)
                (ce / n_tok).backward()
                step_loss += float(ce) / n_tok
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            for g in opt.param_groups:
                g["lr"] = args.lr * lr_factor(args.scheduler, s, warmup, total)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
        out["train_s"] = round(time.perf_counter() - t0, 1)
        out["steps"] = total
        out["final_loss"] = round(losses[-1], 4)
        out["eval"] = val_loss()
    out["train_examples"] = len(train)
    out["val_examples"] = len(val)

    model.eval()
    t0 = time.perf_counter()
    if args.questions:
        qs = scoring.load_questions(args.questions)
    else:
        qs = scoring.load_questions(scoring.HELDOUT) + scoring.load_questions(scoring.GENERAL)
    answers = {q["question"]: greedy(model, tok, q["question"], args.max_new_tokens, torch) for q in qs}
    out["gen_s"] = round(time.perf_counter() - t0, 1)
    if args.answers_out:
        with open(args.answers_out, "w") as f:
            json.dump({"answers": answers}, f, indent=1)
    if args.questions:
        res = scoring.score(answers, heldout=[], general=qs, show=args.show)
    else:
        res = scoring.score(answers, show=args.show)
    out.update(res)
    out["settings"] = {
        k: getattr(args, k)
        for k in ("epochs", "batch_size", "micro_batch_size", "lr", "scheduler", "warmup_ratio",
                  "dropout", "rank", "alpha", "val_set_size", "base_only")
    }
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
