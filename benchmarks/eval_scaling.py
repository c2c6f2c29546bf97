"""Eval scaling on this machine: passages/s encoded (MiniLM, Ray Data actor pool) and queries/s searched (sharded
FAISS in Ray actors) with 1 and 2 workers on >= 50,000 passages, plus IVF recall@10 against exact search.

    python benchmarks/eval_scaling.py [--data-root ../shared/data] [--passages 50000] [--encode-sample 800]
                                      [--queries 2000] [--real-cache runs/eval-cache]
                                      [--out benchmarks/results/eval_scaling.json]

Encoding: the same sample of the pool is encoded with 1 and with 2 workers (fresh cache each time), at MiniLM's
shipped max length (256 word pieces); the wall time includes starting the actors and loading the model. On a 2-core CPU MiniLM encodes
~15 passages/s, so the whole pool (~1 h) is not encoded here: the search half indexes MiniLM *static* vectors
of the full pool (mean of MiniLM's input token embeddings over the first 256 word pieces, L2-normalised; same
dimension and tokeniser, no transformer layers). With --real-cache (the cache of `lbr eval --baseline minilm`),
IVF recall is also measured on the real MiniLM embeddings of the eval corpora and their test queries.
Other processes on a shared machine skew the timings: the load average is recorded, encoding runs are repeated
(interleaved), the median per worker count is reported, and each run's busy CPU time of the whole machine per
passage shows whether the work itself grows with the workers (`--encode-only` runs just this half).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbr_ray.data.readers import read_all  # noqa: E402
from lbr_ray.data.split import split_of, text_key  # noqa: E402
from lbr_ray.eval.baselines import minilm_path, minilm_ref  # noqa: E402
from lbr_ray.eval.encode import encode_many, read_cache  # noqa: E402
from lbr_ray.eval.evaluator import ensure_ray, resolve_data_root  # noqa: E402
from lbr_ray.eval.index import ShardedIndex, search_shards  # noqa: E402
from lbr_ray.eval.metrics import ann_recall  # noqa: E402

DOMAINS = ("medical", "chemistry", "code", "biology")
IVF = [("IVF256,Flat", "nprobe=1"), ("IVF256,Flat", "nprobe=8"), ("IVF256,Flat", "nprobe=32"),
       ("HNSW32", "efSearch=64")]


def pool(data_root: str, n: int, n_queries: int) -> tuple[list[str], list[str]]:
    """n distinct passages (corpus + positives of every split and domain) and test queries, in hash order."""
    texts, queries = {}, {}
    for d in DOMAINS:
        root = Path(data_root) / d
        for rec in read_all(str(root), "pairs"):
            texts.setdefault(text_key(rec["positive"]), rec["positive"])
            if split_of(rec["query"]) == "test":
                queries.setdefault(text_key(rec["query"]), rec["query"])
        if list(root.glob("corpus*")):
            for rec in read_all(str(root), "corpus"):
                texts.setdefault(text_key(rec["text"]), rec["text"])
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} distinct passages under {data_root}; need {n}")
    order = sorted(texts)[:n]
    return [texts[k] for k in order], [queries[k] for k in sorted(queries)[:n_queries]]


def static_vectors(texts: list[str], max_tokens: int = 256) -> np.ndarray:
    """MiniLM static vectors: mean of the input token embeddings, L2-normalised, [N, 384]."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    path = minilm_path()
    with safe_open(str(path / "model.safetensors"), "np") as f:
        table = f.get_tensor("embeddings.word_embeddings.weight").astype(np.float32)  # [V, 384]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    out = np.empty((len(texts), table.shape[1]), dtype=np.float32)
    for s in range(0, len(texts), 2048):
        for i, enc in enumerate(tok.encode_batch(texts[s:s + 2048])):
            out[s + i] = table[enc.ids[1:-1] or enc.ids].mean(axis=0)  # drop [CLS]/[SEP]
    out -= out.mean(axis=0)  # remove the common direction static embeddings share
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every process; /proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def bench_encode(texts: list[str], workers: int) -> dict:
    """Wall time and the machine's busy CPU time of one encoding run: CPU seconds per passage stay level when the
    work does not grow with the workers, whatever the other processes of the machine did to the wall time."""
    with tempfile.TemporaryDirectory() as cache:
        cpu, start = busy_cpu_s(), time.perf_counter()
        got = encode_many(minilm_ref(), [(texts, "passage")], cache, num_workers=workers, batch_size=64,
                          shard_rows=64, log=lambda *_: None)[0]
        seconds, cpu = time.perf_counter() - start, busy_cpu_s() - cpu
    assert got.encoded == len(texts)
    return {"workers": workers, "passages": len(texts), "seconds": round(seconds, 2),
            "passages_per_s": round(len(texts) / seconds, 2), "busy_cpu_s": round(cpu, 1),
            "cpu_ms_per_passage": round(1000 * cpu / len(texts), 1), "loadavg": os.getloadavg()[0]}


def shards_of(emb: np.ndarray, parts: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    rows = np.arange(len(emb))
    return [(emb[r], r) for r in np.array_split(rows, parts)]


def bench_search(emb: np.ndarray, q: np.ndarray, workers: int, spec: str = "Flat", params: str = "",
                 k: int = 100, repeats: int = 3) -> tuple[dict, np.ndarray]:
    """Build the shard indexes in Ray actors (timed apart), then search all queries (merged top-k)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    start = time.perf_counter()
    with ShardedIndex(shards_of(emb), spec, params, workers, False, threads) as index:
        built = time.perf_counter() - start
        times = []
        for _ in range(repeats):  # best of a few: other processes on the machine add noise, never speed
            start = time.perf_counter()
            _, rows = index.search(q, k)
            times.append(time.perf_counter() - start)
    return {"workers": workers, "index": spec, "params": params, "passages": len(emb), "queries": len(q), "k": k,
            "seconds_start_and_build": round(built, 2), "seconds_search": [round(t, 3) for t in times],
            "queries_per_s": round(len(q) / min(times), 1),
            "queries_per_s_median": round(len(q) / float(np.median(times)), 1)}, rows


def ann_table(emb: np.ndarray, q: np.ndarray, workers: int = 2) -> list[dict]:
    _, exact = search_shards(shards_of(emb), q, 10, "Flat", "", 0)
    out = []
    for spec, params in IVF:
        row, rows = bench_search(emb, q, workers, spec, params, k=10)
        row["recall@10_vs_exact"] = round(ann_recall(rows, exact, 10), 4)
        out.append(row)
        print(f"  {spec} {params}: recall@10 vs exact {row['recall@10_vs_exact']:.4f}, {row['queries_per_s']} q/s",
              flush=True)
    return out


def real_embeddings(cache_dir: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The passage and query embeddings of the model with the most cached passages in an `lbr eval` cache
    (e.g. of `lbr eval --baseline minilm`): (passages, queries, fingerprint), or None."""
    groups: dict[str, dict[str, list]] = {}
    for folder in sorted(Path(cache_dir).glob("*-*")):
        enc = read_cache(folder)
        if enc is not None:
            m = json.loads((folder / "manifest.json").read_text())
            groups.setdefault(m["fingerprint"], {"passage": [], "query": []})[m["role"]].append(enc)
    groups = {fp: g for fp, g in groups.items() if g["passage"] and g["query"]}
    if not groups:
        return None
    fp = max(groups, key=lambda f: sum(e.n for e in groups[f]["passage"]))
    return (np.concatenate([e.load() for e in groups[fp]["passage"]]),
            np.concatenate([e.load() for e in groups[fp]["query"]]), fp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--passages", type=int, default=50_000)
    ap.add_argument("--encode-sample", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--real-cache", default="runs/eval-cache")
    ap.add_argument("--out", default="benchmarks/results/eval_scaling.json")
    ap.add_argument("--encode-only", action="store_true", help="only the encoding half")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    data_root = resolve_data_root(args.data_root)
    passages, queries = pool(data_root, args.passages, args.queries)
    print(f"pool: {len(passages)} passages, {len(queries)} queries from {data_root}", flush=True)
    ensure_ray(None, 2)
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "loadavg_start": list(os.getloadavg())},
           "pool": {"data_root": data_root, "passages": len(passages), "queries": len(queries),
                    "sha1": hashlib.sha1("".join(text_key(t) for t in passages).encode()).hexdigest()[:16]}}
    sample = passages[: args.encode_sample]
    runs = []
    for rep in range(args.repeats):  # interleaved 1, 2, 1, 2 workers: load from other processes hits both alike
        for w in (1, 2):
            runs.append({**bench_encode(sample, w), "repeat": rep})
            print(f"encode: {w} worker(s) {runs[-1]['passages_per_s']} passages/s, "
                  f"{runs[-1]['cpu_ms_per_passage']} CPU ms per passage", flush=True)
    res["encode_minilm_runs"] = runs
    res["encode_minilm"] = [{"workers": w, **{k: statistics.median(r[k] for r in runs if r["workers"] == w)
                                              for k in ("seconds", "passages_per_s", "cpu_ms_per_passage")}}
                            for w in (1, 2)]  # median of the repeats
    if args.encode_only:
        write(res, args.out, t0)
        return
    start = time.perf_counter()
    emb, q = static_vectors(passages), static_vectors(queries)
    res["search_vectors"] = {"kind": "MiniLM static (mean input token embedding, centred, L2-normalised)",
                             "dim": int(emb.shape[1]), "seconds": round(time.perf_counter() - start, 1)}
    res["search_flat"] = [bench_search(emb, q, w)[0] for w in (1, 2)]
    for r in res["search_flat"]:
        print(f"search Flat: {r['workers']} worker(s) {r['queries_per_s']} q/s over {r['passages']}", flush=True)
    res["ann_static_50k"] = ann_table(emb, q)
    real = real_embeddings(args.real_cache) if args.real_cache else None
    if real is not None:
        print(f"cached model embeddings from {args.real_cache}: {len(real[0])} passages, {len(real[1])} queries")
        res["ann_real_embeddings"] = {"source": args.real_cache, "fingerprint": real[2], "passages": len(real[0]),
                                      "queries": len(real[1]), "rows": ann_table(real[0], real[1][: args.queries])}
    write(res, args.out, t0)


def write(res: dict, out: str, t0: float) -> None:
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out} in {res['seconds']}s")


if __name__ == "__main__":
    main()
