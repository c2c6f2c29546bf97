"""What reading the same small local data more than once costs a run's driver (issue 11's review leftovers).

A two-stage run of small local data reads its files in the driver four times: the preflight's record check (the
data summary), stage 1's rows, the GR-CL dev set and stage 2's pairs. `--stage lm` passes over its Ray Data
mixture twice before training (a count per source, the tokenizer's pass). This times each, so the question "cache
the records?" is answered with figures: `python benchmarks/driver_reads.py --out benchmarks/results/driver_reads.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def stage_reads(config: str, repeats: int) -> dict:
    from lbr_ray.config import load_config
    from lbr_ray.data import ray_data
    from lbr_ray.data.summary import input_files, summarize_files
    from lbr_ray.eval.sets import dev_eval_set

    cfg = load_config(config)
    times: dict[str, list[float]] = {"summary": [], "stage1_rows": [], "dev_set": [], "stage2_pairs": []}
    for _ in range(repeats):
        summary, t = _timed(lambda: summarize_files(cfg, input_files(cfg)))
        times["summary"].append(t)
        times["stage1_rows"].append(_timed(lambda: ray_data.stage1_rows(cfg, summary.heldout_keys))[1])
        times["dev_set"].append(_timed(lambda: dev_eval_set(cfg))[1])
        times["stage2_pairs"].append(_timed(lambda: ray_data._local_pairs(cfg, "train"))[1])
    median = {k: round(statistics.median(v), 4) for k, v in times.items()}
    return {"config": config, "median_s": median, "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "beyond_the_first_read_s": round(sum(median.values()) - median["summary"], 4)}


def lm_passes(config: str, sources: list[str], repeats: int) -> dict:
    import ray

    from lbr_ray.config import load_config
    from lbr_ray.data import mixture

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    cfg = load_config(config, [f"lm.sources=[{', '.join(sources)}]", "lm.weights=[2, 1]"])
    rounds = []
    for _ in range(repeats):
        (docs, parts), t_count = _timed(lambda: mixture.mixture(cfg))
        n, t_pass = _timed(lambda: sum(1 for _ in docs.iter_rows()))
        rounds.append({"count_per_source_s": round(t_count, 3), "one_pass_s": round(t_pass, 3), "documents": n})
    ray.shutdown()
    return {"sources": sources, "rounds": rounds, "note": "round 1 includes Ray Data's first execution in the process"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--lm-sources", default="data/demo/code,data/demo/biology")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/driver_reads.json")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average_before": os.getloadavg(),
           "two_stage_run": stage_reads(args.config, args.repeats),
           "lm_stage": lm_passes(args.config, args.lm_sources.split(","), 2)}
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
