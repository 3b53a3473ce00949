#!/usr/bin/env python3
"""Score a model's answers to the learning benchmark's questions.

A reply is right when it contains ANY of the question's `expect` strings
(case-insensitive). Two question sets, next to this file:

  persona_heldout.jsonl  facts of the fictional shop, asked in phrasings not in training
  general.jsonl          general knowledge the base model answers right (forgetting check)

Usage:
  score.py eval-data OUT.jsonl
      Write both sets as OpenAI chat JSONL (the reference answer is the first expect
      string) for `loraloop evaluate --compare --samples N --json`.
  score.py score RESULT [--side adapter|base] [--show] [--label TEXT] [--extra JSON]
      RESULT: the JSON `loraloop evaluate --compare --json` prints (its "samples"; --side
      picks the base or the adapter replies), `loraloop chat --json` output (one
      {"prompt", "reply"} per line), or {"answers": {question: reply}} as peft_learn.py
      writes. Prints one JSON line {"facts", "facts_of", "general", "general_of", ...};
      --show also prints every question with its reply and verdict (to stderr).
  score.py table RESULTS.jsonl...
      A markdown table of score lines (each with "label" and "seed"), then the mean of
      each label over its seeds.
Plain Python 3, no dependencies.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HELDOUT = os.path.join(HERE, "persona_heldout.jsonl")
GENERAL = os.path.join(HERE, "general.jsonl")


def load_questions(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_right(reply, expect):
    r = (reply or "").lower()
    return any(e.lower() in r for e in expect)


def score(answers, heldout=None, general=None, show=False, out=sys.stderr):
    """answers: {question: reply}. Returns the counts; a missing answer counts as wrong."""
    heldout = load_questions(HELDOUT) if heldout is None else heldout
    general = load_questions(GENERAL) if general is None else general
    res = {}
    for name, qs in (("facts", heldout), ("general", general)):
        right, missing, wrong = 0, 0, []
        for q in qs:
            reply = answers.get(q["question"])
            if reply is None:
                missing += 1
            ok = reply is not None and is_right(reply, q["expect"])
            right += ok
            if not ok:
                wrong.append(q["question"])
            if show:
                mark = "ok " if ok else ("-- " if reply is not None else "?? ")
                one_line = (reply or "(no answer)").replace("\n", " ")
                print(f"{mark}[{name}] {q['question']}\n      -> {one_line}", file=out)
        res[name] = right
        res[name + "_of"] = len(qs)
        if missing:
            res[name + "_missing"] = missing
        res[name + "_wrong"] = wrong
    return res


def answers_from(result, side="adapter"):
    """{question: reply} from loraloop evaluate's JSON or peft_learn.py's answers file."""
    if "answers" in result:
        return dict(result["answers"])
    return {s["prompt"]: s[side] for s in result.get("samples", [])}


def read_answers(path, side="adapter"):
    """{question: reply} from any of: `loraloop evaluate --compare --json` output (its last
    JSON line), peft_learn.py's {"answers": ...} file, or `loraloop chat --json` output
    (one {"prompt", "reply"} object per line; other lines are ignored)."""
    with open(path) as f:
        text = f.read()
    objs = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if not objs:
        objs = [json.loads(text)]
    if any("reply" in o and "prompt" in o for o in objs):
        return {o["prompt"]: o["reply"] for o in objs if "reply" in o and "prompt" in o}
    return answers_from(objs[-1], side)


def table(rows, out=sys.stdout):
    """Markdown table: one row per result line, then the mean of each setting over its seeds."""
    def cell(r, k):
        return f"{r[k]}/{r[k + '_of']}"

    print("| setting | seed | facts right | general right | train s |", file=out)
    print("| --- | --- | --- | --- | --- |", file=out)
    order = []
    for r in rows:
        if r.get("label") not in order:
            order.append(r.get("label"))
    for r in rows:
        t = r.get("train_s")
        print(f"| {r.get('label')} | {r.get('seed', '-')} | {cell(r, 'facts')} | {cell(r, 'general')} | "
              f"{'' if t is None else round(t)} |", file=out)
    print(file=out)
    print("| setting | runs | mean facts right | mean general right (% of base-correct) |", file=out)
    print("| --- | --- | --- | --- |", file=out)
    for label in order:
        rs = [r for r in rows if r.get("label") == label]
        f = sum(r["facts"] for r in rs) / len(rs)
        g = sum(r["general"] for r in rs) / len(rs)
        pct = 100 * sum(r["general"] / r["general_of"] for r in rs) / len(rs)
        fo = {r["facts_of"] for r in rs}
        go = {r["general_of"] for r in rs}
        fo = fo.pop() if len(fo) == 1 else "(mixed)"
        go = go.pop() if len(go) == 1 else "(mixed)"
        print(f"| {label} | {len(rs)} | {f:.1f}/{fo} | {g:.1f}/{go} ({pct:.0f}%) |", file=out)


def write_eval_data(path):
    with open(path, "w") as f:
        for q in load_questions(HELDOUT) + load_questions(GENERAL):
            msgs = [
                {"role": "user", "content": q["question"]},
                {"role": "assistant", "content": q["expect"][0]},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return len(load_questions(HELDOUT)) + len(load_questions(GENERAL))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval-data")
    e.add_argument("out")
    s = sub.add_parser("score")
    s.add_argument("result")
    s.add_argument("--side", default="adapter", choices=["adapter", "base"])
    s.add_argument("--show", action="store_true")
    s.add_argument("--label", default=None)
    s.add_argument("--extra", default=None, help="a JSON object merged into the output line")
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+", help="JSONL files of score lines (run.sh's results.jsonl)")
    a = p.parse_args()
    if a.cmd == "eval-data":
        print(write_eval_data(a.out))
        return
    if a.cmd == "table":
        rows = []
        for path in a.results:
            with open(path) as f:
                rows += [json.loads(l) for l in f if l.startswith("{")]
        table(rows)
        return
    res = score(read_answers(a.result, a.side), show=a.show)
    if a.label is not None:
        res = {"label": a.label, **res}
    if a.extra:
        res.update(json.loads(a.extra))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
