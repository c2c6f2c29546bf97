"""Encoders and cached, distributed encoding: a Ray Data actor pool writes embeddings as `.npy` shards.

An encoder is any object with `encode(texts, batch_size) -> float32 [N, D]` (L2-normalised) and a stable
`fingerprint`. Workers never receive a model: they receive an `EncoderRef` (a small picklable recipe) and load it.
The cache folder `<cache_dir>/<role>-<sha1(fingerprint, texts)[:20]>/` holds `part-*.npy` ([n, D] float32) with
`part-*.rows.npy` (the rows of the input they hold) and `manifest.json`, written last: a folder with a manifest is
complete, and re-encoding the same texts with the same model reads it instead of encoding anything. The cache may
live on s3:// or gs:// (shared by the nodes of a cluster and by later runs): entries are uploaded manifest last.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lbr_ray.errors import LbrError

MANIFEST = "manifest.json"  # written last into a cache folder: only folders holding it are read

BIG_FILE = 256 << 20  # files above this are fingerprinted by size + first/last 4 MiB instead of full contents


class EncoderError(LbrError):
    """A model cannot be loaded as an encoder, or it returned embeddings of the wrong shape."""


@runtime_checkable
class Encoder(Protocol):
    fingerprint: str

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """float32 [N, D], rows L2-normalised."""


def normalise(emb: Any, n: int, where: str) -> np.ndarray:
    """Check an encoder's output is [n, D] and return it as float32 with unit rows."""
    if hasattr(emb, "detach"):
        emb = emb.detach().float().cpu().numpy()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise EncoderError(f"{where}: the encoder returned shape {emb.shape} for {n} texts; expected [{n}, D]")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def fingerprint_path(path: str | Path, extra: str = "") -> str:
    """sha1 over every file under `path` (relative name, size, contents; big files: size + head + tail)."""
    path = Path(path)
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    h = hashlib.sha1(extra.encode())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= BIG_FILE:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(4 << 20))
                fh.seek(size - (4 << 20))
                h.update(fh.read())
    return h.hexdigest()


class SentenceTransformerEncoder:
    """A sentence-transformers folder (modules.json), loaded offline."""

    def __init__(self, path: str, device: str | None = None, max_length: int | None = None):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        if max_length:
            self.model.max_seq_length = max_length
        self.fingerprint = fingerprint_path(path, f"st:{max_length}")

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        emb = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)


LBR_CANDIDATES = ("", "hf", "model", "gr_cl/model", "ib_gl/model")  # model, checkpoint, stage and run folders


def resolve_model(path: str | Path) -> tuple[str, Path]:
    """('lbr', folder with lbr_ray.json) for an lbr-ray model, checkpoint, stage or run folder; ('st', path) for a
    sentence-transformers folder (modules.json); anything else raises EncoderError. An s3:// / gs:// folder is
    downloaded first (to the driver's machine: encoder actors on other nodes need that path too)."""
    from lbr_ray.storage import is_remote, local_copy

    p = Path(local_copy(str(path)) if is_remote(path) else path)
    for sub in LBR_CANDIDATES:
        if (p / sub / "lbr_ray.json").is_file():
            return "lbr", p / sub if sub else p
    if p.is_dir() and (p / "modules.json").is_file():
        return "st", p
    why = "does not exist" if not p.exists() else "has neither lbr_ray.json nor modules.json"
    raise EncoderError(f"{path} is not an lbr-ray or sentence-transformers model ({why}); pass a folder saved by "
                       "`lbr train` / sentence-transformers, or use --baseline bm25|minilm|base")


def model_kind(path: str | Path) -> str:
    return resolve_model(path)[0]


@dataclass(frozen=True)
class EncoderRef:
    """What a worker needs to load an encoder: kind in lbr | st | base | object, a path, options."""

    kind: str
    path: str = ""
    options: tuple = ()  # sorted (key, value) pairs, e.g. (("from_scratch", True), ("seed", 0))
    obj: Any = field(default=None, compare=False)  # kind="object": an encoder shipped to workers by pickling

    @property
    def fingerprint(self) -> str:
        if self.kind == "object":
            return str(self.obj.fingerprint)
        opts = json.dumps(self.options, sort_keys=True, default=str)
        return hashlib.sha1(f"{self.kind}:{fingerprint_path(self.path, opts)}".encode()).hexdigest()

    def load(self, device: str | None = None) -> Encoder:
        opts = dict(self.options)
        if self.kind == "object":
            return self.obj
        if self.kind == "st":
            return SentenceTransformerEncoder(self.path, device=device, **opts)
        if self.kind == "base":
            from lbr_ray.eval.baselines import CausalLMEncoder

            return CausalLMEncoder(self.path, device=device, **opts)
        if self.kind == "lbr":
            enc = _lbr_encoder_class().from_pretrained(self.path, device=device, **opts)
            if not getattr(enc, "fingerprint", None):
                enc.fingerprint = self.fingerprint
            return enc
        raise EncoderError(f"unknown encoder kind {self.kind!r}")


def _lbr_encoder_class():
    """The trained-model class of the GR-CL stage: lbr_ray.model.encoder.Encoder, or lbr_ray.Encoder."""
    try:
        from lbr_ray.model.encoder import Encoder as LbrEncoder
    except ImportError:
        import lbr_ray

        LbrEncoder = getattr(lbr_ray, "Encoder", None)
        if LbrEncoder is None:
            raise EncoderError("this lbr-ray install cannot load trained models yet (no lbr_ray.model.encoder."
                               "Encoder / lbr_ray.Encoder); export it to sentence-transformers instead") from None
    return LbrEncoder


def load_encoder(path_or_name: str | Path, dtype: str | None = None, **options) -> EncoderRef:
    """An EncoderRef for a trained lbr-ray model folder (lbr_ray.json), computing in `dtype` (None: the saved
    weights' dtype), or a sentence-transformers folder (with `options`, e.g. max_length)."""
    kind, folder = resolve_model(path_or_name)
    if kind == "lbr":
        return EncoderRef(kind, str(folder), (("dtype", dtype),) if dtype else ())
    return EncoderRef(kind, str(folder), tuple(sorted(options.items())))


def object_ref(encoder: Encoder) -> EncoderRef:
    """Wrap an in-memory encoder (pickled to each worker)."""
    if not hasattr(encoder, "encode") or not getattr(encoder, "fingerprint", None):
        raise EncoderError("an encoder needs encode(texts, batch_size) and a non-empty `fingerprint`")
    return EncoderRef("object", obj=encoder)


class EncodeUDF:
    """Ray Data callable class: each actor of the pool loads the encoder once and embeds batches of rows."""

    def __init__(self, ref: EncoderRef, batch_size: int, threads: int = 0):
        if threads:
            import torch

            torch.set_num_threads(threads)
        device = "cuda" if _cuda_visible() else None
        self.encoder, self.batch_size = ref.load(device=device), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts, roles = [str(t) for t in batch["text"]], np.asarray(batch["role"]).astype(str)
        parts = {}
        for role in np.unique(roles):  # a batch may mix query and passage rows
            idx = np.flatnonzero(roles == role)
            parts[role] = (idx, encode_role(self.encoder, [texts[i] for i in idx], self.batch_size, role))
        dims = {e.shape[1] for _, e in parts.values()}
        if len(dims) > 1:
            raise EncoderError(f"embedding size mismatch: the encoder gives queries and passages sizes {sorted(dims)}")
        emb = np.empty((len(texts), dims.pop()), dtype=np.float32)
        for idx, e in parts.values():
            emb[idx] = e
        return {"job": batch["job"], "row": batch["row"], "emb": emb}


def encode_role(encoder: Encoder, texts: list[str], batch_size: int, role: str) -> np.ndarray:
    """Queries use `encode_queries` where the encoder has one (instructions, prefixes), passages `encode`."""
    fn = getattr(encoder, "encode_queries", None) if role == "query" else None
    return normalise((fn or encoder.encode)(texts, batch_size=batch_size), len(texts), f"encoding {role} texts")


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@dataclass
class Encoded:
    """A complete cache folder: shards of [n_i, D] embeddings and the input rows each holds."""

    folder: Path
    n: int
    dim: int
    parts: list[str]
    encoded: int  # texts encoded by this call (0 = everything came from the cache)
    seconds: float = 0.0  # wall time of the encoding pass, worker start-up included
    steady_per_s: float | None = None  # texts/s after the first batch arrived (workers up, model loaded)

    def load(self) -> np.ndarray:
        """All embeddings in input order, [n, dim]."""
        out = np.empty((self.n, self.dim), dtype=np.float32)
        for emb, rows in self.shards():
            out[rows] = emb
        return out

    def shards(self):
        for part in self.parts:
            yield np.load(self.folder / f"{part}.npy", mmap_mode="r"), np.load(self.folder / f"{part}.rows.npy")


def cache_key(fingerprint: str, texts: list[str], role: str) -> str:
    """Key of the exact texts (whitespace included: tokenizers see it) under one model fingerprint and role."""
    h = hashlib.sha1(f"{fingerprint}:{role}:{len(texts)}".encode())
    for t in texts:
        h.update(hashlib.sha1(t.encode("utf-8")).digest())
    return f"{role}-{h.hexdigest()[:20]}"


def read_cache(folder: Path) -> Encoded | None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    return Encoded(folder, m["n"], m["dim"], m["parts"], encoded=0)


def _fetch_cache(remote: str, folder: Path) -> Encoded | None:
    """A remote cache folder that holds its manifest (uploaded last, see `storage.upload_dir`), copied to `folder`."""
    from pyarrow.fs import FileType

    from lbr_ray import storage

    if storage.file_info(storage.join(remote, MANIFEST)).type != FileType.File:
        return None
    tmp = _tmp_folder(folder)
    storage.download_dir(remote, tmp)
    _publish(tmp, folder)
    return read_cache(folder)


def _tmp_folder(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")


def _publish(tmp: Path, folder: Path) -> None:
    """Rename a complete temp folder into place (atomic); if another run finished `folder` meanwhile, drop ours."""
    if folder.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def encode_cached(ref: EncoderRef, texts: list[str], cache_dir: str | Path, role: str = "passage",
                  **kw) -> Encoded:
    """Embed one list of texts, or read it from the cache (see encode_many)."""
    return encode_many(ref, [(texts, role)], cache_dir, **kw)[0]


def encode_many(ref: EncoderRef, jobs: list[tuple[list[str], str]], cache_dir: str | Path, num_workers: int = 1,
                batch_size: int = 64, use_gpu: bool = False, shard_rows: int = 1024, fingerprint: str | None = None,
                log=print) -> list[Encoded]:
    """Embed several (texts, role) lists in ONE pass of the actor pool (one model load per worker), skipping every
    list already in the cache. num_workers=0 encodes in this process, without Ray. A remote `cache_dir` (s3://,
    gs://) is mirrored in a local staging folder: entries are fetched from it and new ones uploaded to it."""
    from lbr_ray import storage

    fingerprint = fingerprint or ref.fingerprint
    remote = str(cache_dir) if storage.is_remote(cache_dir) else None
    local = storage.staging_dir(remote) if remote else Path(cache_dir)
    folders, results, todo = [], [], []
    for j, (texts, role) in enumerate(jobs):
        if not texts:
            raise EncoderError(f"nothing to encode: the {role} list is empty")
        key = cache_key(fingerprint, texts, role)
        folders.append(local / key)
        where = storage.join(remote, key) if remote else folders[-1]
        results.append(read_cache(folders[-1]) or (_fetch_cache(where, folders[-1]) if remote else None))
        if results[-1] is None:
            todo.append(j)
        else:
            log(f"  {len(texts)} {role} embeddings read from the cache {where}")
    if not todo:
        return results
    rows = [(j, r, jobs[j][0][r], jobs[j][1]) for j in todo for r in range(len(jobs[j][0]))]
    rows.sort(key=lambda x: -len(x[2]))  # similar lengths per batch: less padding
    writers = {j: _ShardWriter(folders[j], len(jobs[j][0]), jobs[j][1], fingerprint) for j in todo}
    start = time.perf_counter()
    batches = _encode_local(ref, rows, batch_size, shard_rows) if num_workers == 0 else \
        _encode_ray(ref, rows, batch_size, shard_rows, num_workers, use_gpu)
    done, next_log, first = 0, len(rows) // 10, None
    try:
        for job, row, emb in batches:
            first = first or (time.perf_counter(), len(row))  # after the first batch: workers are up and loaded
            for j in np.unique(job):
                sel = job == j
                writers[int(j)].add(row[sel], emb[sel])
            done += len(row)
            if done >= next_log and done < len(rows):
                elapsed = time.perf_counter() - start
                log(f"  {done}/{len(rows)} texts encoded, {elapsed:.0f}s ({done / max(elapsed, 1e-9):.1f}/s)")
                next_log = done + len(rows) // 10
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    end = time.perf_counter()
    seconds = end - start
    steady = (len(rows) - first[1]) / (end - first[0]) if len(rows) > first[1] and end > first[0] else None
    log(f"  encoded {len(rows)} texts in {seconds:.1f}s ({len(rows) / max(seconds, 1e-9):.1f}/s, "
        f"{max(num_workers, 1)} worker(s))")
    for j in todo:
        results[j] = writers[j].finish(seconds)
        results[j].steady_per_s = steady
        if remote:
            storage.upload_dir(folders[j], storage.join(remote, folders[j].name), last=MANIFEST)
    return results


class _ShardWriter:
    """Writes one cache folder: parts into a temp folder, manifest last, then an atomic rename."""

    def __init__(self, folder: Path, n: int, role: str, fingerprint: str):
        self.folder, self.n, self.role, self.fingerprint = folder, n, role, fingerprint
        self.tmp = _tmp_folder(folder)
        self.tmp.mkdir(parents=True)
        self.parts, self.dim, self.count = [], None, 0

    def add(self, rows: np.ndarray, emb: np.ndarray) -> None:
        if self.dim is not None and emb.shape[1] != self.dim:
            raise EncoderError(f"embedding size mismatch: {self.role} embeddings of size {self.dim} and {emb.shape[1]}")
        self.dim = emb.shape[1]
        name = f"part-{len(self.parts):06d}"
        np.save(self.tmp / f"{name}.npy", np.ascontiguousarray(emb, dtype=np.float32))
        np.save(self.tmp / f"{name}.rows.npy", rows.astype(np.int64))
        self.parts.append(name)
        self.count += len(rows)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, seconds: float) -> Encoded:
        assert self.count == self.n, f"{self.role}: {self.count} of {self.n} rows came back"
        (self.tmp / MANIFEST).write_text(json.dumps(
            {"n": self.n, "dim": self.dim, "parts": self.parts, "role": self.role, "fingerprint": self.fingerprint}))
        _publish(self.tmp, self.folder)
        return Encoded(self.folder, self.n, self.dim, self.parts, encoded=self.n, seconds=seconds)


def _encode_local(ref, rows, batch_size, shard_rows):
    udf = EncodeUDF(ref, batch_size)
    for s in range(0, len(rows), shard_rows):
        chunk = rows[s:s + shard_rows]
        out = udf({"job": np.array([c[0] for c in chunk]), "row": np.array([c[1] for c in chunk]),
                   "text": np.array([c[2] for c in chunk], dtype=object), "role": np.array([c[3] for c in chunk])})
        yield out["job"], out["row"], out["emb"]


def gpu_share(num_workers: int) -> float:
    """GPUs per worker: one each where there are enough, else a fair fraction (2 workers on 1 GPU get 0.5)."""
    import ray

    return min(1.0, ray.cluster_resources().get("GPU", 0) / max(num_workers, 1)) or 0.0


def _encode_ray(ref, rows, batch_size, shard_rows, num_workers, use_gpu):
    import logging

    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    cpus = 1 if use_gpu else max(1, total_cpus // num_workers)  # 1 worker on 2 cores gets 2 threads
    per_batch = max(1, min(shard_rows, -(-len(rows) // (num_workers * 4))))
    items = [{"job": j, "row": r, "text": t, "role": role} for j, r, t, role in rows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(rows) // per_batch)))
    ds = ds.map_batches(
        EncodeUDF, fn_constructor_kwargs={"ref": ref, "batch_size": batch_size, "threads": cpus},
        batch_size=per_batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=gpu_share(num_workers) if use_gpu else 0, num_cpus=cpus,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        emb = batch["emb"]
        emb = np.stack(emb) if emb.dtype == object else emb
        yield np.asarray(batch["job"]), np.asarray(batch["row"]), np.ascontiguousarray(emb, dtype=np.float32)
