"""ANN search parameters picked for recall@10 >= 0.99 (`lbr eval --index-params auto`) and search scaling with the
machine's noise separated from the code's: wall time *and* CPU time per query, repeats interleaved.

Vectors: the MiniLM static vectors of benchmarks/eval_scaling.py (>= 50,000 passages of ../shared/data, 2,000
queries; same tokenizer and dimension as MiniLM, no transformer layers; see that file).
1. For each ANN index (IVF256, IVF1024, HNSW32): the auto-tuned search parameter on a 500-query sample, then
   recall@10 vs exact search on all queries and the speed-up over exact (Flat) search, in-process (one thread
   group, both indexes built once, only searches timed; exact and ANN searches interleaved, median of repeats),
   in wall time and in CPU time.
2. Flat search over 8 shards in 1 vs 2 Ray actors (1, 2, 1, 2, ... interleaved): queries/s of wall time, and the
   actors' CPU seconds per query. Perfect scaling keeps CPU/query flat while wall q/s doubles; on a loaded
   2-core machine the wall figure is noise-bound, the CPU figure much less so.

    python benchmarks/ann_auto.py --out benchmarks/results/ann_auto.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_scaling import pool, shards_of, static_vectors  # noqa: E402

from lbr_ray.eval.evaluator import ensure_ray, resolve_data_root  # noqa: E402
from lbr_ray.eval.index import ShardedIndex, tune_search_params  # noqa: E402
from lbr_ray.eval.metrics import ann_recall  # noqa: E402

ANN = ("IVF256,Flat", "IVF1024,Flat", "HNSW32")


def timed(index: ShardedIndex, q: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    wall, cpu = time.perf_counter(), time.process_time()
    _, rows = index.search(q, k)
    return time.perf_counter() - wall, time.process_time() - cpu, rows


def auto_rows(emb: np.ndarray, q: np.ndarray, repeats: int, sample: int = 500) -> list[dict]:
    shards = [(emb, np.arange(len(emb)))]
    out = []
    with ShardedIndex(shards, "Flat", "", num_workers=0) as flat:
        _, exact = flat.search(q, 10)
        for spec in ANN:
            start = time.perf_counter()
            with ShardedIndex(shards, spec, "", num_workers=0) as ann:
                built = time.perf_counter() - start
                params, trace = tune_search_params(ann, q[:sample], exact[:sample], spec)
                ann.set_params(params)
                t = {"exact": [], "ann": []}
                for _ in range(repeats):  # interleaved: exact, ann, exact, ann, ...
                    t["exact"].append(timed(flat, q, 10)[:2])
                    wall, cpu, rows = timed(ann, q, 10)
                    t["ann"].append((wall, cpu))
                med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in t.items()}
                row = {"index": spec, "params": params, "build_s": round(built, 2), "tuning_trace": trace,
                       "recall@10_vs_exact": round(ann_recall(rows, exact, 10), 4),
                       "qps_exact": round(len(q) / med["exact"][0], 1), "qps_ann": round(len(q) / med["ann"][0], 1),
                       "qps_ratio_vs_exact_wall": round(med["exact"][0] / med["ann"][0], 2),
                       "cpu_ms_per_query_exact": round(1e3 * med["exact"][1] / len(q), 4),
                       "cpu_ms_per_query_ann": round(1e3 * med["ann"][1] / len(q), 4),
                       "qps_ratio_vs_exact_cpu": round(med["exact"][1] / max(med["ann"][1], 1e-9), 2)}
            print(json.dumps({k: v for k, v in row.items() if k != "tuning_trace"}), flush=True)
            out.append(row)
    return out


def scaling_rows(emb: np.ndarray, q: np.ndarray, repeats: int) -> dict:
    import ray

    indexes = {}
    for w in (1, 2):
        threads = max(1, (os.cpu_count() or 1) // w)
        indexes[w] = ShardedIndex(shards_of(emb), "Flat", "", w, False, threads)
    runs = []
    try:
        for rep in range(repeats):
            for w in (1, 2):
                index = indexes[w]
                cpu0 = sum(ray.get([a.cpu_seconds.remote() for a in index.actors]))
                start = time.perf_counter()
                index.search(q, 100)
                wall = time.perf_counter() - start
                cpu = sum(ray.get([a.cpu_seconds.remote() for a in index.actors])) - cpu0
                runs.append({"workers": w, "repeat": rep, "wall_s": round(wall, 3), "qps": round(len(q) / wall, 1),
                             "cpu_ms_per_query": round(1e3 * cpu / len(q), 4), "loadavg": os.getloadavg()[0]})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        for index in indexes.values():
            index.close()
    summary = {}
    for w in (1, 2):
        mine = [r for r in runs if r["workers"] == w]
        summary[w] = {"qps_median": statistics.median(r["qps"] for r in mine), "qps_best": max(r["qps"] for r in mine),
                      "cpu_ms_per_query_median": statistics.median(r["cpu_ms_per_query"] for r in mine)}
    summary["speedup_wall_median"] = round(summary[2]["qps_median"] / summary[1]["qps_median"], 2)
    summary["cpu_per_query_ratio_2_vs_1"] = round(summary[2]["cpu_ms_per_query_median"]
                                                  / summary[1]["cpu_ms_per_query_median"], 2)
    return {"runs": runs, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--passages", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/ann_auto.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_root = resolve_data_root(args.data_root)
    passages, queries = pool(data_root, args.passages, args.queries)
    emb, q = static_vectors(passages), static_vectors(queries)
    res = {"machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
           "pool": {"data_root": data_root, "passages": len(passages), "queries": len(queries)},
           "vectors": "MiniLM static (benchmarks/eval_scaling.py)", "target_recall@10": 0.99}
    res["auto"] = auto_rows(emb, q, args.repeats)
    ensure_ray(None, 4)  # 4 logical CPUs: the 1-actor (2 threads) and 2-actor indexes stay up side by side
    res["flat_scaling"] = scaling_rows(emb, q, args.repeats)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
