"""Hard-negative mining (`lbr mine`, no Ray): the training pairs with a `negatives` field that GR-CL's
`gr_cl.hard_negatives` reads.

For every training-split query (lbr_ray.data.split, `data.split`; a query's case/whitespace twins are one query
with all their positives) the retriever ranks a candidate pool: the corpus passages plus the training positives,
de-duplicated by text_key, without any dev/test positive. Of that ranking, the query's own positives and the query
itself are dropped; ranks count what is left. A candidate is a negative when its rank is in (range_min, range_max]
and its score is below the positive's by the margin (the lowest-scoring positive where a query has several, as
sentence-transformers' `mine_hard_negatives`): `relative_margin` m keeps scores at or below s_pos - |s_pos| * m,
`absolute_margin` a at or below s_pos - a, `max_score` caps the score. BM25 candidates that share no term with the query
(score 0) are never negatives. The first `negatives` of them (`top`, NV-Retriever's TopK-PercPos) or a seeded sample
(`random`, FlagEmbedding's `hn_mine`) are written hardest first; a pair left with fewer gets random pool passages
(`fill`, as `hn_mine`), counted in its `negatives_random` field (`negatives_mined`: the mined ones), so that every
training pair keeps negatives and a hard-negative run trains on the same pairs as one without. Dev/test pairs are
written unchanged, so the file keeps the input's split, dev set and test set; every input field is kept.
"""
from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lbr_ray.config.schema import SplitConfig
from lbr_ray.data.split import split_key, split_of, text_key
from lbr_ray.errors import ConfigError, DataError, LbrError

SAMPLING = ("top", "random")
FILL = ("random", "none")


@dataclass(frozen=True)
class MineOptions:
    negatives: int = 4  # negatives per training pair (GR-CL takes the first gr_cl.hard_negatives)
    range_min: int = 0  # skip this many of the best-ranked candidates (after the query's own positives)
    range_max: int = 50  # consider candidates up to this rank
    relative_margin: float | None = 0.05  # keep scores <= s_pos - |s_pos| * m (NV-Retriever: 95% of the positive's)
    absolute_margin: float | None = None  # keep scores <= s_pos - a
    max_score: float | None = None  # keep scores at or below this
    sampling: str = "top"  # top: the best-ranked survivors; random: a seeded sample of them
    fill: str = "random"  # random: a pair with fewer than `negatives` mined gets random pool passages (FlagEmbedding);
    # none: it keeps fewer (GR-CL reuses them in turn, and stops at a training pair with none)
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    num_workers: int = 0  # dense retrievers: encoder actors and search shards (0 = in this process, no Ray)
    batch_size: int = 64
    cache_dir: str | None = None  # embedding cache (default: lbr_ray.eval.evaluator.default_cache_dir)


def check_options(opts: MineOptions) -> None:
    problems = []
    if opts.negatives < 1:
        problems.append("--negatives must be >= 1")
    if opts.range_min < 0 or opts.range_max <= opts.range_min:
        problems.append(f"--range-min {opts.range_min} / --range-max {opts.range_max}: need 0 <= range-min < "
                        "range-max")
    elif opts.negatives > opts.range_max - opts.range_min:
        problems.append(f"--negatives {opts.negatives} exceeds the {opts.range_max - opts.range_min} ranks of "
                        f"--range-min {opts.range_min} .. --range-max {opts.range_max}")
    for name in ("relative_margin", "absolute_margin"):
        value = getattr(opts, name)
        if value is not None and value < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0")
    if opts.sampling not in SAMPLING:
        problems.append(f"--sampling must be one of {', '.join(SAMPLING)}")
    if opts.fill not in FILL:
        problems.append(f"--fill must be one of {', '.join(FILL)}")
    if opts.num_workers < 0 or opts.batch_size < 1:
        problems.append("--num-workers must be >= 0 and --batch-size >= 1")
    if problems:
        raise ConfigError(problems, "options")


@dataclass
class PairsInput:
    """The pairs as read: raw records (every field kept) with their file/line, and what mining needs of them."""

    records: list[dict]
    where: list[tuple[str, int]]
    train: list[bool]
    heldout: set[str]  # text_keys of dev/test positives
    queries: list[str]  # training queries, one per split key (first spelling)
    positives: list[list[str]]  # each training query's positives (all its twins' pairs)
    query_of: list[int]  # per record: its training query's index, -1 for dev/test


def read_pairs(files: list[str], split: SplitConfig) -> PairsInput:
    """Every record of `files` (a bad one stops with FILE:LINE), split by `split`."""
    from lbr_ray.data.readers import iter_raw
    from lbr_ray.data.schema import check_pair

    records, where, train, heldout = [], [], [], set()
    index: dict[str, int] = {}
    queries, positives, query_of = [], [], []
    for path in files:
        n = len(records)
        for line, obj in iter_raw(path):
            if isinstance(obj, DataError):
                raise obj
            try:
                pair = check_pair(obj)
            except ValueError as e:
                raise DataError(path, line, f"bad pairs record: {e}") from None
            is_train = split_of(pair["query"], split) == "train"
            records.append(obj)
            where.append((path, line))
            train.append(is_train)
            if not is_train:
                heldout.add(text_key(pair["positive"]))
                query_of.append(-1)
                continue
            key = split_key(pair["query"], split.key)
            if key not in index:
                index[key] = len(queries)
                queries.append(pair["query"])
                positives.append([])
            positives[index[key]].append(pair["positive"])
            query_of.append(index[key])
        if len(records) == n:
            raise DataError(path, None, "the pairs file is empty (no records)")
    if not queries:
        raise DataError(files[0], None, f"no pair of {len(files)} file(s) falls in the train split, so there is "
                                        "nothing to mine for (check data.split)")
    return PairsInput(records, where, train, heldout, queries, positives, query_of)


def candidate_pool(data: PairsInput, corpus_files: list[str]) -> tuple[list[str], dict[str, int], set[int], int]:
    """(texts, {text_key: row}, banned rows, dropped): corpus passages then training positives, de-duplicated by
    text_key. A corpus passage that is a dev/test positive is left out (`dropped` counts them); a training positive
    that is also one (a passage relevant to a training and a test query) stays in to score its own query's margin
    but is `banned`: never a negative."""
    from lbr_ray.data.readers import read_all

    texts, row, dropped = [], {}, 0
    for rec in read_all(corpus_files, "corpus") if corpus_files else ():
        key = text_key(rec["text"])
        if key in data.heldout:
            dropped += 1
        elif key not in row:
            row[key] = len(texts)
            texts.append(rec["text"])
    for text in (p for ps in data.positives for p in ps):
        if text_key(text) not in row:
            row[text_key(text)] = len(texts)
            texts.append(text)
    return texts, row, {r for key, r in row.items() if key in data.heldout}, dropped


def rank(method, queries: list[str], pool: list[str], pos_rows: list[np.ndarray], k: int, opts: MineOptions,
         log=print) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(scores [Q, k], rows [Q, k], each query's positive scores) from BM25 or a dense encoder (EncoderRef:
    the eval's cached encoding and FAISS search)."""
    from lbr_ray.eval.baselines import BM25Retriever

    k = min(k, len(pool))
    if isinstance(method, BM25Retriever):
        return method.search(queries, pool, k, pos_rows)
    from lbr_ray.eval.encode import encode_many
    from lbr_ray.eval.evaluator import default_cache_dir
    from lbr_ray.eval.index import search_shards

    docs, qs = encode_many(method, [(pool, "passage"), (queries, "query")], opts.cache_dir or default_cache_dir(),
                           num_workers=opts.num_workers, batch_size=opts.batch_size, log=log)
    q = qs.load()
    scores, rows = search_shards(list(docs.shards()), q, k, "Flat", "", opts.num_workers)
    emb = docs.load()
    return scores, rows, [emb[r] @ q[i] for i, r in enumerate(pos_rows)]


def select(scores: np.ndarray, rows: np.ndarray, skip: set[int], pos_score: float, opts: MineOptions,
           lexical: bool, rng: np.random.Generator) -> tuple[list[int], list[float], dict[str, int]]:
    """One query's negatives from its ranked candidates: (pool rows, their scores, hardest first; how many
    candidates of the rank window the margin / max_score and (BM25) a zero score left out)."""
    limit = pos_score - abs(pos_score) * opts.relative_margin if opts.relative_margin is not None else np.inf
    if opts.absolute_margin is not None:
        limit = min(limit, pos_score - opts.absolute_margin)
    if opts.max_score is not None:
        limit = min(limit, opts.max_score)
    kept, why, r = [], {"margin": 0, "no_term": 0}, 0
    for row, score in zip(rows.tolist(), scores.tolist()):
        if row < 0 or row in skip:
            continue
        r += 1
        if r <= opts.range_min:
            continue
        if r > opts.range_max:
            break
        if lexical and score <= 0:
            why["no_term"] += 1
        elif score > limit:
            why["margin"] += 1
        else:
            kept.append((row, score))
    if opts.sampling == "random" and len(kept) > opts.negatives:
        kept = [kept[i] for i in np.sort(rng.choice(len(kept), opts.negatives, replace=False))]
    kept = kept[:opts.negatives]
    return [r for r, _ in kept], [s for _, s in kept], why


def mine(pairs: list[str], corpus: list[str], method, output: str | Path, opts: MineOptions = MineOptions(),
         name: str = "", command: str = "", log=print) -> dict:
    """Mine, write `output` (gzipped JSON lines) and `<output stem>.mine.json` (settings, counts); returns the
    latter. `pairs` / `corpus`: files, folders or globs (lbr_ray.data.readers.resolve_paths)."""
    from lbr_ray.data.readers import resolve_paths
    from lbr_ray.eval.baselines import BM25Retriever

    check_options(opts)
    output = Path(output).expanduser()
    pair_files = resolve_paths(pairs, "pairs")
    corpus_files = resolve_paths(corpus, "corpus") if corpus else []
    check_output(output, pair_files + corpus_files)
    start = time.time()
    data = read_pairs(pair_files, opts.split)
    pool, row_of, banned, dropped = candidate_pool(data, corpus_files)
    skip = [banned | {row_of[text_key(p)] for p in ps} for ps in data.positives]  # the query's own positives...
    for i, q in enumerate(data.queries):  # ...and the query itself, where it is in the pool
        if text_key(q) in row_of:
            skip[i].add(row_of[text_key(q)])
    pos_rows = [np.array([row_of[text_key(p)] for p in ps]) for ps in data.positives]
    k = opts.range_max + max(len(s) for s in skip)  # enough to fill the window after the skipped rows
    log(f"[lbr] mine: {len(data.queries)} training queries of {len(data.records)} pairs, pool of {len(pool)} "
        f"passages ({dropped} dev/test positives left out), {name or 'bm25'}")
    scores, rows, pos_scores = rank(method, data.queries, pool, pos_rows, k, opts, log)
    lexical = isinstance(method, BM25Retriever)
    mined, filled, why, gaps = [], [], {"margin": 0, "no_term": 0}, []
    for i in range(len(data.queries)):
        rng = np.random.default_rng([opts.seed, int(text_key(data.queries[i])[:8], 16)])
        pos = float(np.min(pos_scores[i]))
        got, got_scores, left = select(scores[i], rows[i], skip[i], pos, opts, lexical, rng)
        mined.append([pool[r] for r in got])
        filled.append([pool[r] for r in random_rows(len(pool), skip[i] | set(got), opts.negatives - len(got), rng)]
                      if opts.fill == "random" else [])
        gaps += [pos - s for s in got_scores]
        for key in why:
            why[key] += left[key]
    counts = write_pairs(output, data, mined, filled)
    train_q = [data.query_of[j] for j in range(len(data.records)) if data.train[j]]
    short = sum(len(mined[q]) < opts.negatives for q in train_q)
    none = sum(not mined[q] for q in train_q)
    manifest = {"output": str(output), "command": command, "retriever": name or "bm25",
                "pairs": pair_files, "corpus": corpus_files, "options": asdict(opts),
                "records": len(data.records), "train_pairs": len(train_q), "train_queries": len(data.queries),
                "pool": len(pool), "heldout_positives_left_out_of_pool": dropped,
                "left_out_of_the_rank_window": {"by_margin_or_max_score": why["margin"],
                                                "bm25_no_shared_term": why["no_term"]},
                "train_pairs_with_fewer_mined": short, "train_pairs_with_none_mined": none,
                "mean_positive_minus_negative_score": float(np.mean(gaps)) if gaps else None,
                **counts, "seconds": round(time.time() - start, 1)}
    manifest_path(output).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    fill = f" (filled with random pool passages: {counts['random_negatives']})" if opts.fill == "random" else ""
    log(f"[lbr] mine: {len(train_q)} training pairs got {counts['mined_negatives']} mined negatives; "
        f"{short} got fewer than {opts.negatives}{fill}, {none} of them none; in the rank windows the margin left out "
        f"{why['margin']} candidates" + (f", {why['no_term']} shared no term with the query" if lexical else ""))
    log(f"[lbr] mine: wrote {output} and {manifest_path(output)} in {manifest['seconds']:.0f}s")
    return manifest


def random_rows(n: int, skip: set[int], count: int, rng: np.random.Generator) -> list[int]:
    """`count` distinct rows of range(n) outside `skip` (fewer if there are not that many)."""
    count = min(count, n - len(skip))
    out: list[int] = []
    while len(out) < count:
        for r in rng.integers(0, n, size=2 * (count - len(out)) + 8).tolist():
            if r not in skip and r not in out and len(out) < count:
                out.append(r)
    return out


def manifest_path(output: Path) -> Path:
    name = output.name.removesuffix(".gz").removesuffix(".jsonl")
    return output.with_name(f"{name}.mine.json")


def check_output(output: Path, inputs: list[str]) -> None:
    if not output.name.endswith(".jsonl.gz"):
        raise LbrError(f"--output {output}: name the mined pairs file *.jsonl.gz (gzipped JSON lines)")
    if any(os.path.exists(f) and output.exists() and os.path.samefile(f, output) for f in inputs):
        raise LbrError(f"--output {output} is one of the input files; write the mined pairs to a new file")
    parent = output.parent.resolve()
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LbrError(f"--output {output}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise LbrError(f"--output {output}: cannot write in {existing}")


def write_pairs(output: Path, data: PairsInput, mined: list[list[str]], filled: list[list[str]]) -> dict:
    """Every record in input order. A training pair's `negatives`: those it had (minus dev/test positives), then its
    query's mined ones, then random fill, without repeats or its own positive; `negatives_mined` and
    `negatives_random` count the last two. Written atomically, gzip without a timestamp: the same input gives the
    same bytes."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    counts = {"mined_negatives": 0, "random_negatives": 0, "given_negatives_dropped_as_dev_test_positives": 0}
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for j, rec in enumerate(data.records):
            if data.train[j]:
                q = data.query_of[j]
                seen, out = {text_key(rec["positive"])}, {"given": [], "mined": [], "random": []}
                for kind, texts in (("given", rec.get("negatives") or []), ("mined", mined[q]),
                                    ("random", filled[q])):
                    for text in texts:
                        key = text_key(text)
                        if kind == "given" and key in data.heldout:  # mined ones never are (candidate_pool)
                            counts["given_negatives_dropped_as_dev_test_positives"] += 1
                        elif key not in seen:
                            seen.add(key)
                            out[kind].append(text)
                rec = {**rec, "negatives": out["given"] + out["mined"] + out["random"],
                       "negatives_mined": len(out["mined"]), "negatives_random": len(out["random"])}
                counts["mined_negatives"] += len(out["mined"])
                counts["random_negatives"] += len(out["random"])
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(output)
    return counts


__all__ = ["MineOptions", "check_options", "mine", "read_pairs", "candidate_pool", "select"]
