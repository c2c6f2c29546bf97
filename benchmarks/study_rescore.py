"""Recompute the p-values of the committed general-base studies from their committed per-query runs (issue 21).

The studies' first p-values stacked the seeds, so every (seed, query) counted as a sample. This script unpacks
`benchmarks/results/study_general_runs_top10.tar.gz` (TREC runs, qrels and every cell's cell.json), puts each
study's committed results JSON next to its cells as results.json, runs `lbr study --output DIR --rescore` (each
query's R@10 averaged over the seeds both variants ran, then the paired test over queries), copies the new
results.{json,md} back over `benchmarks/results/study_general_<name>.*` and writes the old p-values (from git,
commit BEFORE) and the new ones side by side to `benchmarks/results/study_rescore.md`. Deterministic (seeded
resampling); needs no training, GPU or Ray.

    python benchmarks/study_rescore.py
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"
STUDIES = {"study-medical": "study_general_medical", "study-chemistry": "study_general_chemistry",
           "study-medical-long": "study_general_medical_long"}
COMMAND = "python benchmarks/study_rescore.py"
BEFORE = "888de8b"  # the last commit with the first p-values (git show reads them for the comparison)

sys.path.insert(0, str(ROOT))
from lbr_ray.tune.study import rescore  # noqa: E402


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(RES / "study_general_runs_top10.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        for folder, name in STUDIES.items():
            study = Path(tmp) / "runs" / folder
            old = json.loads(subprocess.run(["git", "show", f"{BEFORE}:benchmarks/results/{name}.json"], cwd=ROOT,
                                            check=True, capture_output=True, text=True).stdout)
            shutil.copy(RES / f"{name}.json", study / "results.json")
            new = rescore(study)  # = lbr study --output STUDY --rescore
            shutil.copy(study / "results.json", RES / f"{name}.json")
            shutil.copy(study / "results.md", RES / f"{name}.md")
            before = {(s["domain"], s["treatment"]): s for s in old["significance"]}
            for s in new["significance"]:
                b = before[(s["domain"], s["treatment"])]
                rows.append(f"| {name} | {s['domain']} | {s['treatment']} | {','.join(map(str, s['seeds']))} "
                            f"| {s['diff']:+.4f} | {b['n_queries']} | {b['p_value']:.4f} | {s['n_queries']} "
                            f"| {s['p_value']:.4f} | {verdict(b['significant'], s['significant'])} |")
    (RES / "study_rescore.md").write_text("\n".join([
        "# The general-base studies' p-values, recomputed (issue 21)", "",
        f"`{COMMAND}` (from the committed per-query runs, `study_general_runs_top10.tar.gz`). Before (commit "
        f"{BEFORE}): ranx's Fisher randomization test (1,000 permutations; its p varies from call to call despite its "
        "seed) over (seed, query) pairs, so n = seeds x queries. After: each query's R@10 averaged over the seeds both "
        "variants ran, then Fisher's randomization test over the queries (scipy.stats.permutation_test, 9,999 paired "
        "resamples, seeded). lbr minus each variant; significant at p <= 0.05.", "",
        "| study | domain | lbr minus | seeds | mean diff | n before | p before | n after | p after | significant |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]))
    print(f"wrote {RES / 'study_rescore.md'}")


def verdict(before: bool, after: bool) -> str:
    if before == after:
        return "yes" if after else "no"
    return "**yes -> no**" if before else "**no -> yes**"


if __name__ == "__main__":
    main()
