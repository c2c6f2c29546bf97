"""CPU speed of a real model, today's path vs the fast one, side by side in one process (issue 22).

Each setting runs the stages' own objectives (IBGLObjective / GRCLObjective: forward + backward, LoRA) and the
eval's Encoder on the same real rows (the target's pairs and corpus through the stages' tokenizer UDFs), settings
interleaved round by round. Time is CPU seconds of this process on one torch thread (`time.process_time`): a
2-worker run gives each worker one core and one thread, and CPU time, unlike wall time, does not grow when other
jobs share the machine. Figures are real (non-padding) tokens, or passages, per CPU second: one worker's rate.

    python benchmarks/cpu_speed.py --model models/smollm2-135m --data ../shared/data/medical \
        --out benchmarks/results/cpu_speed.json

Factors: fp32 vs bf16 compute (DeepSpeed's `deepspeed.bf16` casts the model to bf16; emulated here by casting),
IB-GL rows unpacked vs packed (`ib_gl.pack`), GR-CL batches as they come vs length-grouped (`gr_cl.length_groups`),
LoRA dropout 0.05 vs 0 (the CPU's bernoulli sampling is slow), the 2-D padding mask on causal rows vs none (GR-CL
and eval embeddings; `PaddingMaskLM` keeps the old path), SDPA vs eager attention; eval batch sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from lbr_ray.config import load_config, replace, to_dict
from lbr_ray.data import ray_data
from lbr_ray.layout import PAD, collate_columns, length_groups, max_unit_length, pack
from lbr_ray.model.bottleneck import BottleneckLM
from lbr_ray.model.encoder import Encoder
from lbr_ray.recipes.gr_cl import GRCLObjective
from lbr_ray.recipes.ib_gl import IBGLObjective

TRAIN = {  # name -> (dtype, packed IB-GL rows, length-grouped GR-CL, lora_dropout, attention, padding mask)
    "before: fp32, unpacked, dropout 0.05, sdpa, padding mask": ("float32", False, False, 0.05, "sdpa", True),
    "bf16 only": ("bfloat16", False, False, 0.05, "sdpa", True),
    "packed / grouped only": ("float32", True, True, 0.05, "sdpa", True),
    "dropout 0 only": ("float32", False, False, 0.0, "sdpa", True),
    "no padding mask only": ("float32", False, False, 0.05, "sdpa", False),
    "after: bf16, packed / grouped, dropout 0, no padding mask, sdpa": ("bfloat16", True, True, 0.0, "sdpa", False),
    "after, eager attention": ("bfloat16", True, True, 0.0, "eager", False),
}
EVAL = {"before: fp32, batch 64, padding mask": ("float32", 64, True), "bf16, batch 16": ("bfloat16", 16, False),
        "bf16, batch 32": ("bfloat16", 32, False), "bf16, batch 64": ("bfloat16", 64, False),
        "bf16, batch 128": ("bfloat16", 128, False)}


class PaddingMaskLM(BottleneckLM):
    """Today's path before issue 22: unpacked causal rows (GR-CL's embeddings, eval) ran with a 2-D padding mask,
    which sends SDPA and eager attention down their masked kernels (the same states: tests/unit/test_masks.py)."""

    def hidden(self, ids, seg, ib=True, packed=False):
        if not ib and not packed:
            mask = (seg != PAD).long()
            return self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return super().hidden(ids, seg, ib, packed)


def config(args, dropout: float):
    return load_config(args.config, [f"model.name={args.model}", "model.from_scratch=false", "model.lora=true",
                                     f"model.lora_dropout={dropout}", f"data.pairs=[{args.data}]",
                                     f"data.corpus=[{args.data}]"])


def build(cfg, dtype: str, attn: str, padding_mask: bool = False):
    torch.manual_seed(0)
    model, tok = BottleneckLM.build(replace(cfg, model={"attn_implementation": attn}).model, cfg.bottleneck, seed=0)
    if padding_mask:
        model = PaddingMaskLM(model.lm, model.bottleneck_ids, model.backend, model.sink)
    return model.to(getattr(torch, dtype)), tok


def rows(args, cfg):
    """Stage-1 units and stage-2 pairs of the target's training split, the stages' own tokenizer UDFs."""
    pairs = ray_data._local_pairs(cfg, "train")  # noqa: SLF001
    pick = np.random.default_rng(0).permutation(len(pairs))[: args.pairs]
    batch = ray_data.as_batch([pairs[i] for i in pick])
    stage1 = ray_data.TokenizeStage1(to_dict(replace(cfg, ib_gl={"pack": False})))  # units, one per text
    texts = [{"text": t} for i in pick for t in (pairs[i]["query"], pairs[i]["positive"])]
    units = stage1(ray_data.as_batch(texts))
    stage2 = ray_data.TokenizeStage2(to_dict(cfg), cfg.model.name)(batch)
    return list(zip(units["ib_ids"], units["ib_seg"])), stage2, [pairs[i]["positive"] for i in pick]


def ib_batches(units, packed: bool, batch_size: int, length: int, pad_id: int):
    units = [(list(i), list(s)) for i, s in units]
    units = pack(units, length) if packed else units
    units = [units[i] for i in np.random.default_rng(0).permutation(len(units))]  # as the stream comes: shuffled
    out = []
    for s in range(0, len(units) - batch_size + 1, batch_size):
        chunk = units[s: s + batch_size]
        out.append(collate_columns({"ib_ids": [np.array(r[0]) for r in chunk], "ib_seg": [np.array(r[1]) for r in chunk]},
                                   ["ib"], pad_id, length if packed else None))
    return out


def cl_batches(stage2: dict, grouped: bool, batch_size: int, groups: int, pad_id: int):
    n = len(stage2["q_ids"])
    if grouped:
        lengths = np.array([(len(q), len(p)) for q, p in zip(stage2["q_ids"], stage2["p_ids"])])
        idx = [b for s in range(0, n, batch_size * groups)
               for b in length_groups(lengths[s: s + batch_size * groups], batch_size, np.random.default_rng(0))
               for b in [b + s]]
    else:
        idx = [np.arange(s, s + batch_size) for s in range(0, n - batch_size + 1, batch_size)]
    return [collate_columns({k: v[i] for k, v in stage2.items()}, ["q", "p"], pad_id) for i in idx]


def step_rate(objective, batches) -> tuple[float, float]:
    """(real tokens, CPU seconds) of forward + backward over `batches`."""
    tokens, t0 = 0, time.process_time()
    for batch in batches:
        out = objective(batch)
        out["loss"].backward()
        objective.zero_grad(set_to_none=True)
        tokens += int(out["tokens"])
    return tokens, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--data", default="../shared/data/medical")
    ap.add_argument("--config", default="configs/smollm2-135m-medical.yaml")
    ap.add_argument("--pairs", type=int, default=64, help="training pairs sampled (stage-1 texts: 2 per pair); "
                    "each round runs all of them through every setting")
    ap.add_argument("--passages", type=int, default=256, help="passages encoded per eval setting per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["train", "eval"], default=None)
    ap.add_argument("--out", default="benchmarks/results/cpu_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg0 = config(args, 0.0)
    units, stage2, passages = rows(args, cfg0)
    b1, b2 = cfg0.ib_gl.batch_size, cfg0.gr_cl.batch_size
    length = max_unit_length(cfg0.data.max_input_tokens, cfg0.data.max_target_tokens, cfg0.bottleneck.k_max)
    result = {"command": "python benchmarks/cpu_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
              "load_average_before": list(os.getloadavg()), "model": args.model, "data": args.data,
              "ib_gl": {}, "gr_cl": {}, "eval": {}}
    if args.only != "eval":
        models = {}
        for name, (dtype, packed, grouped, dropout, attn, padding_mask) in TRAIN.items():
            cfg = config(args, dropout)
            model, tok = build(cfg, dtype, attn, padding_mask)
            pad = tok.pad_token_id
            models[name] = (IBGLObjective(model, 0.0, True, packed=packed), GRCLObjective(model, cfg),
                            ib_batches(units, packed, b1, length, pad), cl_batches(stage2, grouped, b2, 50, pad))
        for name, (ib, cl, ib_b, cl_b) in models.items():  # warm-up: first-call allocations, not recorded
            step_rate(ib, ib_b[:1]), step_rate(cl, cl_b[:1])
        for r in range(args.rounds):
            for name, (ib, cl, ib_b, cl_b) in models.items():
                for stage, obj, batches in (("ib_gl", ib, ib_b), ("gr_cl", cl, cl_b)):
                    tokens, cpu = step_rate(obj, batches)  # every setting: the same rows, its own batching
                    result[stage].setdefault(name, []).append(round(tokens / cpu, 1))
                    print(f"round {r} {stage:5s} {name}: {tokens / cpu:.1f} tokens per CPU second", flush=True)
        del models
    if args.only != "train":
        encoders = {}
        for name, (dtype, batch, padding_mask) in EVAL.items():
            model, tok = build(cfg0, dtype, "sdpa", padding_mask)
            encoders[name] = (Encoder(model, tok, cfg0.bottleneck, cfg0.data.max_input_tokens), batch)
        check = passages[: min(64, args.passages)]
        ref = next(iter(encoders.values()))[0].encode(check, 64)
        for enc, batch in encoders.values():  # warm-up
            enc.encode(check[:batch], batch)
        for r in range(args.rounds):
            for name, (enc, batch) in encoders.items():
                t0 = time.process_time()
                emb = enc.encode(passages[: args.passages], batch)
                rate = args.passages / (time.process_time() - t0)
                result["eval"].setdefault(name, []).append(round(rate, 2))
                if r == 0:
                    result["eval"].setdefault("cosine_to_fp32_min", {})[name] = round(
                        float((emb[: len(check)] * ref).sum(1).min()), 5)
                print(f"round {r} eval  {name}: {rate:.2f} passages per CPU second", flush=True)
    for stage in ("ib_gl", "gr_cl", "eval"):
        rates = {k: v for k, v in result[stage].items() if isinstance(v, list)}
        if rates:
            base = np.median(next(iter(rates.values())))
            result[stage]["speedup_vs_before_median"] = {k: round(float(np.median(v) / base), 2)
                                                         for k, v in rates.items()}
    result["load_average_after"] = list(os.getloadavg())
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({s: result[s].get("speedup_vs_before_median") for s in ("ib_gl", "gr_cl", "eval")}, indent=1))


if __name__ == "__main__":
    main()
