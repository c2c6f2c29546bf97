"""`lbr train --stage all` of SmolLM2-135M on the demo slice, end to end: today's path before issue 22 (a frozen
source tree and its config) against the fast path at 2 workers x 1 thread and 1 worker x 2 threads (the same global
batch), and the fast path in fp32 (its loss curve is bf16's reference: the same batches), runs interleaved round by
round. One JSON line per run: each stage's steady tokens/s (the logged steps after the first), its wall time
(start-up and the in-training dev evaluations included), its loss at every step, the command's wall time and the
final dev R@10.

    git worktree add /tmp/before-22 888de8b
    python benchmarks/cpu_e2e.py --before-tree /tmp/before-22 --rounds 2 --out benchmarks/results/cpu_e2e.jsonl

Trees before 98458d6 (issue 21.7) logged tokens_per_s multiplied by the number of workers; their figures are divided
by it here. Wall times on a shared machine move with its load (recorded per run); compare within a round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--set", "ib_gl.log_every=1", "--set", "gr_cl.log_every=1", "--set", "run.tensorboard=false"]


def runs(args) -> list[dict]:
    steps = ["--set", f"ib_gl.max_steps={args.ib_steps}", "--set", f"ib_gl.checkpoint_every={args.ib_steps}",
             "--set", f"gr_cl.max_steps={args.cl_steps}", "--set", f"gr_cl.checkpoint_every={args.cl_steps}",
             "--set", f"gr_cl.eval_every={args.cl_steps}", "--set", f"gr_cl.eval_queries={args.dev_queries}",
             "--set", f"gr_cl.eval_corpus={args.dev_corpus}"]
    after = str(ROOT / args.config)
    return [
        {"label": "before: fp32, unpacked, dropout 0.05, padding mask, dev eval on every rank (2 workers x 1)",
         "tree": args.before_tree, "config": str(ROOT / args.before_config), "workers": 2, "tokens_x_world": True,
         "extra": steps + ["--set", f"model.name={ROOT / 'models' / 'smollm2-135m'}"]},
        {"label": "after: 2 workers x 1 thread", "tree": str(ROOT), "config": after, "workers": 2, "extra": steps},
        {"label": "after: 1 worker x 2 threads, the same global batch", "tree": str(ROOT), "config": after,
         "workers": 1, "extra": steps + ["--set", "ib_gl.batch_size=16", "--set", "gr_cl.batch_size=32"]},
        {"label": "after, but fp32 (the loss-curve reference for bf16: the same batches)", "tree": str(ROOT),
         "config": after, "workers": 2, "extra": steps + ["--set", "deepspeed.bf16=false"]},
    ]


def steady(metrics: list[dict], key: str) -> float | None:
    vals = [m[key] for m in metrics if key in m and "dev_recall@10" not in m]
    vals = vals[1:] if len(vals) > 1 else vals  # the first window holds the first step's warm-up
    return round(sum(vals) / len(vals), 2) if vals else None


def one(spec: dict, rnd: int, tmp: Path) -> dict:
    out = tmp / f"run-{rnd}-{spec['workers']}-{abs(hash(spec['label'])) % 10**6}"
    cmd = [sys.executable, "-m", "cli.main", "train", "--stage", "all", "--config", spec["config"], "--output",
           str(out), "--num-workers", str(spec["workers"]), *COMMON, *spec["extra"]]
    env = {**os.environ, "PYTHONPATH": spec["tree"], "DS_ACCELERATOR": "cpu"}
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=spec["tree"], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{spec['label']} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    row = {"label": spec["label"], "round": rnd, "workers": spec["workers"], "wall_s": round(wall, 1),
           "load_before": round(load, 2)}
    for stage in ("ib_gl", "gr_cl"):
        metrics = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        rate = steady(metrics, "tokens_per_s")
        if rate is not None and spec.get("tokens_x_world"):
            rate = round(rate / spec["workers"], 2)
        row[f"{stage}_tokens_per_s"] = rate
        row[f"{stage}_step_time_s"] = steady(metrics, "step_time_s")
        row[f"{stage}_wall_s"] = round(summary["stages"][stage]["wall_s"], 1)
        row[f"{stage}_loss"] = [round(m["loss"], 4) for m in metrics if "loss" in m]
    row["dev_recall@10"] = (summary.get("dev_vs_bm25") or {}).get("dev_recall@10")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-tree", required=True)
    ap.add_argument("--before-config", default="benchmarks/cpu_e2e_before.yaml")
    ap.add_argument("--config", default="configs/smollm2-135m-demo.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ib-steps", type=int, default=10)
    ap.add_argument("--cl-steps", type=int, default=10)
    ap.add_argument("--dev-queries", type=int, default=100)
    ap.add_argument("--dev-corpus", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/cpu_e2e.jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp, open(out, "a") as fh:
        for rnd in range(args.rounds):
            for spec in runs(args):
                row = one(spec, rnd, Path(tmp))
                fh.write(json.dumps({**row, "command": " ".join(sys.argv)}) + "\n")
                fh.flush()
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
