"""Corpus-scale eval (in-process, no Ray): the shared quantizer, index reuse, streamed sets in bounded memory,
`--index auto`'s plan and the evaluator's corpus-scale path."""
import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lbr_ray.data.split import split_of, text_key
from lbr_ray.eval import corpus as corpus_mod
from lbr_ray.eval import ivf
from lbr_ray.eval.encode import _ShardWriter
from lbr_ray.eval.index import merge_topk
from lbr_ray.eval.ivf import CorpusIndex, CorpusIndexError, IVFShard, parse_bytes, plan_index, spec_plan
from lbr_ray.eval.metrics import retrieve_exact

ROOT = Path(__file__).resolve().parents[2]


def _clustered(n=6000, d=32, q=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)).astype(np.float32)
    docs = centres[rng.integers(50, size=n)] + 0.4 * rng.normal(size=(n, d)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.choice(n, q, replace=False)] + 0.2 * rng.normal(size=(q, d)).astype(np.float32)
    return docs, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _cache(tmp_path, docs, part=1000, seed=0):
    """An embedding cache folder like encode_many writes: shuffled rows in parts."""
    writer = _ShardWriter(tmp_path / "passage-test", len(docs), "passage", "fp")
    rows = np.random.default_rng(seed).permutation(len(docs))
    for s in range(0, len(docs), part):
        writer.add(rows[s:s + part], docs[rows[s:s + part]])
    return writer.finish(0.0)


@pytest.mark.parametrize("spec", ["IVF32,Flat", "IVF32,PQ8x4fs"])
def test_shards_of_one_trained_index_search_like_the_one_index(tmp_path, spec):
    """Shards filled from one trained index and merged = that index filled with every row (same nprobe)."""
    docs, q = _clustered()
    enc = _cache(tmp_path, docs)
    trained = ivf.train_index(spec, docs[:4096])
    one = IVFShard(str(enc.folder), enc.parts, trained, threads=1)
    shards = [IVFShard(str(enc.folder), p, trained, threads=1) for p in ivf.assign_parts(enc.folder, enc.parts, 3)]
    assert sorted(s.ntotal() for s in shards) == [2000, 2000, 2000]
    for s in [one] + shards:
        s.set_params("nprobe=4")
    ref_scores, ref_rows = one.search(q, 20)
    scores, rows = merge_topk([s.search(q, 20) for s in shards], 20)
    assert np.array_equal(scores, ref_scores) and (ref_rows >= 0).all()
    for s, r, ref_r in zip(scores, rows, ref_rows):  # 4-bit PQ scores tie often: tied rows may swap places,
        above = s > s[-1]                           # and at the k-th score either may be cut
        assert {(x, v) for x, v in zip(r[above], s[above])} == {(x, v) for x, v in zip(ref_r[above], s[above])}


def test_reranked_shards_return_exact_scores_and_exact_search_is_exact(tmp_path):
    docs, q = _clustered()
    enc = _cache(tmp_path, docs)
    exact_scores, exact_rows = retrieve_exact(q, docs, 10)
    with CorpusIndex(enc.folder, enc.parts, spec_plan("IVF32,PQ8x4fs", len(docs), docs.shape[1], k=10),
                     num_workers=0, num_shards=2, threads=1, log=lambda *_: None) as index:
        s, r = index.exact(q, 10)
        assert r.tolist() == exact_rows.tolist() and np.allclose(s, exact_scores, atol=1e-5)
        index.set_params("nprobe=32")  # every list: only the PQ ranking can lose a neighbour, and re-ranking
        s, r = index.search(q, 10)     # 200 candidates with the stored vectors gives it back
        assert r.tolist() == exact_rows.tolist() and np.allclose(s, exact_scores, atol=1e-5)


def test_a_saved_index_is_reused_and_nothing_is_trained(tmp_path, monkeypatch):
    docs, q = _clustered()
    enc = _cache(tmp_path, docs)
    plan = spec_plan("IVF32,PQ8x4fs", len(docs), docs.shape[1], k=10)
    logs = []
    with CorpusIndex(enc.folder, enc.parts, plan, num_workers=0, num_shards=2, log=logs.append) as first:
        first.set_params("nprobe=4")
        before = first.search(q, 10)
        assert first.info["reused"] is False and first.info["bytes_per_vector"] < 20

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(ivf, "train_index", no_training)
    monkeypatch.setattr(ivf.IVFShard, "save", no_training)
    for shards in (2, 1, 3):  # read back by as many, fewer or more workers than built it
        with CorpusIndex(enc.folder, enc.parts, plan, num_workers=0, num_shards=shards, log=logs.append) as again:
            again.set_params("nprobe=4")
            assert again.info["reused"] is True
            after = again.search(q, 10)
            assert after[1].tolist() == before[1].tolist()
    other = spec_plan("IVF16,PQ8x4fs", len(docs), docs.shape[1], k=10)  # another spec: another folder
    assert ivf.index_folder(enc.folder, other, 0) != ivf.index_folder(enc.folder, plan, 0)


def test_plan_follows_corpus_size_and_memory_budget():
    assert plan_index(20_000, 576).spec == "exact"
    assert plan_index(1_000_000, 128, budget=8 << 30).spec == "IVF1024,Flat"
    pq = plan_index(5_000_000, 576, k=100, budget=6 << 30)
    assert pq.spec == "IVF4096,PQ96x4fs" and pq.bytes_per_vector == 56 and pq.rerank == 200
    small = plan_index(5_000_000, 576, budget=150 << 20)  # 31 bytes/passage: 24 sub-quantizers of 4 bits
    assert small.spec == "IVF4096,PQ24x4fs" and 5_000_000 * small.bytes_per_vector <= 150 << 20
    assert plan_index(5_000_000, 576, budget=6 << 30, use_gpu=True).spec == "IVF4096,PQ96"
    groups = ivf.search_candidates(pq)  # re-rank depth first, then nprobe up to nlist / 8
    assert [g[0] for g in groups] == [f"nprobe=1,rerank={d}" for d in (200, 500, 1000, 2000)]
    assert groups[0][-1] == "nprobe=512,rerank=200"
    with pytest.raises(CorpusIndexError, match="raise it"):
        plan_index(5_000_000, 576, budget=10 << 20)
    assert parse_bytes("2.5G") == int(2.5 * 2 ** 30) and parse_bytes("512MiB") == 512 << 20
    with pytest.raises(CorpusIndexError, match="--index-memory 'lots'"):
        parse_bytes("lots")


def _domain(root, n_passages, text_len=2000, dup_every=0):
    """A domain with test queries whose positives are in the corpus, long passages, repeated ids and texts."""
    folder = root / "dom"
    folder.mkdir(parents=True)
    queries = [f"query {i}" for i in range(400) if split_of(f"query {i}") == "test"][:20]
    pad = "x" * text_len
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as f:
        for i in range(n_passages):
            doc_id = f"d{i // 2}" if dup_every and i % dup_every == 0 else f"d{i}"  # some ids shared by two texts
            f.write(json.dumps({"id": doc_id, "text": f"passage {i} {pad}"}) + "\n")
        f.write(json.dumps({"id": "again", "text": f"passage  3 {pad}"}) + "\n")  # passage 3 again (whitespace)
    with gzip.open(folder / "pairs.jsonl.gz", "wt") as f:
        for qtext in queries:  # query j's positive: passage 7j
            f.write(json.dumps({"query": qtext, "positive": f"passage {7 * int(qtext.split()[1])} {pad}",
                                "type": "qa"}) + "\n")
        f.write(json.dumps({"query": queries[0], "positive": "a positive no corpus file holds"}) + "\n")
    return queries


def _warm_up(tmp_path):
    """Build and encode a tiny set first: the modules it imports (pyarrow, pandas) are not the set's memory."""
    from lbr_ray.eval.encode import object_ref

    _domain(tmp_path / "warm", 30, text_len=5)
    sset = corpus_mod.build_streamed_set(tmp_path / "warm", ("dom",), tmp_path / "warm-cache", log=lambda *_: None)
    corpus_mod.encode_streamed(object_ref(_Tiny()), sset, tmp_path / "warm-cache", num_workers=0, log=lambda *_: None)


def test_streamed_set_keeps_ids_and_qrels_not_texts(tmp_path, monkeypatch):
    """10,000 passages of 2 kB (20 MB of text) are spilled 1,000 at a time: the build's peak Python memory stays a
    fraction of the texts (the in-memory eval set holds all of them), and the set holds no passage text."""
    from lbr_ray.eval.sets import build_eval_set

    queries = _domain(tmp_path / "data", 10_000, dup_every=50)
    monkeypatch.setattr(corpus_mod, "SPILL_ROWS", 1000)
    _warm_up(tmp_path)
    tracemalloc.start()
    sset = corpus_mod.build_streamed_set(tmp_path / "data", ("dom",), tmp_path / "cache", log=lambda *_: None)
    _, streamed_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    old = build_eval_set(tmp_path / "data", "dom")
    _, in_memory_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert streamed_peak < 6e6 < 20e6 < in_memory_peak, (streamed_peak, in_memory_peak)
    assert len(sset.parts) == 11 and len(sset.doc_ids) == len(old.doc_texts) == 10_001  # + the extra positive
    assert sset.queries == queries and sset.n_distractors == old.n_distractors
    assert len(set(sset.doc_ids.tolist())) == len(sset.doc_ids)  # ids unique per passage
    texts = sset.doc_texts
    for rel, old_rel in zip(sset.qrels, old.qrels):  # the same relevant passages
        assert {text_key(texts[r]) for r in rel} == {text_key(old.doc_texts[r]) for r in old_rel}
    again = corpus_mod.build_streamed_set(tmp_path / "data", ("dom",), tmp_path / "cache", log=print)
    assert again.folder == sset.folder and again.doc_ids.tolist() == sset.doc_ids.tolist()  # read back


class _Tiny:
    """A fake encoder: "passage i ..." -> one of 16 cluster centres + noise seeded by i, "query j" -> passage 7j's
    vector (its positive in `_domain`) plus noise; records its largest call."""

    fingerprint = "tiny-v1"

    def __init__(self, dim=256):
        self.dim, self.largest = dim, 0

    def _vector(self, text):
        words = text.split()
        num = int(words[1]) if len(words) > 1 and words[1].isdigit() else int(text_key(text)[:8], 16)
        num = 7 * num if words[0] == "query" else num
        v = np.random.default_rng(num % 16).normal(size=self.dim) + np.random.default_rng(num).normal(size=self.dim)
        if words[0] == "query":
            v += 0.5 * np.random.default_rng([num, 1]).normal(size=self.dim)
        return v / np.linalg.norm(v)

    def encode(self, texts, batch_size=64):
        self.largest = max(self.largest, len(texts))
        return np.stack([self._vector(t) for t in texts]).astype(np.float32)


def test_streamed_encoding_writes_parts_in_bounded_memory(tmp_path, monkeypatch):
    """20,000 x 256 float32 (20 MB) are written a part of 1,000 rows at a time: the driver's peak stays far below
    the embeddings' size, and the cache folder equals encoding every text at once."""
    from lbr_ray.eval.encode import object_ref

    _domain(tmp_path / "data", 20_000, text_len=20)
    monkeypatch.setattr(corpus_mod, "PART_ROWS", 1000)
    sset = corpus_mod.build_streamed_set(tmp_path / "data", ("dom",), tmp_path / "cache", log=lambda *_: None)
    enc = _Tiny()
    _warm_up(tmp_path)
    tracemalloc.start()
    out = corpus_mod.encode_streamed(object_ref(enc), sset, tmp_path / "cache", num_workers=0, log=lambda *_: None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8e6 < 20e6, peak
    assert out.n == len(sset.doc_ids) and out.encoded == out.n and enc.largest <= 1024
    assert 20_001 / (1000 + 1024) <= len(out.parts) <= 20_001 / 1000 + 1  # parts of >= PART_ROWS rows (+ a batch)
    emb = out.load()
    texts = sset.doc_texts
    assert np.allclose(emb, _Tiny().encode([texts[i] for i in range(len(texts))]), atol=1e-6)
    again = corpus_mod.encode_streamed(object_ref(enc), sset, tmp_path / "cache", num_workers=0, log=print)
    assert again.encoded == 0 and again.folder == out.folder


def test_evaluator_index_auto_end_to_end_in_process(tmp_path, monkeypatch):
    """`--index auto` through RetrievalEvaluator: the plan, tuned nprobe, recall vs exact on held-out queries, the
    speed ratio and the index's size are reported; a second evaluation encodes, builds and searches exactly
    nothing (the exact reference of its queries is read back)."""
    from lbr_ray.eval.encode import object_ref
    from lbr_ray.eval.evaluator import EvalOptions, RetrievalEvaluator

    _domain(tmp_path / "data", 4000, text_len=20)
    monkeypatch.setattr(ivf, "EXACT_MAX_ROWS", 1000)
    opts = EvalOptions(domains=("dom",), data_root=str(tmp_path / "data"), index="auto", num_workers=0, k=20,
                       cache_dir=str(tmp_path / "cache"), index_memory="100K")
    first = RetrievalEvaluator(opts, log=lambda *_: None).evaluate(object_ref(_Tiny(64)), "tiny")["domains"]["dom"]
    assert first["index"] == "IVF64,PQ8x4fs" and first["index_params"].startswith("nprobe=")
    assert first["ann_recall@10"] >= 0.9 and first["qps_ratio_vs_exact"] > 0 and first["corpus_size"] == 4001
    assert first["index_build"]["reused"] is False and first["index_build"]["bytes_per_vector"] < 20
    assert (first["used"] == "exact") == (first["qps_ratio_vs_exact"] < 1)  # a slower index is reported, not used
    assert first["rows"][0]["recall@10"] > 0.5  # the fake encoder finds the positives it was given
    second = RetrievalEvaluator(opts, log=lambda *_: None).evaluate(object_ref(_Tiny(64)), "tiny")["domains"]["dom"]
    assert second["encoded_passages"] == 0 and second["index_build"]["reused"] is True
    assert (first["exact_reference"], second["exact_reference"]) == ("computed", "read back")
    assert second["ann_recall@10"] == first["ann_recall@10"] and second["index_params"] == first["index_params"]
    assert second["rows"][0]["ndcg@10"] == first["rows"][0]["ndcg@10"]


@pytest.mark.parametrize("args,needle", [
    (["--index", "auto", "--index-memory", "lots"], "--index-memory 'lots'"),
    (["--corpus", "joint", "--index", "HNSW32"], "IVF factory string"),
    (["--corpus", "joint", "--index", "auto", "--max-corpus", "5"], "--max-corpus cannot"),
    (["--corpus", "everything"], "--corpus must be domain or joint")])
def test_cli_refuses_corpus_scale_options_before_any_work(lbr, tmp_path, args, needle):
    code, err = lbr("eval", "--baseline", "bm25", "--domains", "medical", "--data-root", ROOT / "data" / "demo",
                    "--num-workers", "0", "--cache-dir", tmp_path / "cache", "--output", tmp_path / "ev", *args)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "ev").exists() and not (tmp_path / "cache").exists()
