"""Retrieval evaluation: eval sets (sets), cached Ray Data encoding (encode), sharded FAISS search (index), metrics,
baselines, reports, TREC run/qrels files and paired significance (trec) and the RetrievalEvaluator (evaluator). Importing this package imports neither Ray nor torch."""
from lbr_ray.eval.metrics import dev_metrics, per_query_metrics, retrieve_exact

__all__ = ["dev_metrics", "per_query_metrics", "retrieve_exact"]
