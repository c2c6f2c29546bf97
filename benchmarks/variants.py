"""Ablation on the demo data with one budget: dev R@10 of lbr, gl-cl, cl and cl --match-compute, wall time per stage.

    python benchmarks/variants.py [--config configs/demo.yaml] [--out benchmarks/results/variants.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from lbr_ray.config import load_config
from lbr_ray.recipes.pipeline import train

RUNS = [("lbr", False), ("gl-cl", False), ("cl", False), ("cl", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="benchmarks/results/variants.json")
    ap.add_argument("--workdir", default="runs/variants")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    rows = []
    for variant, match in RUNS:
        name = variant + ("-match-compute" if match else "")
        cfg = load_config(args.config, args.overrides + [f"run.output={args.workdir}/{name}", f"run.variant={variant}"])
        start = time.time()
        res = train(cfg, stage="all", match_compute=match)
        dev = [m for m in res["gr_cl"].metrics if "dev_recall@10" in m]
        rows.append({"variant": name, "dev_recall@10": dev[-1]["dev_recall@10"], "dev_ndcg@10": dev[-1]["dev_ndcg@10"],
                     "dev_recall@10_step0": dev[0]["dev_recall@10"], "gr_cl_steps": res["gr_cl"].last["step"],
                     "stage_wall_s": {k: round(r.wall_s, 1) for k, r in res.items()},
                     "total_wall_s": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"config": args.config, "overrides": args.overrides, "machine": f"{platform.machine()}, "
           f"{__import__('os').cpu_count()} CPUs", "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
