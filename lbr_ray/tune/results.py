"""A study's committed results (`lbr study --results DIR`): the small files of every finished cell, copied into a
folder of the repository as soon as the cell ends (and, with --commit, committed), so that `lbr study --resume` on a
fresh clone, without the runs/ folder, skips those cells and still reports over all of them. No Ray here.

<results>/study.json, sweep_config.yaml   the spec and config; local paths relative to this folder
<results>/eval_sets.json                   each test set's size and text hashes (a resumed study must match them)
<results>/qrels/<domain>.trec.gz           the judgements every run is scored against
<results>/baselines/<name>/                <domain>.trec.gz and metrics.json of bm25, minilm, base
<results>/cells/<variant>_seed<seed>/      cell.json, summary.json, test/report.{json,md}, runs/<domain>.trec.gz
<results>/results.{md,json,csv}, study.png the report of the last session

Runs are cut to each query's top RESULTS_DEPTH passages (R@10, NDCG@10 and MRR@10 need 10): 500 queries on two
domains take about 0.25 MB gzipped per cell; no checkpoint or model is copied.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

RESULTS_DEPTH = 20
CELL_FILES = ("cell.json", "summary.json", "test/report.json", "test/report.md")
RELATIVE = "relative_paths"  # study.json key: the settings this folder stores relative to itself


def cell_dir(results: Path, variant: str, seed: int) -> Path:
    """The committed folder of one cell, named by variant and seed (stable across sessions, unlike Tune's trial
    index), e.g. cells/lbr+bottleneck.k=2@0_seed0."""
    return Path(results) / "cells" / re.sub(r"[^\w.+=@-]", "-", f"{variant}_seed{seed}")


def committed(results: Path | None, variant: str, seed: int) -> dict | None:
    """The committed cell.json of (variant, seed) if that cell finished, else None."""
    path = cell_dir(results, variant, seed) / "cell.json" if results else None
    if path is None or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("done") else None


def committed_cells(results: Path | None) -> list[dict]:
    """Every finished committed cell, with `cell` (its folder name) and `runs` (the folder of its TREC runs)."""
    out = []
    for path in sorted(Path(results).glob("cells/*/cell.json")) if results else []:
        doc = json.loads(path.read_text())
        if doc.get("done"):
            out.append({**doc, "cell": path.parent.name, "runs": str(path.parent / "runs")})
    return out


def save_cell(results: Path, cell: Path, doc: dict) -> Path:
    """Copy a finished cell's small files (CELL_FILES, its runs cut to RESULTS_DEPTH, gzipped) into results."""
    from lbr_ray.eval.trec import copy_trec

    dst = cell_dir(results, doc["variant"], doc["seed"])
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CELL_FILES:
        if (cell / name).is_file() and name != "cell.json":
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cell / name, tmp / name)
    for run in sorted((cell / "runs").glob("*.trec")):
        copy_trec(run, tmp / "runs" / f"{run.name}.gz", RESULTS_DEPTH)
    (tmp / "cell.json").write_text(json.dumps({**doc, "runs_depth": RESULTS_DEPTH}, indent=2, default=str) + "\n")
    shutil.rmtree(dst, ignore_errors=True)  # a cell that ran again replaces its earlier copy
    os.replace(tmp, dst)
    return dst


def run_file(folder: str | Path, domain: str) -> Path:
    """`<folder>/<domain>.trec`, or its gzipped copy."""
    plain = Path(folder) / f"{domain}.trec"
    return plain if plain.is_file() else plain.with_name(plain.name + ".gz")


# --- the spec and config, with local paths relative to the results folder (a clone elsewhere resolves them) ---

def portable_spec(results: Path, spec_dict: dict) -> dict:
    """The spec as committed to `results`: no `results` path, an absolute data_root relative to the folder."""
    spec = {**spec_dict, "results": "", RELATIVE: []}
    if os.path.isabs(spec["data_root"]):
        spec["data_root"], spec[RELATIVE] = os.path.relpath(spec["data_root"], Path(results).resolve()), ["data_root"]
    return spec


def save_spec(results: Path, cfg, spec_dict: dict) -> None:
    """study.json and sweep_config.yaml of `cfg` (an LbrConfig) and the spec, local paths relative to `results`."""
    from lbr_ray.config import replace, save_config

    results = Path(results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    spec = portable_spec(results, spec_dict)
    moved = spec[RELATIVE]

    def rel(path: str) -> str:
        return os.path.relpath(path, results)

    data = {}
    for key in ("pairs", "corpus"):
        paths = getattr(cfg.data, key)
        if paths and all(os.path.isabs(p) for p in paths):
            data[key] = tuple(rel(p) for p in paths)
            moved.append(f"data.{key}")
    model = {}
    if os.path.isabs(cfg.model.name) and os.path.exists(cfg.model.name):
        model["name"] = rel(cfg.model.name)
        moved.append("model.name")
    (results / "study.json").write_text(json.dumps(spec, indent=2) + "\n")
    save_config(replace(cfg, data=data, model=model), results / "sweep_config.yaml")


def load_spec(folder: Path) -> tuple:
    """(LbrConfig, spec dict) of a study's run folder (as written) or of a committed results folder (one with
    `relative_paths`: those resolved against the folder, and `results` the folder itself)."""
    from lbr_ray.config import load_config, replace

    results = Path(folder).resolve()
    spec = json.loads((results / "study.json").read_text())
    cfg = load_config(results / "sweep_config.yaml")
    if RELATIVE not in spec:
        return cfg, spec
    moved = spec.pop(RELATIVE)

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(results, path))

    if "data_root" in moved:
        spec["data_root"] = absolute(spec["data_root"])
    data = {key: tuple(map(absolute, getattr(cfg.data, key))) for key in ("pairs", "corpus")
            if f"data.{key}" in moved}
    model = {"name": absolute(cfg.model.name)} if "model.name" in moved else {}
    spec["results"] = str(results)
    return replace(cfg, data=data, model=model), spec


# --- git ----------------------------------------------------------------------------------------------------------

def git_commit(paths: list[Path], message: str, attempts: int = 10, log=print) -> bool:
    """`git add` + `git commit --only` of exactly `paths` (nothing else staged or changed in the tree is committed),
    retried while another git process holds the index lock. A failure is reported, never raised: a long study goes
    on (its results stay in the folder for the next commit)."""
    paths = [Path(p).resolve() for p in paths]
    top = subprocess.run(["git", "-C", str(paths[0].parent), "rev-parse", "--show-toplevel"], capture_output=True,
                         text=True)
    if top.returncode != 0:
        log(f"[lbr] study: not committed ({paths[0].parent} is not in a git repository)")
        return False
    root = ["git", "-C", top.stdout.strip()]
    rel = [os.path.relpath(p, top.stdout.strip()) for p in paths]
    err = ""
    for attempt in range(attempts):
        add = subprocess.run([*root, "add", "--", *rel], capture_output=True, text=True)
        done = add if add.returncode else subprocess.run([*root, "commit", "-q", "-m", message, "--only", "--",
                                                          *rel], capture_output=True, text=True)
        err = (done.stderr or done.stdout).strip()
        if done.returncode == 0:
            return True
        if "nothing to commit" in err or "no changes added" in err:
            return True
        if "index.lock" not in err:
            break
        time.sleep(min(2 ** attempt, 30) * 0.5)
    log(f"[lbr] study: git commit of {', '.join(rel)} failed: {err.splitlines()[-1] if err else 'no output'}")
    return False


__all__ = ["RESULTS_DEPTH", "cell_dir", "committed", "committed_cells", "save_cell", "run_file", "portable_spec",
           "save_spec", "load_spec", "git_commit"]
