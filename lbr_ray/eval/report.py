"""Write an evaluation's results as report.json, report.md, report.csv and report.png (no Ray)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from lbr_ray.eval.metrics import DEFAULT_METRICS
from lbr_ray.eval.sets import DIFFICULTIES

LABELS = {"recall@10": "R@10", "ndcg@10": "NDCG@10", "mrr@10": "MRR@10", "recall@100": "R@100"}
CSV_FIELDS = ("domain", "group", "difficulty", *DEFAULT_METRICS, "n_queries", "corpus_size")


def table_rows(results: dict) -> list[dict]:
    """One flat row per (domain, group): the CSV rows."""
    return [{"domain": d, **row} for d, r in results["domains"].items() for row in r["rows"]]


def write_reports(results: dict, output: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write the four report files into `output` and return their paths."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in table_rows(results):
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    paths["md"].write_text(markdown(results, title))
    bar_chart(results, paths["png"], title)
    return paths


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def markdown(results: dict, title: str | None = None) -> str:
    o = results.get("options", {})
    lines = [f"# {title or 'Retrieval evaluation: ' + str(results.get('model'))}", ""]
    index = o.get("index", "-") if results["method"] == "dense" else "BM25"
    lines.append(f"Method: {results['method']} · index: {index}"
                 f" · data: {o.get('data_root')} · test split · workers: {o.get('num_workers')}"
                 f" · caps: queries {o.get('max_queries') or 'none'}, corpus {o.get('max_corpus') or 'none'}")
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    lines += ["", "Metrics: Recall@k = |relevant ∩ top-k| / |relevant|; NDCG@k with binary gains and ideal DCG over "
              "min(|relevant|, k); MRR@10; means over queries. Difficulty: easy = term_ctx/section, moderate = "
              "HPO/GO term_def, hard = the rest.", ""]
    lines += ["## Per domain", "", "R@10 / NDCG@10 (queries) of each difficulty group in the last three columns.", "",
              "| domain | queries | corpus | R@10 | NDCG@10 | MRR@10 | R@100 | hard | moderate | easy | extra |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for d, r in results["domains"].items():
        by = {row["group"]: row for row in r["rows"]}
        extra = [f"ANN recall@10 {r['ann_recall@10']:.3f}"] if "ann_recall@10" in r else []
        if "qps_ratio_vs_exact" in r:
            extra += [f"{r['index']} {r['index_params']}".strip() + f": {r['qps_ratio_vs_exact']:.2f}x exact q/s"
                      + (" (exact used)" if r.get("used") == "exact" else "")]
        if r.get("index_build", {}).get("bytes_per_vector"):
            b = r["index_build"]
            extra += [f"index {b['bytes_per_vector']:.0f} bytes/passage, " + (
                "read back" if b["reused"] else f"built in {b['build_seconds']:.0f}s")]
        extra += [f"{r['queries_per_s']:.0f} q/s"]
        groups = " | ".join(_pair(by.get(g)) for g in DIFFICULTIES)
        lines.append(f"| {d} | {r['n_queries']} | {r['corpus_size']} | " + " | ".join(
            _f(by["all"][m]) for m in DEFAULT_METRICS) + f" | {groups} | {'; '.join(extra)} |")
    lines += ["", "## Per pair type", "", "| domain | group | difficulty | queries | R@10 | NDCG@10 | MRR@10 | R@100 |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in table_rows(results):
        lines.append(f"| {row['domain']} | {row['group']} | {row['difficulty'] or '-'} | {row['n_queries']} | "
                     + " | ".join(_f(row[m]) for m in DEFAULT_METRICS) + " |")
    notes = [n for r in results["domains"].values() for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def _pair(row: dict | None) -> str:
    return "-" if row is None else f"{row['recall@10']:.3f} / {row['ndcg@10']:.3f} ({row['n_queries']})"


def _f(x) -> str:
    return "-" if x is None or x == "" else f"{x:.4f}"


def bar_chart(results: dict, path: str | Path, title: str | None = None) -> list[str]:
    """Grouped bars: R@10 and NDCG@10 for all queries of each domain and for each difficulty that has queries in
    some domain (hard / moderate / easy). Returns the series' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["domains"])
    by = {d: {row["group"]: row for row in r["rows"]} for d, r in results["domains"].items()}
    series = [(g, m) for g in ("all", *DIFFICULTIES) if any(g in groups for groups in by.values())
              for m in ("recall@10", "ndcg@10")]
    labels = [f"{g} {LABELS[m]}" for g, m in series]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(domains)), 4))
    width = 0.8 / len(series)
    for i, (g, m) in enumerate(series):
        vals = [by[d][g][m] if g in by[d] else np.nan for d in domains]
        ax.bar(np.arange(len(domains)) + (i - len(series) / 2 + 0.5) * width, vals, width,
               label=labels[i], alpha=1.0 if g == "all" else 0.75)
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title or f"{results.get('model')}: test-split retrieval")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return labels
