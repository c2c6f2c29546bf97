"""IB-mask backends: forward+backward time, tokens/s, MFU and peak memory (dense vs flex vs kv_split), unpacked and
packed rows, a bf16 IB-GL training step and a GR-CL step; runs without Ray/DeepSpeed (torch + transformers only).

`rows`: `--batch` rows of [sink][x: m][b: 4][y: m], m from 3/4 n to n (little padding). `packing`: units with m
from n/8 to n, `--batch` of them padded to the longest (`padded`) against `--batch` rows of the fixed length
1 + 2n + 4 holding as many of the same units as fit (`packed`, lbr_ray.layout.pack; kv_split refuses packed rows).
Tokens are non-padding tokens; MFU counts the model FLOPs of lbr's telemetry (lbr_ray/train/flops.py) against the
device's peak. Flex runs on CUDA only (FlexAttention has no CPU backward). Results are rewritten after every row.

    python benchmarks/attention.py --preset qwen0.5b --device cuda --out benchmarks/results/attention_gpu.json
    python benchmarks/attention.py --preset tiny --device cpu --out benchmarks/results/attention_cpu.json
    python benchmarks/attention.py --preset qwen0.5b --save-model DIR   # config + demo tokenizer for `lbr train`
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbr_ray.config.schema import BottleneckConfig  # noqa: E402
from lbr_ray.errors import MaskLeakError  # noqa: E402
from lbr_ray.layout import B, SINK, X, Y, max_unit_length, pack, pad_rows  # noqa: E402
from lbr_ray.losses import IBGenerativeLoss, InfoNCELoss  # noqa: E402
from lbr_ray.model.bottleneck import BottleneckLM  # noqa: E402
from lbr_ray.model.selfcheck import check_mask  # noqa: E402
from lbr_ray.train.flops import FlopCounter, device_peak_flops  # noqa: E402

PRESETS = {  # Qwen2.5-0.5B's shape with random weights; a tiny one for CPU smoke runs
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, lengths=(256, 512, 1024, 2048), batch=8),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, lengths=(64, 128), batch=4),
}


def qwen_config(preset: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**{k: v for k, v in preset.items() if k not in ("lengths", "batch")},
                       max_position_embeddings=8192, tie_word_embeddings=True)


def save_model(preset: dict, path: str) -> None:
    """A model folder `lbr train` builds with `model.from_scratch: true`: the preset's Qwen2 config and the demo
    tokenizer (lbr_ray/assets/tiny-llama; its ids cover the first 8,192 rows of the vocabulary)."""
    from transformers import AutoTokenizer

    qwen_config(preset).save_pretrained(path)
    tokenizer = Path(__file__).resolve().parents[1] / "lbr_ray" / "assets" / "tiny-llama"
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(path)


def make_model(preset: dict, backend: str, device, dtype):
    from transformers import AutoModelForCausalLM

    cfg = qwen_config(preset)
    attn = {"dense": "sdpa", "flex": "flex_attention", "kv_split": "sdpa"}[backend]
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn).to(device)
    b_ids = list(range(cfg.vocab_size - 16, cfg.vocab_size))
    return BottleneckLM(lm, b_ids, backend, sink=True)


def ib_batch(batch: int, n: int, k: int, vocab: int, device, b_ids):
    """Rows [sink][x: n][b: k][y: n] with mixed lengths (3/4 n .. n) to exercise padding."""
    g = torch.Generator().manual_seed(0)
    ids, segs = [], []
    for r in range(batch):
        m = n - (r % 4) * n // 16
        x = torch.randint(10, vocab - 32, (m,), generator=g).tolist()
        ids.append([1, *x, *b_ids[:k], *x])
        segs.append([SINK] + [X] * m + [B] * k + [Y] * m)
    out = pad_rows(ids, segs, 0)
    return out[0].to(device), out[1].to(device)


def packing_batches(batch: int, n: int, k: int, vocab: int, device, b_ids) -> dict:
    """Short units (m from n/8 to n): `batch` of them padded to the longest, and `batch` packed rows of the longest
    possible unit's length holding as many of the same units as fit."""
    g = torch.Generator().manual_seed(1)
    units = []
    for _ in range(8 * batch):
        m = int(torch.randint(max(1, n // 8), n + 1, (1,), generator=g))
        x = torch.randint(10, vocab - 32, (m,), generator=g).tolist()
        units.append(([1, *x, *b_ids[:k], *x], [SINK] + [X] * m + [B] * k + [Y] * m))
    length = max_unit_length(n, n, k)
    packed = pack(units, length)[:batch]
    out = {}
    for layout, rows, pad_to in (("padded", units[:batch], None), ("packed", packed, length)):
        ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], 0, pad_to)
        out[layout] = (ids.to(device), seg.to(device))
    return out


def timed(fn, device, repeats: int = 5):
    fn()  # warm-up (compiles flex)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - start) / repeats
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return sec, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default=None, help="input tokens n per row, comma-separated (default: the preset's)")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save-model", default=None, help="only write the preset as a model folder for `lbr train`")
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args()
    preset, device = PRESETS[args.preset], torch.device(args.device)
    if args.save_model:
        save_model(preset, args.save_model)
        return
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else preset["lengths"]
    batch = args.batch or preset["batch"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["dense", "kv_split"] + (["flex"] if device.type == "cuda" else [])
    peak = device_peak_flops(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    results = {"preset": args.preset, "device": name, "torch": torch.__version__, "dtype": str(dtype), "k": 4,
               "batch": batch, "peak_tflops": peak and peak / 1e12, "rows": [], "packing": []}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def record(key: str, row: dict) -> None:
        results[key].append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps(results, indent=2))

    loss_fn = IBGenerativeLoss()
    models = {b: make_model(preset, b, device, dtype) for b in backends}
    for b in backends[1:]:
        models[b].lm.load_state_dict(models["dense"].lm.state_dict())
    counter = FlopCounter(models["dense"])
    ids, seg = ib_batch(2, 32, 4, preset["vocab_size"], device, models["dense"].bottleneck_ids)
    results["self_check"] = {}
    for b, m in models.items():  # a backend failing its self-check is a result; its timings below still run
        try:
            results["self_check"][b] = check_mask(m, ids, seg)
        except MaskLeakError as e:
            results["self_check"][b] = {"error": str(e)}
    print(json.dumps(results["self_check"]), flush=True)

    def measure(model, ids, seg, packed: bool = False) -> dict:
        flops = []

        def step():
            out = loss_fn(model, ids, seg, packed=packed)
            out["loss"].backward()
            model.zero_grad(set_to_none=True)
            if not flops:
                flops.append(float(counter.flops(seg, out["head_rows"], ib=True)))

        tokens = int((seg >= 0).sum())
        row = {"seq_len": ids.shape[1], "rows": ids.shape[0], "tokens": tokens,
               "pad_frac": round(1 - tokens / seg.numel(), 4)}
        try:
            sec, mem = timed(step, device, args.repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {**row, "error": "out of memory"}
        tflops = flops[0] / sec / 1e12
        return {**row, "fwd_bwd_s": round(sec, 4), "tokens_per_s": round(tokens / sec), "tflops": round(tflops, 3),
                "mfu": peak and round(tflops * 1e12 / peak, 4), "peak_mem_mib": mem and round(mem)}

    b_ids = models["dense"].bottleneck_ids
    for n in lengths:
        ids, seg = ib_batch(batch, n, 4, preset["vocab_size"], device, b_ids)
        for b, model in models.items():
            record("rows", {"backend": b, "input_tokens": n, **measure(model, ids, seg)})
        for layout, (ids, seg) in packing_batches(batch, n, 4, preset["vocab_size"], device, b_ids).items():
            for b, model in models.items():
                if layout == "packed" and b == "kv_split":
                    continue
                record("packing", {"backend": b, "layout": layout, "input_tokens": n,
                                   "units": int((seg == SINK).sum()), **measure(model, ids, seg, layout == "packed")})
    results["train_steps"] = train_steps(models["kv_split"], preset, device, lengths[-1])
    print(json.dumps(results["train_steps"]), flush=True)
    out_path.write_text(json.dumps(results, indent=2))


def train_steps(model, preset, device, longest: int, steps: int = 5) -> dict:
    """Full fine-tuning AdamW steps: IB-GL at 512 input tokens and GR-CL (InfoNCE, batch 32, 128-token texts)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n = min(512, longest)
    ids, seg = ib_batch(preset["batch"], n, 4, preset["vocab_size"], device, model.bottleneck_ids)
    loss_fn, nce = IBGenerativeLoss(), InfoNCELoss(0.02, gather=False)

    def ib_step():
        loss_fn(model, ids, seg)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    q_ids, q_seg = ib_batch(32, 128, 4, preset["vocab_size"], device, model.bottleneck_ids)
    keep = q_seg != Y
    q_ids, q_seg = q_ids[:, : int(keep.sum(1).max())], torch.where(keep, q_seg, -1)[:, : int(keep.sum(1).max())]

    def cl_step():
        q = model.embed(q_ids, q_seg)
        p = model.embed(q_ids.roll(1, 1), q_seg)
        nce(q, p).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ib_s, ib_mem = timed(ib_step, device, steps)
    cl_s, cl_mem = timed(cl_step, device, steps)
    return {"ib_gl_step_s": round(ib_s, 4), "ib_gl_tokens_per_s": round(int((seg >= 0).sum()) / ib_s),
            "ib_gl_peak_mem_mib": ib_mem and round(ib_mem), "gr_cl_step_s": round(cl_s, 4),
            "gr_cl_peak_mem_mib": cl_mem and round(cl_mem)}


if __name__ == "__main__":
    main()
