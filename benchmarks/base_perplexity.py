"""Held-out perplexity of a causal LM per domain: is a base model worse on the target domains than on its own?

    python benchmarks/base_perplexity.py --model runs/base-general/lm/model --data-root ../shared/data \
        --domains code,biology,medical,chemistry --out benchmarks/results/base_general.json

Texts are the positives of each domain's test-split queries (`lbr eval`'s test sets, sample seed 0): a base
pre-trained with `lbr train --stage lm` on a domain never saw them (the mixture leaves out dev/test positives).
Each text is cut at --seq-len tokens. Reported per domain: mean loss per token, perplexity, bits per UTF-8 byte
(comparable across domains, whose texts the tokenizer splits into different numbers of tokens) and tokens per byte.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lbr_ray.eval.sets import build_eval_set


def domain_texts(data_root: str, domain: str, n: int) -> list[str]:
    eset = build_eval_set(data_root, domain, max_queries=n, seed=0)
    rows = sorted({int(j) for q in eset.qrels for j in q})
    return [eset.doc_texts[j] for j in rows][:n]


@torch.no_grad()
def perplexity(model, tok, texts: list[str], seq_len: int, batch: int = 16) -> dict:
    nats, tokens, nbytes = 0.0, 0, 0
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        enc = tok(chunk, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        nats += float(loss[keep].sum())
        tokens += int(keep.sum())
        # the bytes the scored tokens cover: the decoded text of each kept row without its first token
        nbytes += sum(len(tok.decode(row[m][1:], skip_special_tokens=True).encode("utf-8"))
                      for row, m in zip(ids, mask.bool()))
    return {"texts": len(texts), "tokens": tokens, "bytes": nbytes, "loss": nats / tokens,
            "perplexity": math.exp(nats / tokens), "bits_per_byte": nats / math.log(2) / nbytes,
            "tokens_per_byte": tokens / nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--domains", default="code,biology,medical,chemistry")
    ap.add_argument("--texts", type=int, default=400, help="test positives per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    t = time.time()
    doc = {"model": args.model, "params": sum(p.numel() for p in model.parameters()), "seq_len": args.seq_len,
           "data_root": args.data_root, "domains": {}}
    for domain in args.domains.split(","):
        doc["domains"][domain] = perplexity(model, tok, domain_texts(args.data_root, domain, args.texts), args.seq_len)
        r = doc["domains"][domain]
        print(f"{domain:10s} texts {r['texts']:4d}  loss {r['loss']:.3f}  ppl {r['perplexity']:8.1f}  "
              f"bits/byte {r['bits_per_byte']:.3f}  tokens/byte {r['tokens_per_byte']:.3f}", flush=True)
    doc["wall_s"] = time.time() - t
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
