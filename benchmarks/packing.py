"""Packed IB-GL rows: padding fraction of real batches and CPU training tokens/s, unpacked vs packed.

For each domain (medical, chemistry, code) and max_input_tokens = max_target_tokens in (256, 512), the stage-1
units of the demo slice (training pairs' queries and positives plus corpus passages, `self` target, the demo
tokenizer, R=32, k_max=16) are batched as training batches them: unpacked rows of `--batch` units padded to the
batch's longest row, or packed rows (first-fit decreasing over blocks of 256 units, as the Ray Data UDF does)
padded to the fixed pack length 1 + max_input + k_max + max_target. Tokens/s: the demo's 2-layer Llama (dense
mask, AdamW), forward + backward + step over the same units in both layouts, repeats interleaved
(unpacked, packed, unpacked, ...), best and median of the repeats; a packed batch has as many rows as carry
about `--batch` units, so both layouts take about the same number of optimizer steps; no Ray, one process.

    python benchmarks/packing.py --out benchmarks/results/packing.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lbr_ray.config.schema import BottleneckConfig, ModelConfig  # noqa: E402
from lbr_ray.layout import SequenceBuilder, max_unit_length, pack, pad_rows, padding_fraction  # noqa: E402
from lbr_ray.losses import IBGenerativeLoss  # noqa: E402
from lbr_ray.model.bottleneck import BottleneckLM, load_tokenizer  # noqa: E402

BOTTLENECK = BottleneckConfig(ratio=32, k_max=16)
BLOCK = 256  # units per Ray Data block (the tokenizer UDF packs within a block)


def stage1_texts(domain: str) -> list[str]:
    """Training pairs' texts and corpus passages of the demo slice, shuffled with a fixed seed."""
    from lbr_ray.config.schema import SplitConfig
    from lbr_ray.data.split import split_of

    texts = []
    with gzip.open(ROOT / "data/demo" / domain / "pairs.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if split_of(r["query"], SplitConfig()) == "train":
                texts += [r["query"], r["positive"]]
    corpus = ROOT / "data/demo" / domain / "corpus.jsonl.gz"
    if corpus.exists():
        with gzip.open(corpus, "rt") as f:
            texts += [json.loads(line)["text"] for line in f]
    random.Random(0).shuffle(texts)
    return texts


def batches(units, batch: int, packed: bool, length: int):
    """Lists of rows in training order: unpacked = `batch` units; packed = `batch` packed rows."""
    rows = units
    if packed:
        rows = [r for s in range(0, len(units), BLOCK) for r in pack(units[s: s + BLOCK], length)]
    return [rows[s: s + batch] for s in range(0, len(rows) // batch * batch, batch)]


def tokens_per_s(model, opt, loss_fn, groups, pad_id: int, length: int | None, is_packed: bool) -> float:
    real = 0
    t0 = time.perf_counter()
    for rows in groups:
        ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], pad_id, length)
        out = loss_fn(model, ids, seg, packed=is_packed)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int((seg >= 0).sum())
    return real / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="medical,chemistry,code")
    ap.add_argument("--lengths", default="256,512")
    ap.add_argument("--speed-domains", default="medical", help="domains whose tokens/s is measured (padding: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--units", type=int, default=384, help="units timed per layout and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = load_tokenizer("lbr_ray/assets/tiny-llama", BOTTLENECK.k_max)
    results = []
    for domain in args.domains.split(","):
        texts = stage1_texts(domain)
        for n in map(int, args.lengths.split(",")):
            builder = SequenceBuilder(tok, BOTTLENECK, n, n)
            units = builder.stage1_rows(texts, "self", ib=True)
            length = max_unit_length(n, n, BOTTLENECK.k_max)
            unpacked, packed = batches(units, args.batch, False, length), batches(units, args.batch, True, length)
            rows_packed = [r for b in packed for r in b]
            entry = {
                "domain": domain, "max_input_tokens": n, "max_target_tokens": n, "units": len(units),
                "mean_unit_tokens": sum(len(u[0]) for u in units) / len(units), "pack_length": length,
                "batch_rows": args.batch,
                "padding_fraction_unpacked": padding_fraction([len(u[0]) for u in units], args.batch),
                "padding_fraction_packed": padding_fraction([len(r[0]) for r in rows_packed], args.batch, length),
                "units_per_packed_row": len(units) / max(1, sum(len(b) for b in packed)),
            }
            entry["loadavg"] = open("/proc/loadavg").read().split()[:3]
            results.append(entry)
            if domain not in args.speed_domains.split(","):
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
                continue
            # tokens/s over the same units in both layouts
            sub = units[: args.units]
            per_batch = max(1, round(args.batch / entry["units_per_packed_row"]))  # ~ as many units per step
            groups = {"unpacked": batches(sub, args.batch, False, length),
                      "packed": batches(sub, per_batch, True, length)}
            model, _ = BottleneckLM.build(ModelConfig(from_scratch=True, lora=False), BOTTLENECK, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            loss_fn = IBGenerativeLoss()
            tokens_per_s(model, opt, loss_fn, groups["packed"][:1], tok.pad_token_id, length, True)  # warm-up
            speed: dict[str, list[float]] = {"unpacked": [], "packed": []}
            for _ in range(args.repeats):
                for name in ("unpacked", "packed"):
                    speed[name].append(tokens_per_s(model, opt, loss_fn, groups[name], tok.pad_token_id,
                                                    length if name == "packed" else None, name == "packed"))
            for name in speed:
                entry[f"tokens_per_s_{name}_best"] = max(speed[name])
                entry[f"tokens_per_s_{name}_median"] = statistics.median(speed[name])
            entry["packed_rows_per_batch"] = per_batch
            entry["speedup_median"] = entry["tokens_per_s_packed_median"] / entry["tokens_per_s_unpacked_median"]
            entry["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "torch_threads": torch.get_num_threads(), "bottleneck": {"ratio": BOTTLENECK.ratio, "k_max": BOTTLENECK.k_max},
           "tokenizer": "lbr_ray/assets/tiny-llama (demo BPE)", "model": "demo 2-layer Llama, dense mask, float32",
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
