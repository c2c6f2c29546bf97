"""Per-query results as TREC files, so that any two models can be compared later (e.g. with ranx or trec_eval).

    run file:   <qid> Q0 <docid> <rank> <score> <tag>     (one line per retrieved passage, best first)
    qrels file: <qid> 0 <docid> 1                         (one line per relevant passage)

Query ids are `q` + the first 12 hex digits of sha1(query text), document ids the eval set's ids, one per passage
(corpus ids, with whitespace replaced and `~<text hash>` added to an id several passages share, or `pos:<hash>` for
test positives: lbr_ray.eval.sets.unique_ids), so the same eval set gives the same ids in every run.
`paired_significance` compares two systems per query (ranx scores each query, seeds are averaged per query, and
`paired_test` tests the per-query differences).
"""
from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np


def query_id(query: str) -> str:
    return "q" + hashlib.sha1(query.encode("utf-8")).hexdigest()[:12]


def doc_id(doc: str) -> str:
    return re.sub(r"\s+", "_", str(doc)) or "_"


def qrels_of(eset) -> dict[str, dict[str, int]]:
    """The eval set's relevance judgements, {query id: {doc id: 1}}, as read_qrels reads them from a file."""
    qrels: dict[str, dict[str, int]] = {}
    for q, rel in zip(eset.queries, eset.qrels):
        qrels.setdefault(query_id(q), {}).update({doc_id(eset.doc_ids[int(d)]): 1 for d in rel})
    return qrels


def write_qrels(eset, path: str | Path) -> Path:
    """The eval set's relevance judgements as a TREC qrels file (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, [f"{q} 0 {d} 1" for q, rel in qrels_of(eset).items() for d in rel])
    return path


def write_run(eset, top: np.ndarray, scores: np.ndarray, path: str | Path, tag: str) -> Path:
    """Ranked lists (`top` [Q, k] corpus rows, `scores` [Q, k], best first; -1 = empty slot) as a TREC run file.
    Scores are written to 6 decimals, each strictly below the one above it (a tie, e.g. BM25's zero scores, 1e-6
    lower): ranx and trec_eval rank by score, so they read the ranking that was scored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = doc_id(tag)
    lines = []
    for q, rows, vals in zip(eset.queries, np.asarray(top), np.asarray(scores)):
        qid = query_id(q)
        rank, above = 0, None
        for row, score in zip(rows, vals):
            if row >= 0:
                rank += 1
                value = round(float(score), 6)
                if above is not None and value >= above:  # a tie: just below, so sorting by score keeps the ranks
                    value = round(above - 1e-6, 6)
                above = value
                lines.append(f"{qid} Q0 {doc_id(eset.doc_ids[int(row)])} {rank} {value:.6f} {tag}")
    _write(path, lines)
    return path


def _write(path: Path, lines: list[str]) -> None:
    """Atomically; a `.gz` path gzipped without a timestamp (the same lines give the same bytes)."""
    tmp = path.with_name(path.name + ".tmp")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    tmp.replace(path)


def _lines(path: str | Path) -> list[str]:
    data = Path(path).read_bytes()
    return (gzip.decompress(data) if str(path).endswith(".gz") else data).decode("utf-8").splitlines()


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """A qrels file (plain or .gz)."""
    out: dict[str, dict[str, int]] = {}
    for line in _lines(path):
        if line.strip():
            qid, _, doc, rel = line.split()
            out.setdefault(qid, {})[doc] = int(rel)
    return out


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A run file (plain or .gz)."""
    out: dict[str, dict[str, float]] = {}
    for line in _lines(path):
        if line.strip():
            qid, _, doc, _, score, _ = line.split()
            out.setdefault(qid, {})[doc] = float(score)
    return out


def copy_trec(src: str | Path, dst: str | Path, depth: int | None = None) -> Path:
    """A run or qrels file copied (a `.gz` destination gzipped), a run cut to each query's top `depth` ranks."""
    lines = _lines(src)
    if depth is not None:
        lines = [line for line in lines if line.strip() and int(line.split()[3]) <= depth]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write(dst, lines)
    return dst


def per_query(qrels: dict, run: dict, metric: str = "recall@10") -> dict[str, float]:
    """{query id: `metric`} of one run over every query of `qrels` (ranx; a query the run lacks scores 0)."""
    from ranx import Qrels, Run, evaluate

    scored = Run(run)
    evaluate(Qrels(qrels), scored, metric, make_comparable=True)
    return {qid: float(v) for qid, v in scored.scores[metric].items()}


def paired_test(control: np.ndarray, treatment: np.ndarray, stat_test: str = "fisher") -> float:
    """Two-sided p-value of mean(control - treatment) = 0, paired over the entries (queries): `fisher`, Fisher's
    randomization test (scipy.stats.permutation_test swapping each pair, 9,999 resamples, seeded: the same p every
    time, >= 1e-4; ranx's own version gives another p on each call), or `student`, the paired t-test."""
    from scipy import stats

    control, treatment = np.asarray(control, float), np.asarray(treatment, float)
    if np.allclose(control, treatment):
        return 1.0
    if stat_test == "student":
        return float(stats.ttest_rel(control, treatment).pvalue)
    res = stats.permutation_test((control, treatment), lambda a, b, axis: np.mean(a - b, axis=axis),
                                 permutation_type="samples", vectorized=True, n_resamples=9999,
                                 rng=np.random.default_rng(0))
    return float(res.pvalue)


def paired_significance(qrels: dict, control: list[dict], treatment: list[dict], names: tuple[str, str] = ("a", "b"),
                        metric: str = "recall@10", stat_test: str = "fisher", max_p: float = 0.05) -> dict:
    """Paired significance of `control` minus `treatment` on per-query `metric`. Each system is given as its runs of
    the same seeds, in the same order (or `treatment` as one run: a deterministic reference such as BM25); a
    query's metric is averaged over the seeds first, so every query is one sample however many seeds ran (the seed
    spread is reported apart, as mean +- std over seeds). Returns the two means, their difference, the p-value over
    the queries (`paired_test`), whether p <= max_p, and per-query wins / ties / losses of the control's
    seed-averaged metric."""
    if not control or len(treatment) not in (1, len(control)):
        raise ValueError("paired_significance needs runs of the same seeds for both systems (or one reference run)")
    qids = sorted(qrels)

    def seed_mean(runs: list[dict]) -> np.ndarray:  # [queries]: each query's metric, averaged over the seeds
        scores = [per_query(qrels, run, metric) for run in runs]
        return np.mean([[s[q] for q in qids] for s in scores], axis=0)

    a, b = seed_mean(control), seed_mean(treatment)
    diff = np.where(np.isclose(a, b), 0.0, a - b)
    p = paired_test(a, b, stat_test)
    return {"metric": metric, "control": names[0], "treatment": names[1], "control_mean": float(a.mean()),
            "treatment_mean": float(b.mean()), "diff": float(a.mean() - b.mean()), "p_value": p,
            "significant": p <= max_p, "stat_test": stat_test, "max_p": max_p, "n_queries": len(qids),
            "n_seeds": len(control), "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
            "losses": int((diff < 0).sum())}


__all__ = ["query_id", "write_qrels", "write_run", "read_qrels", "read_run", "copy_trec", "per_query", "paired_test",
           "paired_significance"]
