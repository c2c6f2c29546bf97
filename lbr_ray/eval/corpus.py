"""Corpus-scale eval sets: the driver keeps queries, qrels and passage ids; passage texts go to disk once.

One pass over the files streams every passage through a de-duplication by text key (a 64-bit prefix of
`text_key`) into parquet parts of `SPILL_ROWS` rows (row, text; sorted by length inside a part, so encoder batches
pad little). The set is saved under `<cache>/corpora/<name>-<key>/` (key: the source files' paths, sizes and
modification times, the split and the options) and read back on the next run without reading the files.
`encode_streamed` feeds those parts to the encoder actors (Ray Data `read_parquet` -> `map_batches`) and writes the
embeddings as a normal cache folder (lbr_ray.eval.encode), a part of `PART_ROWS` rows at a time.

Corpus per set: a domain's test positives and its `corpus*` passages (as lbr_ray.eval.sets), or, `joint=True`,
every passage of the listed domains as one corpus (their `corpus*` passages and the positives of every split) with
every domain's test queries.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lbr_ray.config.schema import SplitConfig
from lbr_ray.data.split import text_key
from lbr_ray.eval.encode import EncodeUDF, _fetch_cache, _publish, _ShardWriter, _tmp_folder, gpu_share, read_cache
from lbr_ray.eval.sets import EvalSetError, _by_hash, _split_queries, difficulty, domain_dir

SPILL_ROWS = 16_384  # passages per parquet part of a spilled corpus (one encoder task each)
PART_ROWS = 65_536  # embeddings per `.npy` part written by encode_streamed
MANIFEST = "manifest.json"
VERSION = 1  # bump when the layout of a saved set changes


class SpilledTexts(Sequence):
    """The passage texts of a StreamedSet, read from its parts on first access (BM25 needs them all)."""

    def __init__(self, folder: Path, parts: list[str], n: int):
        self.folder, self.parts, self.n, self._texts = folder, parts, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if self._texts is None:
            import pyarrow.parquet as pq

            texts = [""] * self.n
            for part in self.parts:
                table = pq.read_table(self.folder / part)
                for row, text in zip(table["row"].to_numpy(), table["text"].to_pylist()):
                    texts[row] = text
            self._texts = texts
        return self._texts[i]


@dataclass
class StreamedSet:
    """An eval set whose passage texts stay on disk: the same fields as lbr_ray.eval.sets.EvalSet, with
    `doc_texts` read lazily, `doc_ids` a numpy array, and `digest` = sha1 over the passages in row order."""

    domain: str
    queries: list[str]
    query_types: list[str]
    query_difficulty: list[str]
    qrels: list[np.ndarray]
    doc_ids: np.ndarray
    folder: Path
    parts: list[str]
    digest: str
    n_distractors: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def doc_texts(self) -> SpilledTexts:
        return SpilledTexts(self.folder, self.parts, len(self.doc_ids))

    @property
    def corpus_hash(self) -> str:
        return self.digest


def _sources(data_root: str | Path, domains: tuple[str, ...]) -> list[Path]:
    """The pairs* and corpus* files of the domains: what a set is built from."""
    return [f for d in domains for f in sorted(domain_dir(data_root, d).glob("*"))
            if f.name.startswith(("pairs", "corpus"))]


def set_key(data_root, domains, split: SplitConfig, max_queries, seed, joint, max_corpus=None) -> str:
    """What a saved set depends on: each source file's path, size and modification time, and the options."""
    files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in _sources(data_root, domains)]
    blob = json.dumps([VERSION, files, split.model_dump() if hasattr(split, "model_dump") else str(split),
                       max_queries, seed, joint, max_corpus], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def build_streamed_set(data_root: str | Path, domains: tuple[str, ...], cache_dir: str | Path,
                       split: SplitConfig = SplitConfig(), max_queries: int | None = None, seed: int = 0,
                       joint: bool = False, log=print, max_corpus: int | None = None) -> StreamedSet:
    """One domain's set (`domains=(d,)`), or all of them as one corpus (`joint=True`), built or read back.
    `max_corpus` (one domain only) takes lbr_ray.eval.sets' sample, built in memory as there: the same passages
    in the same rows."""
    if not joint and len(domains) != 1:
        raise EvalSetError("a per-domain streamed set takes one domain; pass joint=True for one corpus of several")
    name = "joint" if joint else domains[0]
    key = set_key(data_root, domains, split, max_queries, seed, joint, max_corpus)
    folder = Path(cache_dir) / "corpora" / f"{name}-{key}"
    if (folder / MANIFEST).is_file():
        return _load(folder)
    start = time.perf_counter()
    tmp = _tmp_folder(folder)
    tmp.mkdir(parents=True)
    try:
        if max_corpus is None:
            _build(tmp, data_root, domains, name, split, max_queries, seed, joint)
        else:
            _build_capped(tmp, data_root, name, split, max_queries, max_corpus, seed)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, folder)
    sset = _load(folder)
    log(f"[{name}] corpus of {len(sset.doc_ids)} passages written to {folder} in {time.perf_counter() - start:.0f}s")
    return sset


def _build(out: Path, data_root, domains, name, split, max_queries, seed, joint) -> None:
    grouped: dict[str, dict] = {}
    for d in domains:
        for query, entry in _split_queries(domain_dir(data_root, d), split, "test").items():
            if query in grouped:  # the same query in two domains: one query, all positives relevant
                grouped[query]["positives"] += entry["positives"]
            else:
                grouped[query] = entry
    queries = list(grouped)
    keep = _by_hash(queries, max_queries, seed)
    queries = [q for i, q in enumerate(queries) if i in keep]
    wanted = {text_key(p) for q in queries for p in grouped[q]["positives"]}  # rows of these go to the qrels
    spill = _Spill(out, wanted)
    notes = []
    for d in domains:
        files = sorted(domain_dir(data_root, d).glob("corpus*"))
        if not files:
            notes.append(f"{d}: no corpus file, so its passages are its {'positives' if joint else 'test positives'}")
        for rec in _stream(files, "corpus"):
            spill.add(rec["id"], rec["text"])
    if joint:  # every passage: the positives of every split
        for d in domains:
            for rec in _stream(sorted(domain_dir(data_root, d).glob("pairs*")), "pairs"):
                spill.add(None, rec["positive"])
    else:
        for q in queries:
            for p in grouped[q]["positives"]:
                spill.add(None, p)
    spill.close()
    if not spill.n:
        raise EvalSetError(f"empty corpus for {name}")
    qrels = [sorted({spill.row_of[text_key(p)] for p in grouped[q]["positives"]}) for q in queries]
    _save(out, name, spill, spill.unique_ids(), queries, [grouped[q]["type"] for q in queries],
          [difficulty(grouped[q]["type"], grouped[q]["source"]) for q in queries], qrels,
          spill.n - len({spill.row_of[k] for k in wanted}), notes)


def _stream(files, kind: str):
    """Checked records of the files as they are parsed: not through the reader's per-process memo
    (lbr_ray.data.readers._parsed), which keeps every record of a file up to 32 MB on disk (compressed)."""
    from lbr_ray.data.readers import MAX_RECORD_BYTES, _parse
    from lbr_ray.errors import DataError

    for f in files:
        for _, item in _parse(str(f), kind, MAX_RECORD_BYTES):
            if isinstance(item, DataError):
                raise item
            yield item


def _build_capped(out: Path, data_root, name, split, max_queries, max_corpus, seed) -> None:
    from lbr_ray.eval.sets import build_eval_set

    eset = build_eval_set(data_root, name, split, max_queries, max_corpus, seed)
    spill = _Spill(out, set())
    for text in eset.doc_texts:  # already distinct: row i stays row i
        spill.add("", text)
    spill.close()
    _save(out, name, spill, list(eset.doc_ids), eset.queries, eset.query_types, eset.query_difficulty,
          [q.tolist() for q in eset.qrels], eset.n_distractors, eset.notes)


def _save(out: Path, name, spill, ids, queries, types, difficulties, qrels, n_distractors, notes) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"version": VERSION, "domain": name, "n": spill.n, "digest": spill.digest.hexdigest(),
            "parts": spill.parts, "n_distractors": n_distractors, "notes": notes, "queries": queries,
            "query_types": types, "query_difficulty": difficulties, "qrels": qrels}
    pq.write_table(pa.table({"id": ids}), out / "ids.parquet")
    (out / MANIFEST).write_text(json.dumps(meta))


class _Spill:
    """Assigns rows to distinct passages in arrival order and writes them to parquet parts; keeps per row only the
    id and a 64-bit key (the rows of `wanted` positives are looked up by full key afterwards)."""

    def __init__(self, out: Path, wanted: set[str]):
        from array import array

        self.out, self.parts, self.buf, self.wanted = out, [], [], wanted
        self.seen: set[int] = set()
        self.ids: list[str] = []
        self.keys = array("Q")
        self.row_of: dict[str, int] = {}  # full text key -> row, for the `wanted` positives only
        self.digest = hashlib.sha1()
        self.n = 0

    def add(self, doc_id: str | None, text: str) -> None:
        key = text_key(text)
        h = int(key[:16], 16)
        if h in self.seen:
            return
        self.seen.add(h)
        if key in self.wanted:
            self.row_of[key] = self.n
        self.ids.append(f"pos:{key[:16]}" if doc_id is None else str(doc_id))  # a positive no corpus file holds
        self.keys.append(h)
        self.buf.append((self.n, text))
        self.digest.update(hashlib.sha1(text.encode("utf-8")).digest())
        self.n += 1
        if len(self.buf) >= SPILL_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buf:
            return
        self.buf.sort(key=lambda rt: len(rt[1]))
        name = f"text-{len(self.parts):05d}.parquet"
        pq.write_table(pa.table({"row": [r for r, _ in self.buf], "text": [t for _, t in self.buf]}),
                       self.out / name)
        self.parts.append(name)
        self.buf = []

    def close(self) -> None:
        self._flush()
        self.seen = set()

    def unique_ids(self) -> list[str]:
        """One id per passage as lbr_ray.eval.sets.unique_ids makes them (whitespace replaced; an id several
        passages share gets `~` + the first 12 hex digits of the passage's text key)."""
        from lbr_ray.eval.trec import doc_id

        ids = np.asarray([doc_id(i) for i in self.ids], dtype=object)
        _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        for row in np.flatnonzero(counts[inverse] > 1):
            ids[row] = f"{ids[row]}~{self.keys[row]:016x}"[: len(ids[row]) + 13]
        return ids.tolist()


def _load(folder: Path) -> StreamedSet:
    import pyarrow.parquet as pq

    m = json.loads((folder / MANIFEST).read_text())
    ids = np.asarray(pq.read_table(folder / "ids.parquet")["id"].to_pylist(), dtype=object)
    return StreamedSet(domain=m["domain"], queries=m["queries"], query_types=m["query_types"],
                       query_difficulty=m["query_difficulty"], qrels=[np.asarray(r, np.int64) for r in m["qrels"]],
                       doc_ids=ids, folder=folder, parts=m["parts"], digest=m["digest"],
                       n_distractors=m["n_distractors"], notes=m["notes"])


def streamed_cache_key(fingerprint: str, sset: StreamedSet) -> str:
    """Cache folder name of a streamed set's passage embeddings: model fingerprint + the passages' digest."""
    h = hashlib.sha1(f"{fingerprint}:passage:{len(sset.doc_ids)}:{sset.digest}".encode()).hexdigest()[:20]
    return f"passage-{h}"


def encode_streamed(ref, sset: StreamedSet, cache_dir: str | Path, num_workers: int = 1, batch_size: int = 64,
                    use_gpu: bool = False, fingerprint: str | None = None, log=print):
    """Embed a streamed set's passages into a cache folder (lbr_ray.eval.encode's layout), or read it from the
    cache. The texts go from the parquet parts to the encoder actors; the driver holds one part of embeddings at
    a time. num_workers=0 encodes in this process."""
    from lbr_ray import storage

    fingerprint = fingerprint or ref.fingerprint
    remote = str(cache_dir) if storage.is_remote(cache_dir) else None
    local = storage.staging_dir(remote) if remote else Path(cache_dir)
    key = streamed_cache_key(fingerprint, sset)
    folder = local / key
    where = storage.join(remote, key) if remote else folder
    hit = read_cache(folder) or (_fetch_cache(where, folder) if remote else None)
    n = len(sset.doc_ids)
    if hit is not None:
        log(f"  {n} passage embeddings read from the cache {where}")
        return hit
    files = [str(sset.folder / p) for p in sset.parts]
    writer = _ShardWriter(folder, n, "passage", fingerprint)
    start, done, next_log, first = time.perf_counter(), 0, n // 10, None
    buf: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        batches = _encode_local(ref, files, batch_size) if num_workers == 0 else \
            _encode_ray(ref, files, batch_size, num_workers, use_gpu)
        for rows, emb in batches:
            first = first or (time.perf_counter(), len(rows))
            buf.append((rows, emb))
            done += len(rows)
            if sum(len(r) for r, _ in buf) >= PART_ROWS:
                writer.add(np.concatenate([r for r, _ in buf]), np.concatenate([e for _, e in buf]))
                buf = []
            if done >= next_log and done < n:
                elapsed = time.perf_counter() - start
                log(f"  {done}/{n} passages encoded, {elapsed:.0f}s ({done / max(elapsed, 1e-9):.1f}/s)")
                next_log = done + n // 10
        if buf:
            writer.add(np.concatenate([r for r, _ in buf]), np.concatenate([e for _, e in buf]))
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - start
    log(f"  encoded {n} passages in {seconds:.1f}s ({n / max(seconds, 1e-9):.1f}/s, {max(num_workers, 1)} worker(s))")
    out = writer.finish(seconds)
    end = time.perf_counter()
    out.steady_per_s = (n - first[1]) / (end - first[0]) if first and n > first[1] and end > first[0] else None
    if remote:
        from lbr_ray.eval.encode import MANIFEST as CACHE_MANIFEST

        storage.upload_dir(folder, where, last=CACHE_MANIFEST)
    return out


def _passage_batch(batch: dict) -> dict:
    """Spilled (row, text) rows as the encoder's input batch (one job, role passage)."""
    n = len(batch["row"])
    return {"job": np.zeros(n, np.int64), "row": np.asarray(batch["row"], np.int64),
            "text": np.asarray(batch["text"], dtype=object), "role": np.full(n, "passage")}


class _PassageUDF(EncodeUDF):
    """The encoder actors' callable: each input row names a spilled parquet part, which is read and encoded here."""

    def __call__(self, batch: dict) -> dict:
        import pyarrow.parquet as pq

        out = []
        for path in batch["file"]:
            table = pq.read_table(str(path), columns=["row", "text"])
            out.append(super().__call__(_passage_batch({"row": table["row"].to_numpy(),
                                                        "text": table["text"].to_pylist()})))
        return {key: np.concatenate([o[key] for o in out]) for key in ("job", "row", "emb")}


def _encode_local(ref, files: list[str], batch_size: int, rows_per_call: int = 1024):
    import pyarrow.parquet as pq

    udf = EncodeUDF(ref, batch_size)
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=rows_per_call, columns=["row", "text"]):
            out = udf(_passage_batch({"row": rb.column("row").to_numpy(), "text": rb.column("text").to_pylist()}))
            yield out["row"], out["emb"]


def _encode_ray(ref, files: list[str], batch_size: int, num_workers: int, use_gpu: bool):
    import logging

    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = 1 if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)
    # one task per part, named by path (the actors read it): Ray Data's parquet reader made one block of a few
    # parts, and an actor pool gets work a block at a time, so one of two actors stood idle
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        _PassageUDF, fn_constructor_kwargs={"ref": ref, "batch_size": batch_size, "threads": cpus},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=gpu_share(num_workers) if use_gpu else 0, num_cpus=cpus,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        emb = batch["emb"]
        emb = np.stack(emb) if emb.dtype == object else emb
        yield np.asarray(batch["row"], np.int64), np.ascontiguousarray(emb, dtype=np.float32)
