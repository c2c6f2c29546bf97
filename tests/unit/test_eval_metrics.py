"""Retrieval metrics: hand-computed cases, a cross-check against ranx, exact search, and the no-Ray boundary."""
import math
import subprocess
import sys

import numpy as np
import pytest

from lbr_ray.eval.metrics import (ann_recall, dev_metrics, mrr_at_k, ndcg_at_k, per_query_metrics, recall_at_k,
                                  relevance_matrix, retrieve_exact)


def test_hand_computed_two_queries():
    topk = np.array([[5, 1, 7, 2], [3, 4, 9, 8]])  # retrieved rows, best first
    qrels = [[1, 2, 6], [8]]  # query 0: 3 relevant (6 never retrieved); query 1: 1 relevant at rank 4
    hits, n_rel = relevance_matrix(topk, qrels)
    assert hits.tolist() == [[False, True, False, True], [False, False, False, True]]
    assert recall_at_k(hits, n_rel, 2).tolist() == pytest.approx([1 / 3, 0.0])
    assert recall_at_k(hits, n_rel, 4).tolist() == pytest.approx([2 / 3, 1.0])
    dcg0 = 1 / math.log2(3) + 1 / math.log2(5)
    idcg0 = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(|rel|=3, k=4) = 3 ideal positions
    assert ndcg_at_k(hits, n_rel, 4).tolist() == pytest.approx([dcg0 / idcg0, (1 / math.log2(5)) / 1.0])
    idcg0_k2 = 1 + 1 / math.log2(3)
    assert ndcg_at_k(hits, n_rel, 2).tolist() == pytest.approx([(1 / math.log2(3)) / idcg0_k2, 0.0])
    assert mrr_at_k(hits, 10).tolist() == pytest.approx([0.5, 0.25])
    assert mrr_at_k(hits, 3).tolist() == pytest.approx([0.5, 0.0])


def test_perfect_and_empty_slots():
    per = per_query_metrics(np.array([[0, 1, -1]]), [[0, 1]], ("recall@10", "ndcg@10", "mrr@10"))
    assert per["recall@10"][0] == 1.0 and per["ndcg@10"][0] == pytest.approx(1.0) and per["mrr@10"][0] == 1.0
    per = per_query_metrics(np.array([[-1, -1]]), [[0]], ("recall@10",))
    assert per["recall@10"][0] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="no relevant"):
        relevance_matrix(np.array([[0]]), [[]])
    with pytest.raises(ValueError, match="unknown metric"):
        per_query_metrics(np.array([[0]]), [[0]], ("map@10",))
    with pytest.raises(ValueError, match="shapes"):
        retrieve_exact(np.zeros((2, 3)), np.zeros((4, 5)), 2)


def test_against_ranx_on_random_runs():
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(0)
    n_q, n_d, k = 40, 200, 100
    topk = np.stack([rng.permutation(n_d)[:k] for _ in range(n_q)])
    qrels = [rng.choice(n_d, size=rng.integers(1, 6), replace=False) for _ in range(n_q)]
    ours = {m: v.mean() for m, v in per_query_metrics(topk, qrels, ("recall@10", "ndcg@10", "mrr@10",
                                                                     "recall@100")).items()}
    rq = ranx.Qrels({f"q{i}": {f"d{d}": 1 for d in rel} for i, rel in enumerate(qrels)})
    rr = ranx.Run({f"q{i}": {f"d{d}": float(k - r) for r, d in enumerate(row)} for i, row in enumerate(topk)})
    theirs = ranx.evaluate(rq, rr, ["recall@10", "ndcg@10", "mrr@10", "recall@100"])
    for m in ours:
        assert ours[m] == pytest.approx(theirs[m], abs=1e-9), m


def test_retrieve_exact_matches_brute_force_and_torch():
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(7, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    scores, idx = retrieve_exact(q, d, 5, chunk=3)
    ref = np.argsort(-(q @ d.T), axis=1)[:, :5]
    assert idx.tolist() == ref.tolist()
    assert np.allclose(scores, np.take_along_axis(q @ d.T, ref, axis=1), atol=1e-5)
    torch = pytest.importorskip("torch")
    assert retrieve_exact(torch.from_numpy(q), torch.from_numpy(d), 5)[1].tolist() == ref.tolist()
    assert retrieve_exact(q, d[:3], 10)[1].shape == (7, 3)  # k capped at the corpus size


def test_dev_metrics_for_the_trainer():
    rng = np.random.default_rng(2)
    d = rng.normal(size=(30, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = d[:10] + 0.01 * rng.normal(size=(10, 8)).astype(np.float32)  # query i is a near-copy of document i
    _, idx = retrieve_exact(q, d, 10)
    out = dev_metrics(idx, [[i] for i in range(10)])
    assert out == {"recall@10": 1.0, "ndcg@10": pytest.approx(1.0)}


def test_ann_recall():
    exact = np.array([[1, 2, 3, 4]])
    assert ann_recall(np.array([[1, 2, 9, 8]]), exact, 4) == 0.5
    assert ann_recall(exact, exact, 4) == 1.0


def test_metrics_and_sets_import_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import lbr_ray.eval.metrics, lbr_ray.eval.sets, lbr_ray.eval.index, lbr_ray.eval.report\n"
            "import lbr_ray.eval.encode, lbr_ray.eval.baselines, lbr_ray.eval.evaluator\n")
    subprocess.run([sys.executable, "-c", code], check=True)
