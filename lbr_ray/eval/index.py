"""Sharded top-k search: one FAISS index per shard, built and searched in parallel Ray actors, merged exactly.

A shard is a block of corpus rows ([n_i, D] embeddings + their global row numbers). Each shard returns its local
top-k with global rows; `merge_topk` keeps the best k over shards, which equals the top-k of one index over the
whole corpus for exact indexes. `spec` is a FAISS factory string ("Flat", "IVF256,Flat", "HNSW32", "IVF256,PQ32")
or "exact" (numpy, no FAISS). Ray is imported only when actors are used.
"""
from __future__ import annotations

import numpy as np

from lbr_ray.errors import LbrError
from lbr_ray.eval.metrics import retrieve_exact


class SearchIndexError(LbrError):
    """A FAISS index cannot be built or searched with the given factory string or data."""


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def is_exact(spec: str) -> bool:
    """True for indexes whose top-k equals exact search (no ANN recall to report)."""
    return spec.lower() in ("flat", "exact", "idmap,flat")


def check_index_spec(spec: str, dim: int, min_rows: int):
    """Build an empty FAISS index from `spec`, or raise SearchIndexError saying why it cannot work here."""
    import faiss

    try:
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise SearchIndexError(f"bad FAISS index string {spec!r} ({str(e).strip().splitlines()[-1][:160]}); "
                               "try Flat, IVF256,Flat or HNSW32") from None
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in spec.upper() else 1
        need = max(nlist, 256 if "PQ" in spec.upper() else 1)
        if min_rows < need:
            raise SearchIndexError(f"index {spec!r} needs at least {need} passages per shard to train, a shard has "
                                   f"{min_rows}; use fewer shards (--num-workers) or fewer IVF lists")
    return index


class ShardIndex:
    """One shard's index. Used in-process, or as a Ray actor (`ray.remote(ShardIndex)`)."""

    def __init__(self, emb: np.ndarray, rows: np.ndarray, spec: str = "Flat", params: str = "",
                 use_gpu: bool = False, threads: int = 0):
        self.rows, self.spec, self.emb = np.asarray(rows, dtype=np.int64), spec, None
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if spec.lower() == "exact" or not have_faiss():
            self.index, self.emb = None, emb
            return
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        index = check_index_spec(spec, emb.shape[1], emb.shape[0])
        if use_gpu and faiss.get_num_gpus() > 0:
            try:
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            except (RuntimeError, AttributeError):
                pass  # index type without a GPU version (HNSW): stays on the CPU
        if not index.is_trained:
            index.train(emb)
        index.add(emb)
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
        self.index = index

    def size(self) -> int:
        return int(self.rows.size)

    def cpu_seconds(self) -> float:
        """CPU time this process has used so far (all threads): per-query cost apart from the machine's load."""
        import time

        return time.process_time()

    def set_params(self, params: str) -> None:
        """Change the search parameters (e.g. nprobe=16, efSearch=64) of the built index."""
        if self.index is not None and params:
            import faiss

            faiss.ParameterSpace().set_index_parameters(self.index, params)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], global rows [Q, k]); missing results are row -1 with score -inf."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.index is None:
            scores, local = retrieve_exact(q, self.emb, k)
        else:
            scores, local = self.index.search(q, min(k, self.size()))
        rows = np.where(local >= 0, self.rows[np.maximum(local, 0)], -1)
        scores = np.where(local >= 0, scores, -np.inf).astype(np.float32)
        return _pad(scores, rows, k)


def _pad(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] >= k:
        return scores, rows
    extra = k - scores.shape[1]
    return (np.pad(scores, ((0, 0), (0, extra)), constant_values=-np.inf),
            np.pad(rows, ((0, 0), (0, extra)), constant_values=-1))


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k from per-shard (scores [Q, k_i], rows [Q, k_i]): best score first, ties by lower row."""
    scores = np.concatenate([s for s, _ in results], axis=1)  # [Q, sum k_i]
    rows = np.concatenate([r for _, r in results], axis=1)
    tie = np.where(rows >= 0, rows, np.iinfo(np.int64).max)
    order = np.lexsort((tie, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def group_shards(shards: list[tuple[np.ndarray, np.ndarray]], num_shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Concatenate encoded parts into `num_shards` search shards of near-equal row counts."""
    num_shards = max(1, min(num_shards, len(shards)))
    groups: list[list] = [[] for _ in range(num_shards)]
    sizes = [0] * num_shards
    for emb, rows in sorted(shards, key=lambda s: -len(s[1])):
        i = sizes.index(min(sizes))
        groups[i].append((emb, rows))
        sizes[i] += len(rows)
    return [(np.concatenate([np.asarray(e) for e, _ in g]), np.concatenate([r for _, r in g])) for g in groups if g]


class ShardGroup:
    """Shards held in this process (`local`) or as Ray actors (`actors`); closing (or leaving `with`) kills the
    actors."""

    actors: list
    local: list

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
        self.actors, self.local = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardedIndex(ShardGroup):
    """Search shards built once and searched many times: Ray actors (num_workers >= 1) or in-process (0).

        with ShardedIndex(shards, "IVF256,Flat", "nprobe=8", num_workers=2) as index:
            scores, rows = index.search(q, k=100)     # [Q, k] each, merged over shards
    """

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray]], spec: str = "Flat", params: str = "",
                 num_workers: int = 1, use_gpu: bool = False, threads: int = 0):
        dims = {np.asarray(e).shape[1] for e, _ in shards}
        if len(dims) != 1:
            raise LbrError(f"embedding size mismatch: passage shards have sizes {sorted(dims)}")
        self.dim, self.actors, self.local = dims.pop(), [], []
        groups = group_shards(shards, max(num_workers, 1))
        if spec.lower() != "exact" and have_faiss():
            check_index_spec(spec, self.dim, min(len(r) for _, r in groups))  # fail here, not inside an actor
        if num_workers == 0:
            self.local = [ShardIndex(e, r, spec, params, use_gpu, threads) for e, r in groups]
            return
        import ray

        from lbr_ray.eval.encode import gpu_share

        gpus = gpu_share(len(groups)) if use_gpu else 0
        actor_cls = ray.remote(ShardIndex).options(num_cpus=threads or 1, num_gpus=gpus)
        self.actors = [actor_cls.remote(ray.put(e), r, spec, params, use_gpu, threads) for e, r in groups]
        ray.get([a.size.remote() for a in self.actors])  # wait until every shard's index is built

    def set_params(self, params: str) -> None:
        if self.local:
            for s in self.local:
                s.set_params(params)
        else:
            import ray

            ray.get([a.set_params.remote(params) for a in self.actors])

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if q.shape[1] != self.dim:
            raise LbrError(f"embedding size mismatch: queries have size {q.shape[1]}, passages {self.dim}; "
                           "encode both with the same model")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.local:
            return merge_topk([s.search(q, k) for s in self.local], k)
        import ray

        q_ref = ray.put(q)
        return merge_topk(ray.get([a.search.remote(q_ref, k) for a in self.actors]), k)  # shards in parallel


def search_shards(shards: list[tuple[np.ndarray, np.ndarray]], q: np.ndarray, k: int, spec: str = "Flat",
                  params: str = "", num_workers: int = 1, use_gpu: bool = False,
                  threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over all shards in one call: build the shard indexes, search, release them."""
    with ShardedIndex(shards, spec, params, num_workers, use_gpu, threads) as index:
        return index.search(q, k)


AUTO_TARGET = 0.99  # recall@10 against exact search that `--index-params auto` must reach on the sample


def search_param_candidates(spec: str) -> list[str]:
    """Search parameters of an ANN index from cheapest to most exact: nprobe (IVF) or efSearch (HNSW)."""
    up = spec.upper()
    if "IVF" in up:
        nlist = int("".join(c for c in up.split("IVF", 1)[1].split(",", 1)[0] if c.isdigit()) or 1)
        return [f"nprobe={p}" for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if p < nlist] + \
            [f"nprobe={nlist}"]
    if "HNSW" in up:
        return [f"efSearch={e}" for e in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    return [""]


def tune_search_params(index: "ShardedIndex", sample: np.ndarray, exact_top: np.ndarray, spec: str,
                       target: float = AUTO_TARGET, k: int = 10) -> tuple[str, list[dict]]:
    """The cheapest search parameter whose recall@k against exact search on `sample` reaches `target` (the most
    exact candidate if none does); returns it and the (params, recall) trace."""
    from lbr_ray.eval.metrics import ann_recall

    trace = []
    for params in search_param_candidates(spec):
        index.set_params(params)
        _, top = index.search(sample, k)
        recall = ann_recall(top, exact_top[:, :k], k)
        trace.append({"params": params, "recall@10": recall})
        if recall >= target:
            return params, trace
    return trace[-1]["params"], trace
