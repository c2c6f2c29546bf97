"""Corpus-scale search: one trained IVF index shared by shards filled in parallel from the embedding cache on disk.

The FAISS recipe for corpora that do not fit one process (FAISS's benchs/distributed_ondisk, contrib.ivf_tools):
1. train the coarse quantizer (and the PQ) once, on a sample of rows read from the `.npy` parts of the cache;
2. fill shards in parallel (Ray actors), each adding its parts, chunk by chunk, to a copy of the trained index;
3. search every shard with the same quantizer and nprobe and merge their top-k exactly: the shards probe the same
   lists, so the merged top-k equals one index's top-k over all rows (tested); PQ candidates are re-ranked by each
   shard with the stored float32 vectors it read them from (memory-mapped), so the merge compares exact scores.
The filled shards are saved next to the embeddings (`<cache>/<embedding folder>.ivf-<hash>/`, keyed by the
embedding folder, i.e. model fingerprint + corpus, and by the index spec) and reused: a second run builds nothing.
The driver holds no corpus vector: only the queries and the merged [Q, k] results.

`plan_index` is `--index auto`: exact search for small corpora, IVF-Flat when the vectors fit the memory budget,
IVF-PQ (4-bit fast-scan codes + re-ranking) otherwise. Shards need the cache folder on this node (or a shared
filesystem): they read it, nothing is shipped through Ray's object store.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lbr_ray.errors import LbrError
from lbr_ray.eval.index import ShardGroup, _pad, is_exact, merge_topk

MANIFEST = "manifest.json"  # written last into an index folder: only folders holding it are reused
EXACT_MAX_ROWS = 50_000  # below this, chunked exact search is fast enough that an ANN index does not pay off
SAMPLE_PER_LIST = 40  # training rows per IVF list (FAISS's k-means warns below 39)
CHUNK_ROWS = 65_536  # rows read from a part at a time (adding, exact search)
RERANK_MIN = 200  # PQ candidates re-ranked per query: at least this many, and 2k for top-k
RERANK_DEPTHS = (200, 500, 1000, 2000)  # depths tuning may go up to (denser corpora rank neighbours closer)


class CorpusIndexError(LbrError):
    """A corpus-scale index cannot be planned, built or loaded (bad memory budget, unreadable index folder)."""


def parse_bytes(text: str | None) -> int | None:
    """'6G', '512M', '2.5GiB', '1000000' -> bytes; None stays None."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
    if not m:
        raise CorpusIndexError(f"--index-memory {text!r}: expected a size such as 4G, 512M or 2.5GiB")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def default_memory_budget() -> int:
    """A quarter of this machine's memory: the index shares it with Ray, the encoder and the page cache."""
    import psutil

    return psutil.virtual_memory().total // 4


@dataclass(frozen=True)
class IndexPlan:
    """What `--index auto` chose for a corpus and why. spec "exact" = chunked exact search (no index)."""

    spec: str
    n: int
    dim: int
    budget: int
    bytes_per_vector: float  # in-memory index bytes per passage (codes + ids), quantizer excluded
    rerank: int  # candidates re-ranked with the stored vectors per query (0 = scores are already exact)
    why: str

    @property
    def nlist(self) -> int:
        m = re.search(r"IVF(\d+)", self.spec)
        return int(m.group(1)) if m else 0


def nlist_for(n: int) -> int:
    """~2 sqrt(n) lists (a power of two, FAISS's guideline is 1-16 sqrt(n)), at most 4096: k-means training and
    assigning rows to lists cost n * nlist * dim, which bounds the build time on CPUs; >= 39 rows per list."""
    nlist = 2 ** int(np.log2(max(2 * np.sqrt(n), 1)))
    return int(max(1, min(nlist, 4096, n // 39)))


def pq_size(dim: int) -> int:
    """PQ sub-quantizers: the largest of 8..256 that divides dim with >= 6 dimensions each (576 -> 96, i.e. 48-byte
    4-bit codes; 768 -> 128, 384 -> 64, 128 -> 16)."""
    for m in (256, 192, 128, 96, 64, 48, 32, 24, 16, 8):
        if dim % m == 0 and dim // m >= 6:
            return m
    return 0


def plan_index(n: int, dim: int, k: int = 100, budget: int | None = None, use_gpu: bool = False) -> IndexPlan:
    """`--index auto` for n passages of size dim within `budget` bytes of index memory (default: a quarter of
    the machine's memory), the way autofaiss picks: exact when small, IVF-Flat when the vectors fit, IVF-PQ else.
    On GPUs the PQ codes are 8-bit (fast-scan is CPU-only), which FAISS's GPU IVF-PQ supports."""
    budget = budget or default_memory_budget()
    flat = 4 * dim + 8
    if n <= EXACT_MAX_ROWS:
        return IndexPlan("exact", n, dim, budget, 4 * dim, 0, f"{n} passages <= {EXACT_MAX_ROWS}: exact search")
    nlist = nlist_for(n)
    if n * flat <= budget:
        return IndexPlan(f"IVF{nlist},Flat", n, dim, budget, flat, 0,
                         f"{n} x {dim} float32 ({_gib(n * flat)}) fit the index memory budget {_gib(budget)}")
    m = pq_size(dim)
    if not m:
        raise CorpusIndexError(f"the vectors ({_gib(n * flat)}) exceed --index-memory {_gib(budget)} and their size "
                               f"{dim} splits into no PQ (8 or more parts of >= 6 dimensions); raise --index-memory")
    code = m if use_gpu else m // 2
    while m > 8 and n * (code + 8) > budget:  # halving keeps m a divisor of dim
        m //= 2
        code = m if use_gpu else m // 2
    if n * (code + 8) > budget:
        raise CorpusIndexError(f"even {code}-byte PQ codes of {n} passages ({_gib(n * (code + 8))}) exceed "
                               f"--index-memory {_gib(budget)}; raise it")
    spec = f"IVF{nlist},PQ{m}" + ("" if use_gpu else "x4fs")
    return IndexPlan(spec, n, dim, budget, code + 8, max(RERANK_MIN, 2 * k),
                     f"{n} x {dim} float32 ({_gib(n * flat)}) exceed the budget {_gib(budget)}: {code}-byte PQ "
                     f"codes, candidates re-ranked with the stored vectors")


def _gib(b: float) -> str:
    return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def spec_plan(spec: str, n: int, dim: int, k: int = 100) -> IndexPlan:
    """An IndexPlan for an explicit FAISS factory string (PQ codes are re-ranked, Flat lists are not)."""
    if is_exact(spec):
        return IndexPlan("exact", n, dim, 0, 4 * dim, 0, f"--index {spec}: exact search")
    pq = re.search(r"PQ(\d+)(x4fs)?", spec)
    if pq:
        code, rerank = int(pq.group(1)) // (2 if pq.group(2) else 1) + 8, max(RERANK_MIN, 2 * k)
    else:
        code, rerank = 4 * dim + 8, 0
    return IndexPlan(spec, n, dim, 0, code, rerank, "given")


def train_sample_size(plan: IndexPlan) -> int:
    """Rows to train on: SAMPLE_PER_LIST per IVF list, and >= 256 per PQ centroid (2^bits of them)."""
    bits = 4 if "x4fs" in plan.spec else 8
    pq = 256 * 2 ** bits if "PQ" in plan.spec else 0
    return int(min(plan.n, max(SAMPLE_PER_LIST * plan.nlist, pq)))


class _Parts:
    """Memory-mapped `.npy` parts of one cache folder and a global-row -> (part, offset) lookup."""

    def __init__(self, folder: str | Path, parts: list[str]):
        self.folder, self.names = Path(folder), list(parts)
        self.emb = [np.load(self.folder / f"{p}.npy", mmap_mode="r") for p in self.names]
        self.rows = [np.load(self.folder / f"{p}.rows.npy") for p in self.names]
        all_rows = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)
        self.order = np.argsort(all_rows, kind="stable")
        self.sorted_rows = all_rows[self.order]
        self.part_of = np.repeat(np.arange(len(self.rows)), [len(r) for r in self.rows])
        self.offset = np.concatenate([np.arange(len(r)) for r in self.rows]) if self.rows else self.part_of

    @property
    def n(self) -> int:
        return int(self.sorted_rows.size)

    def chunks(self, size: int = CHUNK_ROWS):
        """(float32 [c, D] contiguous copy, global rows [c]) over every part, `size` rows at a time."""
        for emb, rows in zip(self.emb, self.rows):
            for s in range(0, len(rows), size):
                yield np.ascontiguousarray(emb[s:s + size], dtype=np.float32), rows[s:s + size]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of global `rows` (which this object holds), [len(rows), D]."""
        pos = self.order[np.searchsorted(self.sorted_rows, rows)]
        part, off = self.part_of[pos], self.offset[pos]
        out = np.empty((len(rows), self.emb[0].shape[1]), dtype=np.float32)
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            sel = sel[np.argsort(off[sel])]  # ascending offsets: sequential reads of the mapped file
            out[sel] = self.emb[p][off[sel]]
        return out


def read_sample(folder: str | Path, parts: list[str], size: int, seed: int = 0) -> np.ndarray:
    """`size` rows drawn uniformly (seeded) from the parts, read from disk: [size, D] float32."""
    lens = [np.load(Path(folder) / f"{p}.rows.npy", mmap_mode="r").shape[0] for p in parts]
    pick = np.sort(np.random.default_rng(seed).choice(sum(lens), size=min(size, sum(lens)), replace=False))
    starts = np.cumsum([0] + lens)
    out = []
    for i, p in enumerate(parts):
        local = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
        if len(local):
            out.append(np.asarray(np.load(Path(folder) / f"{p}.npy", mmap_mode="r")[local], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(out))


def train_index(spec: str, sample: np.ndarray, threads: int = 0, use_gpu: bool = False) -> bytes:
    """Train an empty FAISS index (inner product) on `sample`, on a GPU where asked and visible; returns it
    serialised (the CPU form, shipped to every shard)."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        index = faiss.index_factory(sample.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise CorpusIndexError(f"bad FAISS index string {spec!r} ({str(e).strip().splitlines()[-1][:160]})") from None
    if use_gpu and faiss.get_num_gpus() > 0:
        gpu = _to_gpu(index, faiss.StandardGpuResources())
        if gpu is not index:  # k-means (and PQ training) on the GPU
            gpu.train(sample)
            index = faiss.index_gpu_to_cpu(gpu)
    if not index.is_trained:
        index.train(sample)
    return faiss.serialize_index(index).tobytes()


class IVFShard:
    """One shard: the trained index filled with some parts of the cache (or its saved files read back), and those
    parts memory-mapped for re-ranking and exact search. Used in-process or as a Ray actor."""

    def __init__(self, folder: str, parts: list[str], trained: bytes | None = None, saved: list[str] = (),
                 threads: int = 0, use_gpu: bool = False):
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        self.data = _Parts(folder, parts)
        self.use_gpu = use_gpu and faiss.get_num_gpus() > 0
        self.gpu_res = faiss.StandardGpuResources() if self.use_gpu else None
        if saved:  # several saved shards are searched one after the other and merged
            self.cpu = [faiss.read_index(path) for path in saved]
        elif trained is not None:
            index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
            for emb, rows in self.data.chunks():
                index.add_with_ids(emb, rows.astype(np.int64))
            self.cpu = [index]
        else:  # exact search only
            self.cpu = []
        self.indexes = [_to_gpu(i, self.gpu_res) for i in self.cpu] if self.use_gpu else self.cpu

    def ntotal(self) -> int:
        return self.data.n

    def save(self, path: str) -> int:
        """Write the filled index (CPU form); returns its size in bytes."""
        import faiss

        faiss.write_index(self.cpu[0], path)
        return os.path.getsize(path)

    def memory(self) -> dict:
        """This process's resident bytes, and how many of them are mapped file pages (the embedding parts read
        for re-ranking and exact search: page cache the kernel can drop, not the shard's own memory)."""
        import psutil

        info = psutil.Process().memory_info()
        return {"rss": info.rss, "file_backed": info.shared}

    def set_params(self, params: str) -> None:
        import faiss

        space = faiss.GpuParameterSpace() if self.use_gpu else faiss.ParameterSpace()
        for index in self.indexes:
            space.set_index_parameters(index, params)

    def search(self, q: np.ndarray, k: int, rerank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], global rows [Q, k]); with rerank, the index's top `rerank` candidates re-scored with
        their stored vectors (exact scores). Missing results are row -1 with score -inf."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not self.indexes:
            return self.exact(q, k)
        out = []
        for index in self.indexes:
            scores, rows = index.search(q, min(max(k, rerank), max(index.ntotal, 1)))
            if rerank:
                scores = self._exact_scores(q, rows)
            out.append(_pad(np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows.astype(np.int64), k))
        return merge_topk(out, k)

    def _exact_scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Each query's inner product with its own candidates' stored vectors ([Q, depth]; -inf for row -1),
        gathered for ~32 MB of candidate vectors at a time."""
        out = np.full(rows.shape, -np.inf, dtype=np.float32)
        block = max(1, (32 << 20) // (rows.shape[1] * q.shape[1] * 4))
        for s in range(0, len(q), block):
            cand = rows[s:s + block]
            uniq, pos = np.unique(np.maximum(cand, 0), return_inverse=True)
            vecs = self.data.vectors(uniq)[pos.reshape(cand.shape)]  # [b, depth, D]
            out[s:s + block] = np.where(cand >= 0, np.matmul(vecs, q[s:s + block, :, None])[..., 0], -np.inf)
        return out

    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over this shard's parts, read chunk by chunk (FAISS's blocked GEMM + heap per chunk)."""
        import faiss

        q = np.ascontiguousarray(q, dtype=np.float32)
        best = (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        for emb, rows in self.data.chunks():
            kk = min(k, len(rows))
            scores, local = faiss.knn_gpu(self.gpu_res, q, emb, kk, metric=faiss.METRIC_INNER_PRODUCT) \
                if self.use_gpu else faiss.knn(q, emb, kk, metric=faiss.METRIC_INNER_PRODUCT)
            found = np.where(local >= 0, rows[np.maximum(local, 0)], -1)
            best = merge_topk([best, (np.where(local >= 0, scores, -np.inf).astype(np.float32), found)], k)
        return best


def _to_gpu(index, res):
    import faiss

    try:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True  # PQ lookup tables in fp16: needed for large PQ sizes on GPUs
        return faiss.index_cpu_to_gpu(res, 0, index, co)
    except (RuntimeError, AttributeError):
        return index  # an index type without a GPU version stays on the CPU


def assign_parts(folder: str | Path, parts: list[str], num_shards: int) -> list[list[str]]:
    """Parts split into `num_shards` groups of near-equal row counts (largest part first)."""
    sizes = {p: np.load(Path(folder) / f"{p}.rows.npy", mmap_mode="r").shape[0] for p in parts}
    groups: list[list[str]] = [[] for _ in range(max(1, min(num_shards, len(parts))))]
    load = [0] * len(groups)
    for p in sorted(parts, key=lambda p: -sizes[p]):
        i = load.index(min(load))
        groups[i].append(p)
        load[i] += sizes[p]
    return [sorted(g) for g in groups if g]


def index_folder(embeddings: Path, plan: IndexPlan, seed: int) -> Path:
    """Where the index of one embedding folder (model fingerprint + corpus) and one spec is saved."""
    key = hashlib.sha1(f"{plan.spec}:{train_sample_size(plan)}:{seed}".encode()).hexdigest()[:12]
    return embeddings.with_name(f"{embeddings.name}.ivf-{key}")


class CorpusIndex(ShardGroup):
    """The sharded index of one cache folder, built (and saved) or read back, searched as one index.

        with CorpusIndex(docs.folder, docs.parts, plan, num_workers=2) as index:
            scores, rows = index.search(q, k=100)   # merged over shards, re-ranked where the plan says so
            exact_scores, exact_rows = index.exact(q[:500], 10)
    """

    def __init__(self, folder: str | Path, parts: list[str], plan: IndexPlan, num_workers: int = 1,
                 use_gpu: bool = False, threads: int = 0, seed: int = 0, log=print, num_shards: int | None = None):
        """num_shards: shards to fill (default one per worker); saved shards are spread over the workers."""
        self.plan, self.folder, self.log = plan, Path(folder), log
        self.num_workers, self.use_gpu, self.threads = num_workers, use_gpu, threads
        self.actors, self.local, self.params, self.rerank = [], [], "", plan.rerank
        self.info: dict = {"spec": plan.spec, "plan": asdict(plan), "reused": False}
        shards = num_shards or max(num_workers, 1)
        if plan.spec == "exact":
            self._start([(g, []) for g in assign_parts(folder, parts, shards)])
            return
        where = index_folder(self.folder, plan, seed)
        manifest = _read_manifest(where)
        if manifest is None:
            self.info.update(self._build(where, parts, shards, seed))
            return
        saved = manifest["shards"]  # every shard reads its saved files (round robin when the worker count changed)
        readers = num_shards or max(num_workers, 1)
        groups = [saved[i::readers] for i in range(min(readers, len(saved)))]
        start = time.perf_counter()
        self._start([(sum((s["parts"] for s in g), []), [str(where / s["file"]) for s in g]) for g in groups])
        self.info.update(manifest, reused=True, load_seconds=round(time.perf_counter() - start, 2), folder=str(where))
        log(f"  index {plan.spec} read from {where} (built earlier in {manifest['build_seconds']:.0f}s)")

    def _start(self, jobs: list[tuple[list[str], list[str]]], trained: bytes | None = None) -> None:
        """One shard per (parts, saved files) job: filled from `trained`, or read from its saved files."""
        if self.num_workers == 0:
            self.local = [IVFShard(str(self.folder), parts, trained, saved, self.threads, self.use_gpu)
                          for parts, saved in jobs]
            return
        import ray

        from lbr_ray.eval.encode import gpu_share

        actor = ray.remote(IVFShard).options(num_cpus=self.threads or 1,
                                             num_gpus=gpu_share(len(jobs)) if self.use_gpu else 0)
        ref = ray.put(trained) if trained is not None else None
        self.actors = [actor.remote(str(self.folder), parts, ref, saved, self.threads, self.use_gpu)
                       for parts, saved in jobs]
        self._call("ntotal")  # wait until every shard is filled / read

    def _build(self, where: Path, parts: list[str], shards: int, seed: int) -> dict:
        from lbr_ray.eval.encode import _publish, _tmp_folder

        start = time.perf_counter()
        size = train_sample_size(self.plan)
        threads = self.threads * shards if self.threads else 0  # nothing else runs while it trains: every thread
        if self.num_workers == 0:
            trained = train_index(self.plan.spec, read_sample(self.folder, parts, size, seed), threads,
                                  self.use_gpu)
        else:  # in a Ray task: the driver never holds the sample
            import ray

            task = ray.remote(_train_from_disk).options(num_cpus=self.threads or 1, num_gpus=int(self.use_gpu))
            trained = ray.get(task.remote(str(self.folder), parts, self.plan.spec, size, seed, threads,
                                          self.use_gpu))
        train_s = time.perf_counter() - start
        self.log(f"  index {self.plan.spec}: trained on {size} sampled passages in {train_s:.0f}s, filling "
                 f"{shards} shard(s) from {self.folder}")
        groups = assign_parts(self.folder, parts, shards)
        self._start([(g, []) for g in groups], trained)
        fill_s = time.perf_counter() - start - train_s
        tmp = _tmp_folder(where)
        tmp.mkdir(parents=True)
        files = [f"shard-{i:03d}.faissindex" for i in range(len(groups))]
        sizes = self._call("save", each=[(str(tmp / f),) for f in files])
        manifest = {"spec": self.plan.spec, "n": self.plan.n, "dim": self.plan.dim, "seed": seed,
                    "train_rows": size, "train_seconds": round(train_s, 2), "fill_seconds": round(fill_s, 2),
                    "build_seconds": round(time.perf_counter() - start, 2), "index_bytes": int(sum(sizes)),
                    "bytes_per_vector": round(sum(sizes) / max(self.plan.n, 1), 2),
                    "shards": [{"file": f, "parts": g} for f, g in zip(files, groups)]}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        _publish(tmp, where)
        self.log(f"  index {self.plan.spec}: {len(groups)} shard(s) filled in {fill_s:.0f}s, "
                 f"{manifest['bytes_per_vector']:.1f} bytes/passage, saved to {where}")
        return {**manifest, "folder": str(where)}

    def _call(self, method: str, *args, each: list[tuple] | None = None) -> list:
        """`method(*args)` on every shard (in parallel for actors), or `method(*each[i])` on shard i."""
        shards = self.local or self.actors
        calls = each if each is not None else [args] * len(shards)
        if self.local:
            return [getattr(s, method)(*c) for s, c in zip(shards, calls)]
        import ray

        return ray.get([getattr(a, method).remote(*c) for a, c in zip(shards, calls)])

    def set_params(self, params: str) -> None:
        """FAISS search parameters ("nprobe=16"), plus "rerank=N": PQ candidates re-scored per query."""
        self.params = params
        items = [p.strip() for p in params.split(",") if p.strip()]
        depth = [int(p.split("=", 1)[1]) for p in items if p.startswith("rerank=")]
        self.rerank = depth[-1] if depth and self.plan.rerank else self.plan.rerank
        faiss_params = ",".join(p for p in items if not p.startswith("rerank="))
        if faiss_params:
            self._call("set_params", faiss_params)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk(self._call("search", self._share(q), k, self.rerank), k)

    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every shard's parts, chunk by chunk (what the index is measured against)."""
        return merge_topk(self._call("exact", self._share(q), k), k)

    def _share(self, q: np.ndarray):
        if q.shape[1] != self.plan.dim:
            raise LbrError(f"embedding size mismatch: queries have size {q.shape[1]}, passages {self.plan.dim}; "
                           "encode both with the same model")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.local:
            return q
        import ray

        return ray.put(q)

    def worker_memory(self) -> list[dict]:
        """IVFShard.memory of each shard's process (in-process shards: the driver's)."""
        return self._call("memory")


def _train_from_disk(folder: str, parts: list[str], spec: str, size: int, seed: int, threads: int,
                     use_gpu: bool = False) -> bytes:
    return train_index(spec, read_sample(folder, parts, size, seed), threads, use_gpu)


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


TUNE_QUERIES = 500  # queries the search parameter is tuned on; as many others measure its recall


def search_candidates(plan: IndexPlan) -> list[list[str]]:
    """Search settings to try, cheapest first, in groups: per re-rank depth (PQ plans: RERANK_DEPTHS from the
    plan's), nprobe doubling up to nlist (IVF-Flat) or nlist / 8 (PQ: past that a deeper re-rank pays more)."""
    top = plan.nlist if not plan.rerank else max(1, plan.nlist // 8)
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if p < top] + [top]
    if not plan.rerank:
        return [[f"nprobe={p}" for p in probes]]
    depths = [d for d in RERANK_DEPTHS if d > plan.rerank]
    return [[f"nprobe={p},rerank={d}" for p in probes] for d in [plan.rerank] + depths]


def tune_corpus_search(index: CorpusIndex, q: np.ndarray, exact_top: np.ndarray, target: float,
                       k: int = 10) -> tuple[str, list[dict]]:
    """The first setting of `search_candidates` whose recall@k against `exact_top` reaches `target`; a group is
    left once recall stops rising (+0.002 or less per step). None reaching it: the best seen. Returns it and the
    trace of (params, recall@10)."""
    from lbr_ray.eval.metrics import ann_recall

    trace = []
    for group in search_candidates(index.plan):
        previous = -1.0
        for params in group:
            index.set_params(params)
            recall = ann_recall(index.search(q, k)[1], exact_top[:, :k], k)
            trace.append({"params": params, "recall@10": recall})
            if recall >= target:
                return params, trace
            if recall <= previous + 0.002:
                break
            previous = recall
    return max(trace, key=lambda t: t["recall@10"])["params"], trace


def search_corpus(folder: str | Path, parts: list[str], n: int, dim: int, q: np.ndarray, k: int, index: str = "auto",
                  index_params: str = "auto", budget: int | None = None, num_workers: int = 1, use_gpu: bool = False,
                  threads: int = 0, seed: int = 0, log=print, queries_key: str = "") -> dict:
    """`lbr eval --index auto` (or an IVF factory string) over one cache folder of passage embeddings.

    The index is planned (`plan_index`), built or read back (CorpusIndex), then exact search over up to
    2 x TUNE_QUERIES sampled queries, computed chunk by chunk, gives the reference: the cheapest nprobe reaching
    recall@10 >= AUTO_TARGET on the first half is chosen (`index_params="auto"`), all queries are searched with it,
    and recall@10 against exact search is reported on the other half (queries the tuning never saw) next to the
    queries/s of both searches; with `index="auto"`, an index slower than exact search is not used (`used: exact`,
    every query searched exactly). The reference (and its search time) is saved in the index folder under
    `queries_key` (the query embeddings' cache name) and read back by the next run with the same queries. For the
    exact plan every query is searched exactly."""
    from lbr_ray.eval.index import AUTO_TARGET
    from lbr_ray.eval.metrics import ann_recall

    plan = plan_index(n, dim, k, budget, use_gpu) if index == "auto" else spec_plan(index, n, dim, k)
    log(f"  index plan: {plan.spec} ({plan.why})")
    k = min(k, n)
    with CorpusIndex(folder, parts, plan, num_workers, use_gpu, threads, seed, log) as ix:
        run = {"index": plan.spec, "index_params": "", "index_plan": plan.why, "auto_trace": [], "used": "ann",
               "index_build": {key: ix.info.get(key) for key in ("reused", "build_seconds", "train_seconds",
                                                                 "fill_seconds", "load_seconds", "bytes_per_vector",
                                                                 "index_bytes", "folder")}}
        if plan.spec == "exact":
            start = time.perf_counter()
            scores, top = ix.search(q, k)
            run["search_seconds"] = run["exact_search_seconds"] = time.perf_counter() - start
            run.update({"used": "exact", "ann_recall@10": 1.0, "qps_exact": len(q) / max(run["search_seconds"], 1e-9),
                        "qps_ratio_vs_exact": 1.0, "top": top, "scores": scores,
                        "worker_memory": ix.worker_memory()})
            return run
        pick = np.random.default_rng(seed).permutation(len(q))[: min(len(q), 2 * TUNE_QUERIES)]
        tune, held = pick[: (len(pick) + 1) // 2], pick[(len(pick) + 1) // 2:]
        exact_top, exact_s, saved = _exact_reference(ix, q[pick], min(10, k), queries_key, seed)
        run["exact_reference"] = "read back" if saved else "computed"
        params = index_params
        if index_params == "auto":
            params, run["auto_trace"] = tune_corpus_search(ix, q[tune], exact_top[: len(tune)], AUTO_TARGET,
                                                           min(10, k))
        ix.set_params(params)
        start = time.perf_counter()
        scores, top = ix.search(q, k)
        search_s = time.perf_counter() - start
        held = held if len(held) else tune  # a single query: measured on the one it was tuned on
        reference = exact_top[len(tune):] if len(pick) > 1 else exact_top
        recall = ann_recall(top[held], reference, min(10, k))
        qps, qps_exact = len(q) / max(search_s, 1e-9), len(pick) / max(exact_s, 1e-9)
        slower = qps < qps_exact and index == "auto"  # an index slower than exact search is reported, not used
        log(f"  {plan.spec} {params}: recall@10 vs exact {recall:.4f} on {len(held)} queries not used for tuning "
            f"(target {AUTO_TARGET}), {qps:.0f} q/s vs {qps_exact:.1f} q/s exact ({qps / qps_exact:.1f}x)"
            + ("; slower than exact search, so every query is searched exactly" if slower else ""))
        if slower:
            start = time.perf_counter()
            scores, top = ix.exact(q, k)
            run.update(used="exact", ann_search_seconds=search_s)
            search_s = time.perf_counter() - start
        run.update({"index_params": params, "top": top, "scores": scores, "search_seconds": search_s,
                    "ann_recall@10": recall, "ann_recall_queries": len(held), "exact_search_seconds": exact_s,
                    "exact_queries": len(pick), "qps_exact": qps_exact, "qps_ratio_vs_exact": qps / qps_exact,
                    "worker_memory": ix.worker_memory()})
        return run


def _exact_reference(ix: CorpusIndex, q: np.ndarray, k: int, queries_key: str, seed: int):
    """(exact top-k of q, seconds it took, read back?): computed by the shards, or read from the index folder."""
    path = None
    if queries_key and ix.info.get("folder"):
        key = hashlib.sha1(f"{queries_key}:{seed}:{len(q)}:{k}".encode()).hexdigest()[:12]
        path = Path(ix.info["folder"]) / f"exact-{key}.npz"
        if path.is_file():
            got = np.load(path)
            return got["top"], float(got["seconds"]), True
    start = time.perf_counter()
    _, top = ix.exact(q, k)
    seconds = time.perf_counter() - start
    if path is not None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, top=top, seconds=seconds)
        os.replace(tmp, path)
    return top, seconds, False
