"""Sharded search (in-process, no Ray): sharded top-k equals unsharded top-k; ANN indexes; bad index strings."""
import numpy as np
import pytest

from lbr_ray.eval.index import SearchIndexError, ShardIndex, group_shards, merge_topk, search_shards
from lbr_ray.eval.metrics import ann_recall, retrieve_exact


def _data(n=600, d=32, q=25, seed=0):
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(n, d)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.choice(n, q, replace=False)] + 0.3 * rng.normal(size=(q, d)).astype(np.float32)
    return docs, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _parts(docs, sizes, seed=0):
    """Split rows (shuffled, as encoding by length does) into parts of the given sizes."""
    rows = np.random.default_rng(seed).permutation(len(docs))
    out, start = [], 0
    for s in sizes:
        out.append((docs[rows[start:start + s]], rows[start:start + s]))
        start += s
    return out


@pytest.mark.parametrize("spec", ["Flat", "exact"])
@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sharded_equals_unsharded(spec, num_shards):
    docs, q = _data()
    ref_scores, ref_rows = retrieve_exact(q, docs, 50)
    parts = _parts(docs, [100, 250, 50, 200])
    scores, rows = search_shards(parts, q, 50, spec=spec, num_workers=0) if num_shards == 1 else \
        merge_topk([ShardIndex(e, r, spec).search(q, 50) for e, r in group_shards(parts, num_shards)], 50)
    assert rows.tolist() == ref_rows.tolist()
    assert np.allclose(scores, ref_scores, atol=1e-5)


def test_merge_topk_pads_short_shards():
    s1, r1 = np.array([[0.9, 0.1]]), np.array([[4, 2]])
    s2, r2 = np.array([[0.5, -np.inf]]), np.array([[7, -1]])
    scores, rows = merge_topk([(s1, r1), (s2, r2)], 3)
    assert rows.tolist() == [[4, 7, 2]] and scores[0, 0] == pytest.approx(0.9)
    small = ShardIndex(np.eye(3, dtype=np.float32), np.array([10, 11, 12])).search(np.eye(3, dtype=np.float32), 5)
    assert small[1].shape == (3, 5) and small[1][0, 0] == 10 and small[1][0, -1] == -1


def test_group_shards_balances_rows():
    docs, _ = _data(n=100)
    groups = group_shards(_parts(docs, [40, 30, 20, 10]), 2)
    assert sorted(len(r) for _, r in groups) == [50, 50]
    assert sorted(np.concatenate([r for _, r in groups]).tolist()) == list(range(100))


@pytest.mark.parametrize("spec,params,low", [("IVF16,Flat", "nprobe=16", 1.0), ("IVF16,Flat", "nprobe=2", 0.2),
                                             ("HNSW16", "efSearch=64", 0.7)])
def test_ann_indexes_recall(spec, params, low):
    docs, q = _data(n=2000)
    _, exact = retrieve_exact(q, docs, 10)
    _, rows = search_shards(_parts(docs, [1000, 1000]), q, 10, spec=spec, params=params, num_workers=0)
    assert ann_recall(rows, exact, 10) >= low  # probing all 16 lists is exact


def test_bad_index_string_and_too_small_shard():
    docs, q = _data(n=100)
    with pytest.raises(SearchIndexError, match="bad FAISS index string"):
        search_shards(_parts(docs, [100]), q, 5, spec="NoSuchIndex", num_workers=0)
    with pytest.raises(SearchIndexError, match="needs at least 256 passages"):
        search_shards(_parts(docs, [100]), q, 5, spec="IVF256,Flat", num_workers=0)


def test_dimension_mismatch():
    docs, q = _data(n=50)
    with pytest.raises(Exception, match="embedding size mismatch"):
        search_shards(_parts(docs, [50]), q[:, :16], 5, num_workers=0)


def test_auto_search_params_reach_the_recall_target_cheapest_first():
    from lbr_ray.eval.index import ShardedIndex, search_param_candidates, tune_search_params

    pytest.importorskip("faiss")
    docs, q = _data(n=3000, d=32, q=200, seed=1)
    exact = retrieve_exact(q, docs, 10)[1]
    with ShardedIndex([(docs, np.arange(len(docs)))], "IVF64,Flat", "", num_workers=0) as index:
        params, trace = tune_search_params(index, q, exact, "IVF64,Flat")
        assert trace[-1]["params"] == params and trace[-1]["recall@10"] >= 0.99
        assert all(t["recall@10"] < 0.99 for t in trace[:-1]) and len(trace) > 1  # nprobe=1 is not enough here
        index.set_params(params)
        assert ann_recall(index.search(q, 10)[1], exact, 10) >= 0.99
    assert search_param_candidates("IVF64,Flat")[-1] == "nprobe=64"
    assert search_param_candidates("HNSW32")[0] == "efSearch=16"


@pytest.mark.parametrize("index,params", [("IVF64,Flat", "auto"), ("IVF128,Flat", "auto")])
def test_evaluator_auto_index_reports_recall_and_qps_ratio(index, params):
    """The evaluator's `--index-params auto` path (in-process shards): recall target met on all queries, ratio
    reported (`--index auto` is tests/unit/test_eval_corpus.py's)."""
    import types

    from lbr_ray.eval.evaluator import EvalOptions, RetrievalEvaluator

    pytest.importorskip("faiss")
    docs, q = _data(n=5000, d=32, q=300, seed=2)
    lines = []
    ev = RetrievalEvaluator(EvalOptions(index=index, index_params=params, num_workers=0, k=20), log=lines.append)
    enc = types.SimpleNamespace(encoded=len(docs), seconds=0.0, dim=32)
    run = ev._dense_auto(q, _parts(docs, [2500, 2500]), 20, False, 1, enc, enc)
    exact = retrieve_exact(q, docs, 20)[1]
    assert run["ann_recall@10"] == pytest.approx(ann_recall(run["top"], exact, 10))
    assert run["index"] == index
    assert run["index_params"].startswith("nprobe=") and run["ann_recall@10"] >= 0.97
    assert run["auto_trace"][-1]["recall@10"] >= 0.99
    assert run["qps_ratio_vs_exact"] > 0 and "exact search's queries/s" in lines[-1]
    assert run["used"] == ("ann" if run["qps_ratio_vs_exact"] >= 1 else "exact")  # never slower than exact
    if run["used"] == "exact":
        assert run["ann_recall@10"] == 1.0
