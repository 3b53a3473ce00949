"""The PyTorch + transformers side of benches/classify-vs-transformers.sh: the same
classifier loraloop trains (all-MiniLM-L6-v2, mean pooling over the attention mask,
dropout 0.1, a linear head), the same data, order-independent settings (AdamW, lr with
linear decay, weight decay 0.01 except biases and LayerNorm weights, clipping at 1.0,
batch size, max length, epochs), then accuracy and macro-F1 on the test file.

    python classify_torch.py MODEL_DIR TRAIN.jsonl TEST.jsonl EPOCHS BATCH LR MAX_LEN THREADS [GRAD_CKPT]
GRAD_CKPT 1 turns on transformers' gradient checkpointing.
Prints one JSON line: train_seconds, accuracy, macro_f1, examples.
"""
import json, sys, time
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

model_dir, train_path, test_path = sys.argv[1:4]
epochs, batch, lr, max_len, threads = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
torch.set_num_threads(threads)
torch.manual_seed(42)

def read(p):
    rows = [json.loads(l) for l in open(p) if l.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]

tx, ty = read(train_path)
vx, vy = read(test_path)
labels = sorted(set(ty) | set(vy))
tyi = torch.tensor([labels.index(y) for y in ty])
vyi = [labels.index(y) for y in vy]
tok = AutoTokenizer.from_pretrained(model_dir)
enc = AutoModel.from_pretrained(model_dir)
if len(sys.argv) > 9 and sys.argv[9] == "1":
    enc.gradient_checkpointing_enable()

class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = enc
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(enc.config.hidden_size, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, **b):
        h = self.enc(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return self.head(self.drop((h * m).sum(1) / m.sum(1).clamp(min=1e-9)))

model = Clf()
decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
steps = epochs * ((len(tx) + batch - 1) // batch)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
start = time.time()
model.train()
for epoch in range(epochs):
    order = torch.randperm(len(tx)).tolist()
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        b = tok([tx[j] for j in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        loss = nn.functional.cross_entropy(model(**b), tyi[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
train_seconds = time.time() - start
model.eval()
pred = []
with torch.no_grad():
    for i in range(0, len(vx), 64):
        b = tok(vx[i:i + 64], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        pred += model(**b).argmax(-1).tolist()
acc = sum(p == t for p, t in zip(pred, vyi)) / len(vyi)
f1s = []
for c in range(len(labels)):
    tp = sum(p == c and t == c for p, t in zip(pred, vyi))
    fp = sum(p == c and t != c for p, t in zip(pred, vyi))
    fn = sum(p != c and t == c for p, t in zip(pred, vyi))
    pr = tp / (tp + fp) if tp + fp else 0.0
    rc = tp / (tp + fn) if tp + fn else 0.0
    f1s.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
print(json.dumps({"train_seconds": train_seconds, "accuracy": acc, "macro_f1": sum(f1s) / len(f1s), "examples": len(vyi)}))
