"""Evaluation sets: test-split queries of a domain against its positives plus corpus distractors (no Ray).

For one domain folder (`<data_root>/<domain>/pairs*.jsonl.gz`, optional `corpus*.jsonl.gz`):
- queries = the distinct queries whose split (lbr_ray.data.split.split_of, the function training uses) is "test";
  a query that occurs in several pairs is one query with all of its positives relevant;
- corpus  = every test positive plus every corpus passage (distractors), de-duplicated by text_key, so a passage
  that is both a positive and a corpus passage is one relevant document;
- qrels   = for each query, the corpus rows of its positives.
Caps (`max_queries`, `max_corpus`) sample deterministically by text hash, independent of file order.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lbr_ray.config.schema import SplitConfig
from lbr_ray.data.readers import read_all
from lbr_ray.data.split import split_key, split_of, text_key
from lbr_ray.errors import LbrError

EASY_TYPES = ("term_ctx", "section")  # the query's words recur in the positive by construction (data/SOURCES.md)
MODERATE_SOURCES = re.compile(r"hpo|gene ontology|go\.db", re.I)  # HPO / GO definitions often repeat the term


class EvalSetError(LbrError):
    """A domain cannot be turned into an evaluation set (unknown domain, no test queries, empty corpus)."""


DIFFICULTIES = ("hard", "moderate", "easy")  # what difficulty() returns, in report order


def difficulty(pair_type: str, source: str = "") -> str:
    """'easy' (term_ctx, section), 'moderate' (HPO/GO term_def) or 'hard' (qa, docstring_code, manpage, ...)."""
    if pair_type in EASY_TYPES:
        return "easy"
    if pair_type == "term_def" and MODERATE_SOURCES.search(source or ""):
        return "moderate"
    return "hard"


@dataclass
class EvalSet:
    """One domain's queries, corpus and qrels. `qrels[i]` holds the corpus rows relevant to `queries[i]`."""

    domain: str
    queries: list[str]
    query_types: list[str]
    query_difficulty: list[str]
    qrels: list[np.ndarray]
    doc_ids: list[str]  # one per passage (unique_ids): the TREC files' document ids
    doc_texts: list[str]
    n_distractors: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def corpus_hash(self) -> str:
        """sha1 over the corpus texts in order: the cache key's data half."""
        return _hash_texts(self.doc_texts)

    @property
    def queries_hash(self) -> str:
        return _hash_texts(self.queries)


def unique_ids(ids: list[str], texts: list[str]) -> list[str]:
    """One document id per passage, as TREC files write them (whitespace replaced): an id that several passages
    share (the demo medical corpus has some) gets `~` + the first 12 hex digits of its passage's text key."""
    from lbr_ray.eval.trec import doc_id

    clean = [doc_id(i) for i in ids]
    shared = {i for i, n in Counter(clean).items() if n > 1}
    return [f"{i}~{text_key(t)[:12]}" if i in shared else i for i, t in zip(clean, texts)]


def _hash_texts(texts: list[str]) -> str:
    h = hashlib.sha1()
    for t in texts:
        h.update(text_key(t).encode())
    return h.hexdigest()


def available_domains(data_root: str | Path) -> list[str]:
    root = Path(data_root)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def domain_dir(data_root: str | Path, domain: str) -> Path:
    path = Path(data_root) / domain
    if not path.is_dir():
        known = ", ".join(available_domains(data_root)) or "none"
        raise EvalSetError(f"unknown domain {domain!r}: no folder {path} (domains under {data_root}: {known})")
    return path


def _split_queries(path: Path | list[str], split: SplitConfig, which: str) -> dict[str, dict]:
    """{query: {"positives": [...], "type": first pair's type, "source": ...}} for one split, in file order.
    Queries with the same split key (with `key: normalized`, twins differing only in case or whitespace) are one
    query, its first spelling, with all their positives. `path` is a domain folder (its pairs* files) or an explicit
    list of pairs files."""
    files = sorted(path.glob("pairs*")) if isinstance(path, Path) else list(path)
    if not files:
        raise EvalSetError(f"no pairs*.jsonl(.gz) in {path}: the domain has no queries/qrels to evaluate")
    grouped: dict[str, dict] = {}
    for rec in read_all([str(f) for f in files], "pairs"):
        if split_of(rec["query"], split) != which:
            continue
        entry = grouped.setdefault(split_key(rec["query"], split.key),
                                   {"query": rec["query"], "positives": [], "type": rec["type"],
                                    "source": rec["source"]})
        entry["positives"].append(rec["positive"])
    if not grouped:
        raise EvalSetError(f"{path}: no pair falls in the {which} split, so there is nothing to evaluate")
    return {entry.pop("query"): entry for entry in grouped.values()}


def _corpus_texts(path: Path | list[str]) -> tuple[list[str], list[str]]:
    files = sorted(path.glob("corpus*")) if isinstance(path, Path) else list(path)
    if not files:
        return [], []
    ids, texts = [], []
    for rec in read_all([str(f) for f in files], "corpus"):
        ids.append(rec["id"])
        texts.append(rec["text"])
    if not texts:
        raise EvalSetError(f"empty corpus: {', '.join(map(str, files))} hold no passages; "
                           "add passages or remove the file")
    return ids, texts


def _by_hash(items: list[str], n: int | None, seed: int) -> set[int]:
    """Indices of the first n items ordered by sha1(seed, text): a deterministic, order-free sample."""
    if n is None or n >= len(items):
        return set(range(len(items)))
    keys = [hashlib.sha1(f"{seed}:{t}".encode()).hexdigest() for t in items]
    return set(sorted(range(len(items)), key=keys.__getitem__)[:n])


def build_eval_set(data_root: str | Path, domain: str, split: SplitConfig = SplitConfig(),
                   max_queries: int | None = None, max_corpus: int | None = None, seed: int = 0,
                   which: str = "test") -> EvalSet:
    """Build one domain's evaluation set (`which="dev"`: the dev split, for the trainer's dev check).

    With max_corpus, all positives of the kept queries stay and distractors fill the rest (if the positives alone
    exceed the cap, the corpus is just the positives)."""
    path = domain_dir(data_root, domain)
    return _build(domain, path, path, split, max_queries, max_corpus, seed, which)


def build_eval_set_from_files(pairs: list[str], corpus: list[str], domain: str = "train-data",
                              split: SplitConfig = SplitConfig(), max_queries: int | None = None,
                              max_corpus: int | None = None, seed: int = 0, which: str = "dev") -> EvalSet:
    """The same eval set from explicit files (a training config's data.pairs / data.corpus)."""
    from lbr_ray.data.readers import resolve_paths

    corpus_files = resolve_paths(corpus, "corpus") if corpus else []
    return _build(domain, resolve_paths(pairs, "pairs"), corpus_files, split, max_queries, max_corpus, seed, which)


def dev_eval_set(cfg) -> EvalSet:
    """The run's in-training dev set (what GR-CL's dev R@10 is measured on): the config's pairs and corpus, its
    split, `gr_cl.eval_queries` / `gr_cl.eval_corpus` caps and `run.seed`. Export measures k on the same set."""
    return build_eval_set_from_files(list(cfg.data.pairs), list(cfg.data.corpus), split=cfg.data.split,
                                     max_queries=cfg.gr_cl.eval_queries, max_corpus=cfg.gr_cl.eval_corpus,
                                     seed=cfg.run.seed, which="dev")


def _build(domain, pairs_src, corpus_src, split, max_queries, max_corpus, seed, which) -> EvalSet:
    grouped = _split_queries(pairs_src, split, which)
    queries = list(grouped)
    keep = _by_hash(queries, max_queries, seed)
    queries = [q for i, q in enumerate(queries) if i in keep]
    corpus_ids, corpus_texts = _corpus_texts(corpus_src)

    doc_ids, doc_texts, row_of = [], [], {}

    def add(doc_id: str, text: str) -> int:
        key = text_key(text)
        if key not in row_of:
            row_of[key] = len(doc_texts)
            doc_ids.append(doc_id)
            doc_texts.append(text)
        return row_of[key]

    qrels = [np.unique([add(f"pos:{text_key(p)[:16]}", p) for p in grouped[q]["positives"]]) for q in queries]
    n_pos = len(doc_texts)
    fresh = [i for i, t in enumerate(corpus_texts) if text_key(t) not in row_of]
    room = None if max_corpus is None else max(max_corpus - n_pos, 0)
    chosen = _by_hash([corpus_texts[i] for i in fresh], room, seed)
    for j, i in enumerate(fresh):
        if j in chosen:
            add(corpus_ids[i], corpus_texts[i])
    if not doc_texts:
        raise EvalSetError(f"empty corpus for domain {domain!r}")
    notes = [] if corpus_texts else [f"{domain}: no corpus file, so the corpus holds the test positives only"]
    return EvalSet(
        domain=domain, queries=queries,
        query_types=[grouped[q]["type"] for q in queries],
        query_difficulty=[difficulty(grouped[q]["type"], grouped[q]["source"]) for q in queries],
        qrels=qrels, doc_ids=unique_ids(doc_ids, doc_texts), doc_texts=doc_texts, n_distractors=len(doc_texts) - n_pos,
        notes=notes,
    )


__all__ = ["EvalSet", "EvalSetError", "build_eval_set", "build_eval_set_from_files", "dev_eval_set", "difficulty",
           "available_domains"]
