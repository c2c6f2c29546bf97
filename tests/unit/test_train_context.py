"""`lbr train` ends with the model's dev R@10 next to BM25's on the same dev set."""
from __future__ import annotations


def test_bm25_context_line_compares_on_the_same_dev_set():
    import numpy as np

    from lbr_ray.eval.sets import EvalSet
    from lbr_ray.recipes.pipeline import bm25_context

    docs = [f"passage about topic{i} and its word{i}" for i in range(30)]
    queries = [f"what is topic{i}?" for i in range(10)]
    dev = EvalSet("d", queries, ["qa"] * 10, ["hard"] * 10, [np.array([i]) for i in range(10)], [str(i) for i in
              range(30)], docs)
    ctx = bm25_context(0.25, dev)
    assert ctx["bm25_dev_recall@10"] == 1.0  # each query's one distinctive word is only in its passage
    assert "0.250 for this model vs 1.000 for BM25" in ctx["line"] and "does not beat" in ctx["line"]
    assert "10 dev queries and 30 passages" in ctx["line"]
