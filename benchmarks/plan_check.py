"""`lbr plan`'s memory estimate against measured peaks -> benchmarks/results/plan_check.json.

1. H100 (benchmarks/results/attention_gpu.json, Qwen2.5-0.5B shape, bf16, full fine-tuning, batch 8): each dense
   forward+backward row (weights + gradients + activations + logits) and the IB-GL AdamW step (+ torch AdamW's two
   bf16 moments), estimated for the same shape, batch and row lengths.
2. CPU, the demo model (configs/demo.yaml, fp32): one process runs IB-GL forward+backward+AdamW steps on a real
   demo batch at the config's longest rows; measured = peak RSS growth over the RSS before the first step (the
   weights are already resident), estimated = gradients + AdamW states + activations + logits.

    python benchmarks/plan_check.py
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lbr_ray.config import load_config  # noqa: E402
from lbr_ray.plan import CUDA_RUNTIME, GIB, Shape, activation_bytes  # noqa: E402

MIB = 1 << 20


def gpu_rows() -> list[dict]:
    from transformers import Qwen2Config

    bench = json.loads((ROOT / "benchmarks/results/attention_gpu.json").read_text())
    preset = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=8192, tie_word_embeddings=True)
    cfg = load_config(None, ["model.lora=false", "bottleneck.k_max=4"])
    s = Shape.of(cfg, Qwen2Config(**preset))
    s.vocab = preset["vocab_size"]  # the benchmark reuses existing rows as bottleneck tokens
    s.params -= 4 * preset["hidden_size"]
    s.trainable = s.params
    batch, out = bench["batch"], []

    def target_tokens(n: int) -> int:  # attention.ib_batch: row r has m = n - (r % 4) * n // 16 targets
        return sum(n - (r % 4) * n // 16 for r in range(batch))

    for row in bench["rows"]:
        if row["backend"] != "dense" or "peak_mem_mib" not in row:
            continue
        acts = activation_bytes(s, batch * row["seq_len"], target_tokens(row["input_tokens"]), 2, False)
        est = CUDA_RUNTIME + s.params * 2 * 2 + sum(acts.values())
        out.append(_compare(f"H100 dense fwd+bwd, {row['seq_len']} tokens/row", est, row["peak_mem_mib"] * MIB))
    n = 512
    acts = activation_bytes(s, batch * (2 * n + 5), target_tokens(n), 2, False)
    est = CUDA_RUNTIME + s.params * 2 * (2 + 2) + sum(acts.values())  # + torch AdamW's two bf16 moments
    measured = bench["train_steps"]["ib_gl_peak_mem_mib"] * MIB
    out.append(_compare("H100 IB-GL AdamW step, 1029 tokens/row", est, measured))
    return out


def cpu_demo(steps: int = 3) -> dict:
    import psutil
    import torch

    from lbr_ray.layout import pad_rows
    from lbr_ray.data.readers import read_all
    from lbr_ray.layout import SequenceBuilder
    from lbr_ray.losses import IBGenerativeLoss
    from lbr_ray.model.bottleneck import BottleneckLM
    from lbr_ray.model.masks import Y
    from lbr_ray.plan import plan_stage

    cfg = load_config(ROOT / "configs/demo.yaml")
    torch.set_num_threads(1)
    model, tok = BottleneckLM.build(cfg.model, cfg.bottleneck, seed=0)
    texts = [r["positive"] for _, r in zip(range(400), read_all(str(ROOT / "data/demo/medical/pairs.jsonl.gz"),
                                                                "pairs"))]
    sb = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)
    rows = sorted(sb.stage1_rows(texts, "self", ib=True), key=lambda r: -len(r[0]))[: cfg.ib_gl.batch_size]
    ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = IBGenerativeLoss()
    before = psutil.Process().memory_info().rss
    for _ in range(steps):
        loss_fn(model, ids, seg)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    from transformers import AutoConfig

    from lbr_ray.model.bottleneck import resolve_model_path

    s = Shape.of(cfg, AutoConfig.from_pretrained(resolve_model_path(cfg.model.name)))
    scored = sum(sum(1 for v in r[1] if v == Y) for r in rows)
    est = s.trainable * (4 + 8) + sum(activation_bytes(s, ids.numel(), scored, 4, False).values())
    result = _compare(f"CPU demo IB-GL fwd+bwd+AdamW, batch {ids.shape[0]} x {ids.shape[1]} tokens (one process)",
                      est, peak - before)
    full = plan_stage(cfg, s, "ib_gl", cfg.scaling.num_workers)
    result["lbr_plan_demo_ib_gl_gib"] = round(full.total / GIB, 3)
    return result


def _compare(name: str, est: float, measured: float) -> dict:
    return {"case": name, "estimate_mib": round(est / MIB), "measured_mib": round(measured / MIB),
            "error": round(est / measured - 1, 3)}


def main() -> None:
    rows = gpu_rows() + [cpu_demo()]
    for r in rows:
        print(json.dumps(r))
    out = ROOT / "benchmarks/results/plan_check.json"
    out.write_text(json.dumps({"rows": rows, "note": "error = estimate / measured - 1"}, indent=2))


if __name__ == "__main__":
    main()
