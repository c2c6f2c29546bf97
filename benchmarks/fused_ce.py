"""The LM head at Qwen2.5's 151,936-token vocabulary: lbr's plain head against fused linear cross-entropy.

`plain` is lbr's own loss (IBGenerativeLoss.from_hidden: the LM head on the scored rows in the model's dtype, the
cross-entropy of the [rows, vocab] logits in float32). `liger` is liger-kernel's fused linear cross-entropy (Triton,
CUDA only; the logits are computed and consumed chunk by chunk, never held whole); `torch` is torch's own
F.linear_cross_entropy with its chunked options, where this torch has it. Each runs forward + backward on the same
hidden states, weights and targets: time (median of the repeats), peak memory above what the inputs hold, and the
loss and gradients relative to `plain`. A method missing here is reported with the reason.

    python benchmarks/fused_ce.py --device cuda --out benchmarks/results/fused_ce_gpu.json
    python benchmarks/fused_ce.py --device cpu --hidden 128 --vocab 8192 --rows 512 --out /tmp/fused_ce.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbr_ray.layout import SINK, Y  # noqa: E402
from lbr_ray.losses import IBGenerativeLoss  # noqa: E402


def methods() -> tuple[dict, dict]:
    """({name: fn(hidden [N, H], head nn.Linear, target [N]) -> loss}, {name: why it is missing})."""
    loss = IBGenerativeLoss()

    def plain(h, head, target):  # one row [sink][y_1..y_N]: every position but the last scores the next token
        hidden = torch.cat([h, h[:1]])[None]
        ids = torch.cat([target[:1], target])[None]
        seg = torch.full_like(ids, Y)
        seg[:, 0] = SINK
        return loss.from_hidden(hidden, head, ids, seg)["target_loss"]

    found, missing = {"plain": plain}, {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        found["liger"] = lambda h, head, target: liger(head.weight, h, target)
    except ImportError as e:  # not installed, or no Triton (CPU builds of torch)
        missing["liger"] = f"liger-kernel not importable: {e}"
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        found["torch"] = lambda h, head, target: F.linear_cross_entropy(h, head.weight, target, options=options)
    else:
        missing["torch"] = f"torch {torch.__version__} has no F.linear_cross_entropy"
    return found, missing


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=896)  # Qwen2.5-0.5B
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", default="4096,16384", help="scored rows per micro-batch, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/fused_ce.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    found, missing = methods()
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "dtype": str(dtype), "hidden": args.hidden, "vocab": args.vocab, "missing": missing, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(device, dtype)
    torch.nn.init.normal_(head.weight, std=0.02, generator=g)
    for n in map(int, args.rows.split(",")):
        h0 = torch.randn(n, args.hidden, generator=g).to(device, dtype)
        target = torch.randint(0, args.vocab, (n,), generator=g).to(device)
        ref = None
        for name, fn in found.items():
            h = h0.clone().requires_grad_(True)

            def step():
                head.weight.grad, h.grad = None, None
                loss = fn(h, head, target)
                loss.backward()
                return loss

            row = {"method": name, "rows": n}
            try:
                step()  # warm-up (Triton compiles)
                times = []
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    loss = step()
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                sec = statistics.median(times)
                row.update(fwd_bwd_ms=round(sec * 1e3, 3), rows_per_s=round(n / sec), loss=float(loss.detach()),
                           peak_extra_mib=round((torch.cuda.max_memory_allocated() - base) / 2**20) if cuda else None)
                grads = (loss.detach(), h.grad.detach().clone(), head.weight.grad.detach().clone())
                if ref is None:
                    ref = grads
                else:
                    row.update(loss_rel_diff=rel(grads[0], ref[0]), grad_hidden_rel_diff=rel(grads[1], ref[1]),
                               grad_weight_rel_diff=rel(grads[2], ref[2]))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:  # noqa: BLE001 - a kernel that fails on this device/version is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if cuda:
                torch.cuda.empty_cache()
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(results, indent=2))
    print(json.dumps({"missing": missing}), flush=True)


if __name__ == "__main__":
    main()
