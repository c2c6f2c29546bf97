"""Retrieval metrics and exact top-k search in plain numpy (no Ray, no FAISS).

Definitions (binary relevance; `rel(q)` = the documents judged relevant to query q, `rank` 1-based):
- Recall@k  = |rel(q) ∩ top-k(q)| / |rel(q)|                       (over *all* relevant documents)
- NDCG@k    = DCG@k / IDCG@k, DCG@k = sum_{r<=k, doc_r in rel(q)} 1 / log2(r + 1),
              IDCG@k = sum_{r=1}^{min(|rel(q)|, k)} 1 / log2(r + 1)
- MRR@k     = 1 / (rank of the first relevant document) if it is within the top k, else 0
Every metric is averaged over queries (macro average). Queries with no relevant document are not allowed.

The trainer's in-training dev check uses `retrieve_exact` + `dev_metrics` directly, without Ray:

    idx = retrieve_exact(q_emb, d_emb, k=10)[1]      # [Q, 10] row indices into d_emb
    dev_metrics(idx, qrels, ks=(10,))["recall@10"]   # qrels[i] = indices of the relevant rows of d_emb
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_METRICS = ("recall@10", "ndcg@10", "mrr@10", "recall@100")


def retrieve_exact(q_emb, d_emb, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores [Q, k'], indices [Q, k']) with k' = min(k, D), best first.

    Accepts numpy arrays or torch tensors (moved to CPU). Ties go to the lower document index, so the result is
    deterministic. Embeddings are expected L2-normalised, which makes the inner product the cosine similarity.
    """
    q, d = _as_numpy(q_emb), _as_numpy(d_emb)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {q.shape}, documents {d.shape}")
    k = min(int(k), d.shape[0])
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    index = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], chunk):
        sim = q[start:start + chunk] @ d.T  # [c, D]
        if k < d.shape[0]:
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [c, k] unordered
        else:
            part = np.broadcast_to(np.arange(d.shape[0]), sim.shape)
        part_scores = np.take_along_axis(sim, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)  # by score desc, then index asc
        index[start:start + chunk] = np.take_along_axis(part, order, axis=1)
        scores[start:start + chunk] = np.take_along_axis(part_scores, order, axis=1)
    return scores, index


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def relevance_matrix(topk: np.ndarray, qrels: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(hits [Q, K] bool: is the r-th retrieved document relevant, n_rel [Q]); -1 in `topk` marks an empty slot."""
    topk = np.asarray(topk)
    if topk.ndim != 2 or topk.shape[0] != len(qrels):
        raise ValueError(f"topk has shape {topk.shape} but there are {len(qrels)} queries")
    hits = np.zeros(topk.shape, dtype=bool)
    n_rel = np.empty(len(qrels), dtype=np.int64)
    for i, rel in enumerate(qrels):
        rel = np.unique(np.asarray(rel, dtype=np.int64))
        if rel.size == 0:
            raise ValueError(f"query {i} has no relevant document")
        n_rel[i] = rel.size
        hits[i] = np.isin(topk[i], rel) & (topk[i] >= 0)
    return hits, n_rel


def recall_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """Per-query recall@k, [Q]."""
    return hits[:, :k].sum(axis=1) / n_rel


def ndcg_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """Per-query NDCG@k with binary gains, [Q]."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]: 1/log2(r+1) for r = 1..k
    dcg = (hits[:, :k] * discount[: hits[:, :k].shape[1]]).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[np.minimum(n_rel, k)]
    return dcg / ideal


def mrr_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-query reciprocal rank of the first relevant document within the top k (0 if none), [Q]."""
    top = hits[:, :k]
    first = top.argmax(axis=1)
    return np.where(top.any(axis=1), 1.0 / (first + 1), 0.0)


def per_query_metrics(topk: np.ndarray, qrels: Sequence[Sequence[int]],
                      names: Sequence[str] = DEFAULT_METRICS) -> dict[str, np.ndarray]:
    """Per-query values of each metric named like 'recall@10', 'ndcg@10', 'mrr@10': {name: [Q]}."""
    hits, n_rel = relevance_matrix(topk, qrels)
    out = {}
    for name in names:
        kind, _, k = name.partition("@")
        if not k.isdigit():
            raise ValueError(f"metric {name!r} must look like recall@10, ndcg@10 or mrr@10")
        k = int(k)
        if kind == "recall":
            out[name] = recall_at_k(hits, n_rel, k)
        elif kind == "ndcg":
            out[name] = ndcg_at_k(hits, n_rel, k)
        elif kind == "mrr":
            out[name] = mrr_at_k(hits, k)
        else:
            raise ValueError(f"unknown metric {name!r}; use recall@k, ndcg@k or mrr@k")
    return out


def dev_metrics(topk: np.ndarray, qrels: Sequence[Sequence[int]], ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Mean recall@k and ndcg@k over queries, e.g. {'recall@10': 0.42, 'ndcg@10': 0.31}."""
    names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    return {n: float(v.mean()) for n, v in per_query_metrics(topk, qrels, names).items()}


def ann_recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k: how much of the exact neighbour list an ANN index finds."""
    approx, exact = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    found = [np.isin(a[a >= 0], e).sum() / max(len(e), 1) for a, e in zip(approx, exact)]
    return float(np.mean(found)) if found else 1.0
