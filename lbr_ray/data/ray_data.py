"""Ray Data pipelines: read + validate shards -> split -> tokenize on CPU (class UDF) -> datasets for Ray Train.

Large or remote data is never materialised in the driver: `summarize` streams once over the records to fail fast
with file:line errors, count what each split holds and collect the keys of held-out positives (kept out of stage 1).
Small local data is summarised in the driver instead (lbr_ray.data.summary), usually by the preflight, and read,
shuffled and (up to TOKENIZE_HERE_ROWS rows) tokenized there, so a small stage starts no read or tokenizer tasks.
"""
from __future__ import annotations

import numpy as np
import ray

from lbr_ray.config import to_dict
from lbr_ray.config.schema import LbrConfig
from lbr_ray.data.readers import MAX_RECORD_BYTES, iter_raw, iter_records, resolve_paths
from lbr_ray.data.schema import CHECKS
from lbr_ray.data.summary import DataSummary, input_files, small_local, summarize_files
from lbr_ray.data.split import pair_split, split_of, text_key
from lbr_ray.errors import DataError

TOKENIZE_HERE_ROWS = 20_000  # small local data up to this many rows per stage is tokenized in the driver
TOKENIZE_BATCH = 256  # rows per call of a tokenizer UDF (packing works within one call's rows)
EMPTY = {"pairs": {"query": "", "positive": "", "negatives": [], "type": "", "source": ""},
         "corpus": {"id": "", "text": "", "title": "", "source": ""}}


class _ReadFile:
    """flat_map UDF: one file -> its checked records; bad ones raise (error) or become `_error` rows (skip)."""

    def __init__(self, kind: str, on_bad: str, max_bytes: int = MAX_RECORD_BYTES):
        self.kind, self.on_bad, self.check, self.max_bytes = kind, on_bad, CHECKS[kind], max_bytes

    def __call__(self, item: dict):
        path = item["path"]
        for line, obj in iter_raw(path, self.max_bytes):
            err = obj if isinstance(obj, DataError) else None
            if err is None:
                try:
                    yield {**self.check(obj), "_file": path, "_line": line, "_error": ""}
                    continue
                except ValueError as e:
                    err = DataError(path, line, f"bad {self.kind} record: {e}")
            if self.on_bad == "error":
                raise err
            yield {**EMPTY[self.kind], "_file": path, "_line": line, "_error": err.reason}


def read_records(specs, kind: str, on_bad: str = "error", max_bytes: int = MAX_RECORD_BYTES) -> ray.data.Dataset:
    """All records of `specs` (files, folders, globs) with `_file`, `_line` and `_error` columns."""
    files = resolve_paths(specs, kind)
    items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return items.flat_map(_ReadFile(kind, on_bad, max_bytes))


def _read(cfg: LbrConfig, kind: str) -> ray.data.Dataset:
    return read_records(getattr(cfg.data, kind), kind, cfg.data.on_bad_record, cfg.data.max_record_bytes)


def _keep_split(split: str, split_cfg, types: tuple[str, ...]):
    def keep(row) -> bool:
        return not row["_error"] and split_of(row["query"], split_cfg) == split and (not types or row["type"] in types)

    return keep


def pairs(cfg: LbrConfig, split: str) -> ray.data.Dataset:
    return _read(cfg, "pairs").filter(_keep_split(split, cfg.data.split, cfg.data.types))


def summarize(cfg: LbrConfig, with_corpus: bool = True, in_process: bool | None = None) -> DataSummary:
    """Stream over pairs (and corpus) once: raise on the first bad record (default) or count skips. Small local
    data (`in_process=None`) is read in this process: a Ray Data pass costs seconds of task start-up for it."""
    files = input_files(cfg, with_corpus)
    if in_process or (in_process is None and small_local(files)):
        return summarize_files(cfg, files)
    summary = DataSummary()
    split_cfg = cfg.data.split

    def digest(batch: dict) -> dict:  # per row: split.pair_split (empty for a bad record)
        got = [pair_split(q, p, split_cfg) if not e else ("", "")
               for q, p, e in zip(batch["query"], batch["positive"], batch["_error"])]
        return {"split": [s for s, _ in got], "held": [h for _, h in got], "_file": batch["_file"],
                "_line": batch["_line"], "_error": batch["_error"]}

    for row in _read(cfg, "pairs").map_batches(digest).iter_rows():
        if not _tally(summary, row):
            summary.count_pair(row["split"], row["held"])
    if with_corpus and cfg.data.corpus:
        cols = ["_file", "_line", "_error"]
        for row in _read(cfg, "corpus").select_columns(cols).iter_rows():
            if not _tally(summary, row):
                summary.corpus += 1
    return summary


def _tally(summary: DataSummary, row: dict) -> bool:
    if not row["_error"]:
        return False
    summary.bad_by_file[row["_file"]] += 1
    if len(summary.bad_examples) < 5:
        summary.bad_examples.append(f"{row['_file']}:{row['_line']}: {row['_error']}")
    return True


def pair_texts(row: dict, heldout_keys: set[str]) -> list[dict]:
    """Stage-1 texts of one training pair: its query and positive, minus any text that is a dev/test positive."""
    return [{"text": t} for t in (row["query"], row["positive"]) if text_key(t) not in heldout_keys]


def keeps_corpus_row(row: dict, heldout_keys: set[str]) -> bool:
    return not row.get("_error") and text_key(row["text"]) not in heldout_keys


def keeps_pair_row(row: dict, heldout_keys: set[str]) -> bool:
    """`ib_gl.target: pair` trains on query -> positive: a positive that is a dev/test positive is held out."""
    return text_key(row["positive"]) not in heldout_keys


def stage1_texts(cfg: LbrConfig, heldout_keys: set[str]) -> ray.data.Dataset:
    """Texts for IB-GL `self`/`continuation`: training pairs' queries and positives, plus corpus passages, none of
    them a dev/test positive (so no evaluation target is seen in stage 1)."""
    train = pairs(cfg, "train").flat_map(lambda r: pair_texts(r, heldout_keys))
    if not (cfg.ib_gl.use_corpus and cfg.data.corpus):
        return train
    corpus = _read(cfg, "corpus")
    corpus = corpus.filter(lambda r: keeps_corpus_row(r, heldout_keys))
    return train.union(corpus.select_columns(["text"]))


def stage1_source(cfg: LbrConfig, heldout_keys: set[str], in_process: bool | None = None) -> ray.data.Dataset:
    """The rows stage 1 tokenizes (texts, or pairs for `target: pair`) in a seeded random order. Small local data
    (`in_process=None`) is read, filtered and shuffled in this process (see `stage1_rows`), the rest by Ray Data."""
    if not _in_driver(cfg, in_process):
        if cfg.ib_gl.target == "pair":
            return mixed(pairs(cfg, "train").filter(lambda r: keeps_pair_row(r, heldout_keys)), cfg)
        return mixed(stage1_texts(cfg, heldout_keys), cfg)
    return ray.data.from_items(stage1_rows(cfg, heldout_keys))


def stage1_rows(cfg: LbrConfig, heldout_keys: set[str]) -> list[dict]:
    """`stage1_source` for small local data, as a list read in this process."""
    train = _local_pairs(cfg, "train")
    if cfg.ib_gl.target == "pair":
        return shuffled_rows([r for r in train if keeps_pair_row(r, heldout_keys)], cfg)
    rows = [t for r in train for t in pair_texts(r, heldout_keys)]
    if cfg.ib_gl.use_corpus and cfg.data.corpus:
        rows += [{"text": r["text"]} for r in _local_records(cfg, "corpus") if keeps_corpus_row(r, heldout_keys)]
    return shuffled_rows(rows, cfg)


def mixed(ds: ray.data.Dataset, cfg: LbrConfig) -> ray.data.Dataset:
    """A seeded global shuffle: files are read one block each, in order, so without it a stage shorter than an
    epoch would see mostly its first files. The same seed gives the same order in every execution (so resume, which
    skips the consumed batches, continues the same stream); the workers' local shuffle varies it per epoch."""
    return ds.random_shuffle(seed=cfg.run.seed)


def shuffled_rows(rows: list[dict], cfg: LbrConfig) -> list[dict]:
    """`mixed` for rows already in this process: one seeded permutation. Ray Data's all-to-all shuffle waits for
    every read and costs seconds of task start-up (6 s of a demo stage's 16 s to its first batch, measured idle):
    small data goes faster this way, in the same order at every execution."""
    order = np.random.default_rng(cfg.run.seed).permutation(len(rows))
    return [rows[i] for i in order]


def tokenized(rows: list[dict], udf: type, args: tuple) -> ray.data.Dataset:
    """Rows through a stage's tokenizer UDF, TOKENIZE_BATCH rows a call as `in_actor` gives them. Up to
    TOKENIZE_HERE_ROWS rows (about a second of work) this process does it and hands Ray Data the finished blocks: no
    tokenizer actor to start, a process importing transformers that held a small stage's first batch back by
    seconds."""
    if len(rows) > TOKENIZE_HERE_ROWS:
        return in_actor(ray.data.from_items(rows), udf, args)
    from ray.data.block import BlockAccessor

    fn = udf(*args)
    return ray.data.from_blocks([BlockAccessor.batch_to_block(fn(as_batch(rows[i:i + TOKENIZE_BATCH])))
                                 for i in range(0, len(rows), TOKENIZE_BATCH)])


def in_actor(ds: ray.data.Dataset, udf: type, args: tuple) -> ray.data.Dataset:
    """`ds` through a tokenizer UDF in one Ray Data actor (half a CPU, next to the Train workers)."""
    return ds.map_batches(udf, fn_constructor_args=args, batch_size=TOKENIZE_BATCH, concurrency=1, num_cpus=0.5)


def as_batch(rows: list[dict]) -> dict:
    """Row dicts -> the numpy column batch a Ray Data UDF receives."""
    return {k: np.array([r.get(k) for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def _in_driver(cfg: LbrConfig, in_process: bool | None) -> bool:
    return in_process if in_process is not None else small_local(input_files(cfg))


def _local_records(cfg: LbrConfig, kind: str) -> list[dict]:
    """Every good record of small local data, read in this process, with the columns of `read_records`' rows."""
    return [{**r, "_error": ""} for path in resolve_paths(getattr(cfg.data, kind), kind)
            for r in iter_records(path, kind, cfg.data.on_bad_record, None, cfg.data.max_record_bytes)]


def _local_pairs(cfg: LbrConfig, split: str) -> list[dict]:
    keep = _keep_split(split, cfg.data.split, cfg.data.types)
    return [r for r in _local_records(cfg, "pairs") if keep(r)]


class TokenizeStage1:
    """Class UDF (one tokenizer per actor): texts or (query, positive) -> `ib_ids`, `ib_seg` rows."""

    def __init__(self, cfg_dict: dict):
        from lbr_ray.config import config_from_dict
        from lbr_ray.config.load import pack_length
        from lbr_ray.layout import SequenceBuilder
        from lbr_ray.model.bottleneck import load_tokenizer

        cfg = config_from_dict(cfg_dict)
        self.ib, self.target = cfg.ib_gl.mask and cfg.run.variant != "gl-cl", cfg.ib_gl.target
        self.pack_length = pack_length(cfg)
        tok = load_tokenizer(cfg.model.name, cfg.bottleneck.k_max)
        self.builder = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)

    def __call__(self, batch: dict) -> dict:
        if self.target == "pair":
            rows = self.builder.pair_rows(list(batch["query"]), list(batch["positive"]), ib=self.ib)
        else:
            rows = self.builder.stage1_rows(list(batch["text"]), self.target, self.ib)
        if self.pack_length:  # several units per row (first-fit decreasing within this call's units)
            from lbr_ray.layout import pack

            rows = pack(rows, self.pack_length)
        return columns("ib", rows)


class TokenizeStage2:
    """Class UDF for GR-CL: query/positive (+ hard negatives, + the IB row query -> positive when gen_weight > 0)."""

    def __init__(self, cfg_dict: dict, tokenizer_path: str, heldout_keys: set[str] = frozenset()):
        from lbr_ray.config import config_from_dict
        from lbr_ray.layout import SequenceBuilder
        from lbr_ray.model.bottleneck import load_tokenizer

        cfg = config_from_dict(cfg_dict)
        self.hard, self.gen, self.heldout = cfg.gr_cl.hard_negatives, cfg.gr_cl.gen_weight > 0, heldout_keys
        tok = load_tokenizer(tokenizer_path, cfg.bottleneck.k_max)
        self.builder = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)

    def __call__(self, batch: dict) -> dict:
        queries, positives = list(batch["query"]), list(batch["positive"])
        out = {**columns("q", self.builder.embed_rows(queries)), **columns("p", self.builder.embed_rows(positives)),
               "q_key": _text_ids(queries), "p_key": _text_ids(positives)}
        for h in range(self.hard):
            negs = []
            for negatives, path, line in zip(batch["negatives"], batch["_file"], batch["_line"]):
                usable = [n for n in negatives if text_key(n) not in self.heldout]  # no dev/test positive
                if not usable:
                    why = "has no 'negatives'" if len(negatives) == 0 else "has only dev/test positives as negatives"
                    raise DataError(path, int(line), f"gr_cl.hard_negatives={self.hard} but the record {why}")
                negs.append(usable[h % len(usable)])  # fewer than asked: reuse them in turn
            out.update(columns(f"n{h}", self.builder.embed_rows(negs)), **{f"n{h}_key": _text_ids(negs)})
        if self.gen:
            out.update(columns("ib", self.builder.pair_rows(queries, positives)))
        return out


def stage2_dataset(cfg: LbrConfig, tokenizer_path: str, heldout_keys: set[str] = frozenset(),
                   in_process: bool | None = None) -> ray.data.Dataset:
    args = (to_dict(cfg), tokenizer_path, heldout_keys)
    if _in_driver(cfg, in_process):
        return tokenized(shuffled_rows(_local_pairs(cfg, "train"), cfg), TokenizeStage2, args)
    return in_actor(mixed(pairs(cfg, "train"), cfg), TokenizeStage2, args)


def _text_ids(texts: list[str]) -> np.ndarray:
    """int64 keys of texts (text_key's first 60 bits): equal texts, up to whitespace, get equal keys."""
    return np.array([int(text_key(t)[:15], 16) for t in texts], dtype=np.int64)


def columns(prefix: str, rows) -> dict:
    """(ids, seg) rows -> two ragged columns; the trailing None forces numpy to build a 1-D object array."""
    return {f"{prefix}_ids": np.array([np.asarray(r[0], dtype=np.int64) for r in rows] + [None], dtype=object)[:-1],
            f"{prefix}_seg": np.array([np.asarray(r[1], dtype=np.int8) for r in rows] + [None], dtype=object)[:-1]}


def stage1_dataset(cfg: LbrConfig, heldout_keys: set[str]) -> ray.data.Dataset:
    if _in_driver(cfg, None):
        return tokenized(stage1_rows(cfg, heldout_keys), TokenizeStage1, (to_dict(cfg),))
    return in_actor(stage1_source(cfg, heldout_keys, in_process=False), TokenizeStage1, (to_dict(cfg),))

