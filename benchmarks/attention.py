"""IB-mask backends: forward+backward time and peak memory (dense vs flex vs kv_split), a bf16 IB-GL training step
and a GR-CL step; runs without Ray/DeepSpeed (e.g. on a GPU box with torch + transformers only).

    python benchmarks/attention.py --preset qwen0.5b --device cuda --out benchmarks/results/attention_gpu.json
    python benchmarks/attention.py --preset tiny --device cpu --out benchmarks/results/attention_cpu.json
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
from lbr_ray.layout import B, SINK, X, Y, pad_rows  # noqa: E402
from lbr_ray.losses import IBGenerativeLoss, InfoNCELoss  # noqa: E402
from lbr_ray.model.bottleneck import BottleneckLM  # noqa: E402
from lbr_ray.model.selfcheck import check_mask  # noqa: E402

PRESETS = {  # Qwen2.5-0.5B's shape with random weights; a tiny one for CPU smoke runs
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, lengths=(256, 512, 1024, 2048), batch=8),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, lengths=(64, 128), batch=4),
}


def make_model(preset: dict, backend: str, device, dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{k: v for k, v in preset.items() if k not in ("lengths", "batch")},
                      max_position_embeddings=8192, tie_word_embeddings=True)
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
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args()
    preset, device = PRESETS[args.preset], torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["dense", "kv_split"] + (["flex"] if device.type == "cuda" else [])
    results = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "dtype": str(dtype), "k": 4, "batch": preset["batch"], "rows": []}
    loss_fn = IBGenerativeLoss()
    models = {b: make_model(preset, b, device, dtype) for b in backends}
    for b in backends[1:]:
        models[b].lm.load_state_dict(models["dense"].lm.state_dict())
    ids, seg = ib_batch(2, 32, 4, preset["vocab_size"], device, models["dense"].bottleneck_ids)
    results["self_check"] = {b: check_mask(m, ids, seg) for b, m in models.items()}
    print(json.dumps(results["self_check"]), flush=True)
    for n in preset["lengths"]:
        ids, seg = ib_batch(preset["batch"], n, 4, preset["vocab_size"], device, models["dense"].bottleneck_ids)
        tokens = int((seg >= 0).sum())
        for b, model in models.items():
            def step():
                out = loss_fn(model, ids, seg)
                out["loss"].backward()
                model.zero_grad(set_to_none=True)
            try:
                sec, mem = timed(step, device)
                row = {"backend": b, "input_tokens": n, "seq_len": ids.shape[1], "fwd_bwd_s": round(sec, 4),
                       "tokens_per_s": round(tokens / sec), "peak_mem_mib": mem and round(mem)}
            except torch.OutOfMemoryError:
                row = {"backend": b, "input_tokens": n, "seq_len": ids.shape[1], "error": "out of memory"}
                torch.cuda.empty_cache()
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    results["train_steps"] = train_steps(models["kv_split"], preset, device)
    print(json.dumps(results["train_steps"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


def train_steps(model, preset, device, steps: int = 5) -> dict:
    """Full fine-tuning AdamW steps: IB-GL at 512 input tokens and GR-CL (InfoNCE, batch 32, 128-token texts)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n = min(512, preset["lengths"][-1])
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
