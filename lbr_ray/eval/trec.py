"""Per-query results as TREC files, so that any two models can be compared later (e.g. with ranx or trec_eval).

    run file:   <qid> Q0 <docid> <rank> <score> <tag>     (one line per retrieved passage, best first)
    qrels file: <qid> 0 <docid> 1                         (one line per relevant passage)

Query ids are `q` + the first 12 hex digits of sha1(query text), document ids the eval set's ids (corpus ids, or
`pos:<hash>` for test positives), with whitespace replaced, so the same eval set gives the same ids in every run.
`paired_significance` compares two systems per query with ranx's `compare` and its statistical tests.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np


def query_id(query: str) -> str:
    return "q" + hashlib.sha1(query.encode("utf-8")).hexdigest()[:12]


def doc_id(doc: str) -> str:
    return re.sub(r"\s+", "_", str(doc)) or "_"


def write_qrels(eset, path: str | Path) -> Path:
    """The eval set's relevance judgements as a TREC qrels file (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{query_id(q)} 0 {doc_id(eset.doc_ids[int(d)])} 1" for q, rel in zip(eset.queries, eset.qrels)
             for d in rel]
    _write(path, lines)
    return path


def write_run(eset, top: np.ndarray, scores: np.ndarray, path: str | Path, tag: str) -> Path:
    """Ranked lists (`top` [Q, k] corpus rows, `scores` [Q, k], best first; -1 = empty slot) as a TREC run file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = doc_id(tag)
    lines = []
    for q, rows, vals in zip(eset.queries, np.asarray(top), np.asarray(scores)):
        qid = query_id(q)
        rank = 0
        for row, score in zip(rows, vals):
            if row >= 0:
                rank += 1
                lines.append(f"{qid} Q0 {doc_id(eset.doc_ids[int(row)])} {rank} {float(score):.6f} {tag}")
    _write(path, lines)
    return path


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            qid, _, doc, rel = line.split()
            out.setdefault(qid, {})[doc] = int(rel)
    return out


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            qid, _, doc, _, score, _ = line.split()
            out.setdefault(qid, {})[doc] = float(score)
    return out


def stack(per_seed: dict) -> dict:
    """Runs (or qrels) of several seeds as one, query ids prefixed by the seed ("s0:q..."): a paired test over
    (seed, query) pairs then pairs each system's seed-s run with the other system's seed-s run on the same query."""
    return {f"s{seed}:{qid}": docs for seed, run in per_seed.items() for qid, docs in run.items()}


def paired_significance(qrels: dict, control: dict, treatment: dict, names: tuple[str, str] = ("a", "b"),
                        metric: str = "recall@10", stat_test: str = "fisher", max_p: float = 0.05) -> dict:
    """Paired significance of `control` minus `treatment` on per-query `metric`, by ranx.compare (Fisher's
    randomization test or the paired Student's t-test, over the same queries). Returns the two means, their
    difference, the p-value, whether p <= max_p, and per-query wins / ties / losses of the control."""
    from ranx import Qrels, Run, compare

    runs = [Run(control, name=names[0]), Run(treatment, name=names[1])]
    report = compare(Qrels(qrels), runs, metrics=[metric], stat_test=stat_test, max_p=max_p, make_comparable=True,
                     rounding_digits=6)
    test = report.comparisons[names[0], names[1]][metric]
    wtl = report.win_tie_loss[(names[0], names[1])][metric]
    a, b = report.results[names[0]][metric], report.results[names[1]][metric]
    return {"metric": metric, "control": names[0], "treatment": names[1], "control_mean": a, "treatment_mean": b,
            "diff": a - b, "p_value": float(test["p_value"]), "significant": bool(test["significant"]),
            "stat_test": stat_test, "max_p": max_p, "n_queries": len(qrels), "wins": wtl["W"], "ties": wtl["T"],
            "losses": wtl["L"]}


__all__ = ["query_id", "write_qrels", "write_run", "read_qrels", "read_run", "stack", "paired_significance"]
