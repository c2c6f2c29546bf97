"""`lbr eval --index auto` at corpus scale: a seeded synthetic clustered corpus (default 5,000,000 passages of
576-d vectors) and 2,000 test queries, run through RetrievalEvaluator (what `lbr eval` calls) end to end: streamed
eval set, encoding by Ray Data actors into the embedding cache, the shared-quantizer sharded index, nprobe tuning,
metrics. A second evaluation checks that nothing is built again. Then exact top-10 of every query, computed chunk by
chunk over the cache (once; saved under --root), gives recall@10, and 2 side-by-side repeats of exact search and
the index's search (top-100), each over every query, give the speed ratio.

    python benchmarks/corpus_scale.py --root /work/bench-data/corpus-scale [--n 5000000] [--queries 2000]
        [--num-workers 2] [--index-memory 6G] [--out benchmarks/results/corpus_scale.json]

Data (written under --root, never committed; delete it afterwards): `synthetic/corpus.jsonl.gz` holds passages
"synthetic passage <i>", `synthetic/pairs.jsonl.gz` test queries "synthetic query <j>" whose positive is passage
p_j. The encoder (SyntheticEncoder) maps a passage's number to its vector, generated in blocks of 65,536 rows by a
generator seeded with (seed, block): a latent z = centre of one of 2,048 clusters + 0.5 N(0, I_64), projected to
576-d by a fixed random matrix, plus 0.5 N(0, I_576) noise, L2-normalised. Query j is passage p_j's latent plus
0.3 N(0, I_64) noise, projected, plus fresh 576-d noise. Exact search scores each query against all passages.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbr_ray.config.schema import SplitConfig  # noqa: E402
from lbr_ray.data.split import split_of  # noqa: E402
from lbr_ray.eval.corpus import encode_streamed  # noqa: E402
from lbr_ray.eval.encode import encode_many, object_ref  # noqa: E402
from lbr_ray.eval.evaluator import EvalOptions, RetrievalEvaluator  # noqa: E402
from lbr_ray.eval.ivf import CorpusIndex, spec_plan  # noqa: E402
from lbr_ray.eval.metrics import ann_recall  # noqa: E402

BLOCK = 65_536
LATENT, CLUSTERS, SPREAD, NOISE, QUERY_NOISE = 64, 2048, 0.5, 0.5, 0.3


class SyntheticEncoder:
    """Passage i -> row i of the synthetic corpus; query j -> a noisy copy of passage p_j (see the module doc)."""

    def __init__(self, seed: int = 0, dim: int = 576):
        self.seed, self.dim = seed, dim
        rng = np.random.default_rng(seed)
        self.centres = rng.normal(size=(CLUSTERS, LATENT)).astype(np.float32)
        self.proj = (rng.normal(size=(LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.fingerprint = f"synthetic-v1:{seed}:{dim}:{LATENT}:{CLUSTERS}:{SPREAD}:{NOISE}:{QUERY_NOISE}"
        self._block = (None, None, None)
        self.targets = np.random.default_rng([seed, 1 << 30]).permutation(BLOCK)  # p_j = targets[j]

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [BLOCK, dim], latents [BLOCK, LATENT]) of block b; the last one is cached."""
        if self._block[0] != b:
            rng = np.random.default_rng([self.seed, b])
            z = self.centres[rng.integers(CLUSTERS, size=BLOCK)] + SPREAD * rng.standard_normal(
                (BLOCK, LATENT), dtype=np.float32)
            x = z @ self.proj + NOISE * rng.standard_normal((BLOCK, self.dim), dtype=np.float32)
            self._block = (b, x / np.linalg.norm(x, axis=1, keepdims=True), z)
        return self._block[1], self._block[2]

    def encode(self, texts: list[str], batch_size: int = 0) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        is_q = np.array([t.startswith("synthetic query") for t in texts])
        num = np.array([int(re.search(r"(\d+)$", t).group(1)) for t in texts], dtype=np.int64)
        for b in np.unique(num[~is_q] // BLOCK):
            sel = np.flatnonzero(~is_q & (num // BLOCK == b))
            out[sel] = self.block(int(b))[0][num[sel] % BLOCK]
        if is_q.any():
            z = self.block(0)[1]
            for pos in np.flatnonzero(is_q):
                rng = np.random.default_rng([self.seed, 1 << 31, int(num[pos])])
                v = (z[self.targets[num[pos]]] + QUERY_NOISE * rng.standard_normal(LATENT, dtype=np.float32)) \
                    @ self.proj + NOISE * rng.standard_normal(self.dim, dtype=np.float32)
                out[pos] = v / np.linalg.norm(v)
        return out


def write_data(root: Path, n: int, n_queries: int, seed: int) -> None:
    """The synthetic domain folder (skipped when both files exist)."""
    folder = root / "data" / "synthetic"
    if (folder / "pairs.jsonl.gz").is_file() and (folder / "corpus.jsonl.gz").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    enc = SyntheticEncoder(seed)
    with gzip.open(folder / "corpus.jsonl.gz.tmp", "wt", compresslevel=1) as f:
        for s in range(0, n, 100_000):
            f.write("".join(f'{{"id": "p{i:07d}", "text": "synthetic passage {i:07d}"}}\n'
                            for i in range(s, min(n, s + 100_000))))
    os.replace(folder / "corpus.jsonl.gz.tmp", folder / "corpus.jsonl.gz")
    lines, j = [], 0
    while len(lines) < n_queries:  # keep the queries the default split puts in test
        q = f"synthetic query {j:07d}"
        if split_of(q, SplitConfig()) == "test":
            lines.append(json.dumps({"query": q, "positive": f"synthetic passage {enc.targets[j]:07d}",
                                     "type": "synthetic", "source": "synthetic"}))
        j += 1
    with gzip.open(folder / "pairs.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class PhaseLog:
    """Console log with elapsed seconds; a thread samples this process's RSS every 0.2 s and keeps the peak of
    each phase (a phase = the time after one log line until the next)."""

    def __init__(self):
        import threading

        import psutil

        self.t0, self.phase, self.peaks = time.perf_counter(), "start", {}
        self.proc, self.stop = psutil.Process(), threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def __call__(self, line: str) -> None:
        self.phase = f"{time.perf_counter() - self.t0:7.1f}s {line.strip()[:100]}"
        print(self.phase, flush=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            rss = self.proc.memory_info().rss / 2 ** 30
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), round(rss, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder for the generated data and caches (not the repo)")
    ap.add_argument("--n", type=int, default=5_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--index-memory", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/corpus_scale.json")
    args = ap.parse_args()
    root = Path(args.root)
    t0 = time.perf_counter()
    write_data(root, args.n, args.queries, args.seed)
    res = {"command": "python " + " ".join(sys.argv), "machine": {"cpus": os.cpu_count(),
                                                                  "loadavg_start": list(os.getloadavg())},
           "data": {"passages": args.n, "dim": 576, "queries": args.queries, "seed": args.seed,
                    "generator": "latent 64-d mixture of 2,048 clusters (spread 0.5) projected to 576-d + noise 0.5, "
                                 "L2-normalised; queries: a passage's latent + 0.3 noise",
                    "write_seconds": round(time.perf_counter() - t0, 1)}}
    print(f"data ready in {res['data']['write_seconds']}s", flush=True)
    opts = EvalOptions(domains=("synthetic",), data_root=str(root / "data"), index="auto",
                       num_workers=args.num_workers, k=100, cache_dir=str(root / "cache"), seed=args.seed,
                       index_memory=args.index_memory, use_gpu=False)
    ref = object_ref(SyntheticEncoder(args.seed))
    log = PhaseLog()
    runs = []
    for attempt in (1, 2):  # the second run must read everything back and build nothing
        start = time.perf_counter()
        ev = RetrievalEvaluator(opts, log=log, keep_ranking=True)
        out = ev.evaluate(ref, "synthetic")
        dom = out["domains"]["synthetic"]
        runs.append({"run": attempt, "seconds": round(time.perf_counter() - start, 1),
                     "driver_peak_rss_gib": round(peak_rss_gib(), 3), "encoded_passages": dom["encoded_passages"],
                     "index": dom["index"], "index_params": dom["index_params"], "index_build": dom["index_build"],
                     "ann_recall@10_heldout": dom["ann_recall@10"], "heldout_queries": dom.get("ann_recall_queries"),
                     "qps": round(dom["queries_per_s"], 1), "qps_exact_sample": round(dom["qps_exact"], 2),
                     "qps_ratio_vs_exact_sample": round(dom["qps_ratio_vs_exact"], 1),
                     "shard_rss_gib": [round(m["rss"] / 2 ** 30, 3) for m in dom["worker_memory"]],
                     "shard_rss_file_backed_gib": [round(m["file_backed"] / 2 ** 30, 3) for m in dom["worker_memory"]],
                     "exact_reference": dom["exact_reference"],
                     "auto_trace": dom["auto_trace"], "recall@10_qrels": dom["rows"][0]["recall@10"]})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "auto_trace"}), flush=True)
        top = dom["top"]
    res["runs"] = runs
    # exact top-10 of every query, chunk by chunk over the cache: the reference for recall and speed
    sset = ev.sets["synthetic"]
    docs = encode_streamed(ref, sset, opts.cache_dir, log=log)  # read back from the cache
    q = encode_many(ref, [(sset.queries, "query")], opts.cache_dir, log=log)[0].load()
    first = runs[0]
    threads = max(1, (os.cpu_count() or 1) // args.num_workers)
    with CorpusIndex(docs.folder, docs.parts, spec_plan(first["index"], docs.n, docs.dim), args.num_workers,
                     threads=threads, log=log) as index:
        saved = root / "exact-top10.npz"  # every query's exact top-10, computed once (minutes)
        if saved.is_file():
            got = np.load(saved)
            exact_top, exact_s = got["top"], float(got["seconds"])
        else:
            log(f"exact top-10 of {len(q)} queries, chunk by chunk")
            start = time.perf_counter()
            _, exact_top = index.exact(q, 10)
            exact_s = time.perf_counter() - start
            np.savez(saved, top=exact_top, seconds=exact_s)
        index.set_params(first["index_params"])
        timing = []
        for rep in range(2):  # side by side, every query each: exact search, then the index's search
            log(f"timing, repeat {rep + 1} of 2")
            start = time.perf_counter()
            index.exact(q, 10)
            exact_rep = time.perf_counter() - start
            start = time.perf_counter()
            index.search(q, 100)
            ann_rep = time.perf_counter() - start
            timing.append({"qps_exact": round(len(q) / exact_rep, 2), "qps_index": round(len(q) / ann_rep, 1),
                           "loadavg": os.getloadavg()[0]})
            print(json.dumps(timing[-1]), flush=True)
    recall = ann_recall(top, exact_top, 10)
    qps_exact = len(q) / exact_s
    res["exact"] = {"queries": len(q), "seconds": round(exact_s, 1), "qps": round(qps_exact, 2)}
    res["timing_side_by_side"] = timing
    med_exact = float(np.median([t["qps_exact"] for t in timing]))
    med_index = float(np.median([t["qps_index"] for t in timing]))
    first = runs[0]
    res["summary"] = {
        "recall@10_vs_exact_all_queries": round(recall, 4), "goal_recall": 0.95,
        "qps_index_median": med_index, "qps_exact_chunked_median": med_exact,
        "speedup_vs_exact_side_by_side": round(med_index / med_exact, 1), "goal_speedup": 20,
        "qps_exact_all_2000_queries": round(qps_exact, 2), "qps_index_run1": first["qps"],
        "driver_peak_rss_gib": runs[-1]["driver_peak_rss_gib"], "goal_rss_gib": 4,
        "shard_rss_gib": first["shard_rss_gib"], "shard_rss_file_backed_gib": first["shard_rss_file_backed_gib"],
        "build_seconds": first["index_build"]["build_seconds"],
        "train_seconds": first["index_build"]["train_seconds"], "fill_seconds": first["index_build"]["fill_seconds"],
        "bytes_per_vector": first["index_build"]["bytes_per_vector"], "index": first["index"],
        "index_params": first["index_params"], "second_run_encoded": runs[1]["encoded_passages"],
        "second_run_index_reused": runs[1]["index_build"]["reused"], "second_run_seconds": runs[1]["seconds"]}
    log("done")
    res["driver_rss_peak_by_phase_gib"] = log.peaks
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
