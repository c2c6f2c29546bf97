"""RetrievalEvaluator: eval sets -> cached distributed encoding -> sharded search -> metrics per domain and type.

    ev = RetrievalEvaluator(EvalOptions(domains=("medical",), data_root="data/demo"))
    results = ev.evaluate(load_encoder("runs/demo/model"))      # or minilm_ref(), base_ref(...), BM25Retriever()
    results["domains"]["medical"]["rows"][0]["ndcg@10"]           # group "all"; primary metric ndcg@10
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lbr_ray.config.schema import SplitConfig
from lbr_ray.errors import LbrError
from lbr_ray.eval.baselines import BM25Retriever
from lbr_ray.eval.encode import Encoded, EncoderRef, encode_many
from lbr_ray.eval.index import is_exact, search_shards
from lbr_ray.eval.metrics import DEFAULT_METRICS, ann_recall, per_query_metrics
from lbr_ray.eval.sets import DIFFICULTIES, EvalSet, build_eval_set

DOMAINS = ("medical", "chemistry", "code", "biology")


def default_cache_dir() -> str:
    from lbr_ray.storage import cache_root

    return str(cache_root() / "embeddings")


@dataclass(frozen=True)
class EvalOptions:
    domains: tuple[str, ...] = DOMAINS
    data_root: str = "data/demo"
    index: str = "Flat"  # FAISS factory string, or "exact" (numpy)
    index_params: str = ""  # FAISS ParameterSpace string, e.g. "nprobe=16" or "efSearch=128"
    num_workers: int = 2  # encoder actors and search shards; 0 = in this process, without Ray
    batch_size: int | None = None  # texts per encoder forward pass (None: lbr_ray.hardware.encode_batch_size)
    max_queries: int | None = None
    max_corpus: int | None = None
    k: int = 100  # depth of the retrieved lists (>= every k of the metrics)
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    use_gpu: bool | None = None  # None: when the Ray cluster has GPUs
    address: str | None = None  # Ray cluster address; None = embedded local Ray
    split: SplitConfig = field(default_factory=SplitConfig)
    index_memory: str | None = None  # --index auto's memory budget ("6G"); None = a quarter of the machine's
    corpus: str = "domain"  # "joint": every domain's test queries against one corpus of all their passages

    @property
    def streamed(self) -> bool:
        """Corpus-scale path (lbr_ray.eval.corpus + ivf): passage texts on disk, a shared-quantizer index."""
        return self.index == "auto" or self.corpus == "joint"


def resolve_split(choice: str, model: str | None) -> tuple[SplitConfig, str]:
    """`lbr eval --split`: `model` = the split recorded in an lbr-ray model's card (else the default), `default`,
    or an lbr-ray config YAML whose data.split is used. Returns the split and a phrase saying where it came from."""
    import json

    from lbr_ray.config import load_config
    from lbr_ray.errors import CheckpointError
    from lbr_ray.model.encoder import CARD, split_from_card
    from lbr_ray.train.checkpoint import hf_dir

    if choice == "default":
        return SplitConfig(), "the default split"
    if choice != "model":
        if not Path(choice).is_file():
            raise LbrError(f"--split {choice}: not 'model', 'default' or an lbr-ray config file")
        return load_config(choice).data.split, f"data.split of {choice}"
    try:
        folder = hf_dir(model) if model else None
    except CheckpointError:
        folder = None
    if folder is None:
        return SplitConfig(), "the default split (no lbr-ray model card to take it from)"
    return split_from_card(json.loads((folder / CARD).read_text()))


def ensure_ray(address: str | None = None, num_workers: int = 1) -> None:
    """Use the running Ray, connect to `address`, or start an embedded local one (no dashboard)."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, num_workers), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)


class RetrievalEvaluator:
    """Evaluate a dense encoder (EncoderRef) or BM25Retriever on each domain's test split.

    Raises:
        EvalSetError: unknown domain, no test queries, empty corpus.
        EncoderError: the model is not an lbr-ray / sentence-transformers model, or returns bad shapes.
        LbrError: query and passage embeddings of different sizes; a bad FAISS index string.
    """

    primary_metric = "ndcg@10"
    greater_is_better = True

    def __init__(self, opts: EvalOptions, log=print, keep_ranking: bool = False):
        """keep_ranking: each domain's result keeps the ranked lists ("top" [Q, k] corpus rows, "scores" [Q, k]),
        e.g. to write TREC run files (lbr_ray.eval.trec)."""
        self.opts, self.log, self.keep_ranking = opts, log, keep_ranking
        self.sets: dict[str, EvalSet] = {}

    def __call__(self, method) -> dict[str, float]:
        """Flat metrics, e.g. {'medical/ndcg@10': 0.5, ...} (SentenceEvaluator style)."""
        res = self.evaluate(method)
        return {f"{d}/{m}": r["rows"][0][m] for d, r in res["domains"].items() for m in DEFAULT_METRICS}

    def eval_set(self, domain: str) -> EvalSet:
        if domain not in self.sets:
            o = self.opts
            if o.streamed:
                from lbr_ray.eval.corpus import build_streamed_set

                joint = o.corpus == "joint"
                self.sets[domain] = build_streamed_set(o.data_root, o.domains if joint else (domain,),
                                                       _local_cache(o.cache_dir), o.split, o.max_queries, o.seed,
                                                       joint, self.log, o.max_corpus)
                return self.sets[domain]
            self.sets[domain] = build_eval_set(o.data_root, domain, o.split, o.max_queries, o.max_corpus, o.seed)
        return self.sets[domain]

    def evaluate(self, method: EncoderRef | BM25Retriever, name: str | None = None) -> dict:
        check_streamed(self.opts)
        names = ("joint",) if self.opts.corpus == "joint" else self.opts.domains
        sets = {d: self.eval_set(d) for d in names}  # all data errors before any model work
        dense = isinstance(method, EncoderRef)
        use_gpu = self.opts.use_gpu
        fingerprint = None
        if dense:
            fingerprint = method.fingerprint
            if self.opts.num_workers > 0:
                ensure_ray(self.opts.address, self.opts.num_workers)
                if use_gpu is None:
                    import ray

                    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        out = {"model": name or getattr(method, "name", None) or method.path or method.kind,
               "method": "dense" if dense else "bm25", "fingerprint": fingerprint, "use_gpu": bool(use_gpu),
               "options": asdict(self.opts), "domains": {}}
        encoded = self._encode_all(sets, method, fingerprint, bool(use_gpu)) if dense else {}
        for domain, eset in sets.items():
            self.log(f"[{domain}] {len(eset.queries)} queries, {len(eset.doc_texts)} passages "
                     f"({eset.n_distractors} distractors)")
            run = self._dense(eset, *encoded[domain], bool(use_gpu)) if dense else self._bm25(eset, method)
            out["domains"][domain] = self._score(eset, run)
        out["driver_peak_rss_bytes"] = _peak_rss()
        return out

    def _encode_all(self, sets: dict[str, EvalSet], ref: EncoderRef, fingerprint: str, use_gpu: bool) -> dict:
        """Every domain's passages and queries in one pass of the encoder actor pool: {domain: (docs, queries)}."""
        from lbr_ray.hardware import encode_batch_size

        o = self.opts
        batch_size = o.batch_size or encode_batch_size(use_gpu)
        if o.streamed:  # queries in one pass of the pool, each corpus streamed from its parquet parts
            from lbr_ray.eval.corpus import encode_streamed

            kw = dict(num_workers=o.num_workers, batch_size=batch_size, use_gpu=use_gpu, fingerprint=fingerprint,
                      log=self.log)
            queries = encode_many(ref, [(e.queries, "query") for e in sets.values()], o.cache_dir, **kw)
            return {d: (encode_streamed(ref, e, o.cache_dir, **kw), queries[i])
                    for i, (d, e) in enumerate(sets.items())}
        jobs = [job for e in sets.values() for job in ((e.doc_texts, "passage"), (e.queries, "query"))]
        self.log(f"encoding {sum(len(t) for t, _ in jobs)} texts of {len(sets)} domain(s) "
                 f"(cache {o.cache_dir}, {o.num_workers} worker(s){', GPU' if use_gpu else ''})")
        done = encode_many(ref, jobs, o.cache_dir, num_workers=o.num_workers, batch_size=batch_size,
                           use_gpu=use_gpu, fingerprint=fingerprint, log=self.log)
        return {d: (done[2 * i], done[2 * i + 1]) for i, d in enumerate(sets)}

    def _dense(self, eset: EvalSet, docs: Encoded, queries: Encoded, use_gpu: bool) -> dict:
        o = self.opts
        if queries.dim != docs.dim:
            raise LbrError(f"embedding size mismatch: queries have size {queries.dim}, passages {docs.dim}; "
                           "the encoder must embed both into one space")
        q = queries.load()  # [Q, D]
        k = min(o.k, len(eset.doc_texts))
        threads = max(1, (os.cpu_count() or 1) // max(o.num_workers, 1)) if not use_gpu else 0
        if o.streamed:
            from lbr_ray.eval.ivf import parse_bytes, search_corpus

            run = search_corpus(docs.folder, docs.parts, docs.n, docs.dim, q, k, o.index,
                                o.index_params or ("auto" if o.index == "auto" else ""), parse_bytes(o.index_memory),
                                o.num_workers, use_gpu, threads, o.seed, self.log, queries.folder.name)
            return {**run, "encoded_passages": docs.encoded, "encoded_queries": queries.encoded,
                    "encode_pass_seconds": docs.seconds, "dim": docs.dim}
        shards = list(docs.shards())
        if o.index_params == "auto":  # (--index auto took the corpus-scale path above)
            return self._dense_auto(q, shards, k, use_gpu, threads, docs, queries)
        start = time.perf_counter()
        scores, top = search_shards(shards, q, k, o.index, o.index_params, o.num_workers, use_gpu, threads)
        search_s = time.perf_counter() - start
        run = {"top": top, "scores": scores, "search_seconds": search_s, "encoded_passages": docs.encoded,
               "encoded_queries": queries.encoded, "encode_pass_seconds": docs.seconds, "dim": docs.dim}
        if not is_exact(o.index):
            _, exact = search_shards(shards, q, k, "Flat", "", o.num_workers, use_gpu, threads)
            run["ann_recall@10"] = ann_recall(top, exact, min(10, k))
            run["ann_recall@100"] = ann_recall(top, exact, k)
        return run

    def _dense_auto(self, q, shards, k: int, use_gpu: bool, threads: int, docs, queries) -> dict:
        """`--index-params auto` with a given index: the cheapest search parameter reaching recall@10 >= 0.99 against
        exact search on a sample of the queries, then every query searched with it; both indexes are built
        once and only their searches are timed, so `qps_ratio_vs_exact` compares search speed alone. An ANN index
        that is slower than exact search at that recall (small corpora, BLAS-fast exact search) is reported but
        not used (`used: exact`)."""
        from lbr_ray.eval.index import AUTO_TARGET, ShardedIndex, tune_search_params

        o = self.opts
        spec = o.index
        sample = q[np.random.default_rng(o.seed).permutation(len(q))[: min(len(q), 1000)]]
        with ShardedIndex(shards, "Flat", "", o.num_workers, use_gpu, threads) as flat:
            start = time.perf_counter()
            exact_scores, exact = flat.search(q, k)
            exact_s = time.perf_counter() - start
            _, exact_sample = flat.search(sample, 10)
        params, trace = "", []
        with ShardedIndex(shards, spec, "", o.num_workers, use_gpu, threads) as ann:
            if not is_exact(spec):
                params, trace = tune_search_params(ann, sample, exact_sample, spec)
                ann.set_params(params)
            start = time.perf_counter()
            scores, top = ann.search(q, k)
            search_s = time.perf_counter() - start
        ratio = exact_s / max(search_s, 1e-9)
        used = "ann" if ratio >= 1 or is_exact(spec) else "exact"  # an ANN index slower than exact is not used
        self.log(f"  index {spec} {params or ''}: recall@10 vs exact {ann_recall(top, exact, min(10, k)):.4f} "
                 f"(target {AUTO_TARGET} on {len(sample)} sample queries), {ratio:.2f}x the exact search's queries/s"
                 + ("" if used == "ann" else "; slower than exact search, so the exact results are used"))
        if used == "exact":
            top, scores, search_s = exact, exact_scores, exact_s
        return {"top": top, "scores": scores, "search_seconds": search_s, "encoded_passages": docs.encoded,
                "encoded_queries": queries.encoded, "encode_pass_seconds": docs.seconds, "dim": docs.dim,
                "index": spec, "index_params": params, "auto_trace": trace, "used": used,
                "ann_recall@10": ann_recall(top, exact, min(10, k)), "ann_recall@100": ann_recall(top, exact, k),
                "exact_search_seconds": exact_s, "qps_exact": len(q) / max(exact_s, 1e-9),
                "qps_ratio_vs_exact": ratio}

    def _bm25(self, eset: EvalSet, bm25: BM25Retriever) -> dict:
        start = time.perf_counter()
        scores, top = bm25.retrieve(eset.queries, eset.doc_texts, self.opts.k)
        return {"top": top, "scores": scores, "search_seconds": time.perf_counter() - start}

    def _score(self, eset: EvalSet, run: dict) -> dict:
        top, scores = run.pop("top"), run.pop("scores")
        per = per_query_metrics(top, eset.qrels, DEFAULT_METRICS)  # {metric: [Q]}
        if self.keep_ranking:
            run.update(top=top, scores=scores)
        types = np.asarray(eset.query_types)
        diff = np.asarray(eset.query_difficulty)
        groups = [("all", "", np.ones(len(types), bool))]
        groups += [(g, g, diff == g) for g in DIFFICULTIES if (diff == g).any()]
        for t in sorted(set(types)):  # a type's difficulty: the most common one of its queries
            groups.append((f"type:{t}", Counter(diff[types == t]).most_common(1)[0][0], types == t))
        rows = []
        for group, level, mask in groups:
            row = {"group": group, "difficulty": level, "n_queries": int(mask.sum()),
                   "corpus_size": len(eset.doc_texts)}
            row.update({m: float(v[mask].mean()) for m, v in per.items()})
            rows.append(row)
        q_per_s = len(eset.queries) / max(run["search_seconds"], 1e-9)
        self.log(f"  R@10 {rows[0]['recall@10']:.4f}  NDCG@10 {rows[0]['ndcg@10']:.4f}  search {q_per_s:.0f} q/s")
        return {"n_queries": len(eset.queries), "corpus_size": len(eset.doc_texts), "n_distractors": eset.n_distractors,
                "notes": eset.notes, "rows": rows, "queries_per_s": q_per_s, **run}


def check_streamed(o: EvalOptions) -> None:
    """Options the corpus-scale path cannot take, refused before any data is read."""
    from lbr_ray.eval.ivf import parse_bytes

    parse_bytes(o.index_memory)
    if o.corpus not in ("domain", "joint"):
        raise LbrError(f"--corpus must be domain or joint, got {o.corpus!r}")
    if not o.streamed:
        return
    if o.max_corpus is not None and o.corpus == "joint":
        raise LbrError("--max-corpus cannot be combined with --corpus joint: the joint corpus is every passage "
                       "(cap the queries with --max-queries)")
    if not (o.index == "auto" or is_exact(o.index) or o.index.upper().startswith("IVF")):
        raise LbrError(f"--index {o.index} with --corpus joint: corpus-scale search takes auto, Flat, exact or an "
                       "IVF factory string (e.g. IVF1024,PQ32x4fs)")


def _local_cache(cache_dir: str) -> str:
    """Where streamed sets are saved: the cache folder, or its local staging copy for s3:// / gs:// caches."""
    from lbr_ray import storage

    return str(storage.staging_dir(cache_dir)) if storage.is_remote(cache_dir) else cache_dir


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_data_root(data_root: str | None, repo_root: Path | None = None) -> str:
    """--data-root, else ../shared/data (cwd- or repo-relative) if present, else the bundled data/demo."""
    if data_root:
        if not Path(data_root).is_dir():
            raise LbrError(f"--data-root {data_root} is not a folder")
        return str(data_root)
    repo_root = repo_root or Path(__file__).resolve().parents[2]
    for cand in (Path("../shared/data"), repo_root.parent / "shared" / "data"):
        if cand.is_dir():
            return str(cand)
    return str(repo_root / "data" / "demo")
