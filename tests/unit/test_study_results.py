"""`lbr study --results`: a finished cell's small files are copied (and committed, nothing else), a fresh clone
without the study folder reports over the committed cells without training or Ray, every baseline is scored on the
cells' test sets with its own runs and paired tests, a changed test set stops a resumed study, and the committed
spec's paths resolve in a clone elsewhere."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import threading
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from lbr_ray.config import load_config
from lbr_ray.errors import ConfigError
from lbr_ray.tune.results import RESULTS_DEPTH, cell_dir, load_spec, save_spec
from lbr_ray.tune.study import (
    StudySpec, check_eval_sets, eval_options, keep_cell, load_study, run_study, study_config,
)

ROOT = Path(__file__).resolve().parents[2]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def git_env(monkeypatch):
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "lbr test")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "lbr@test")


def fake_cell(out: Path, cfg, spec: StudySpec, variant: str, seed: int, hits: int) -> tuple[Path, dict]:
    """A finished cell as study_cell leaves it, on the study's real test sets: per domain a run of depth 100 whose
    first `hits` queries find a relevant passage at rank 1; a checkpoint folder that must never be copied."""
    from lbr_ray.eval.evaluator import RetrievalEvaluator
    from lbr_ray.eval.trec import write_run

    cell = out / "cells" / f"0000{hits}_variant={variant}_seed={seed}"
    ev = RetrievalEvaluator(eval_options(cfg, spec, out / "cache"), log=lambda m: None)
    test = {}
    for domain in spec.domains:
        eset = ev.eval_set(domain)
        n, docs, rng = len(eset.queries), len(eset.doc_texts), np.random.default_rng(seed)
        top = np.full((n, min(100, docs)), -1)
        for i in range(n):
            relevant = set(eset.qrels[i].tolist())
            ranked = ([int(eset.qrels[i][0])] if i < hits else []) + [
                d for d in rng.permutation(docs).tolist() if d not in relevant]
            top[i, :min(len(ranked), top.shape[1])] = ranked[:top.shape[1]]
        scores = np.sort(rng.random(top.shape))[:, ::-1]
        write_run(eset, top, scores, cell / "runs" / f"{domain}.trec", f"{variant}_seed{seed}")
        test[domain] = {"recall@10": hits / n, "n_queries": n, "corpus_size": docs}
    (cell / "gr_cl" / "checkpoint_000001").mkdir(parents=True)
    (cell / "gr_cl" / "checkpoint_000001" / "model.safetensors").write_bytes(b"0" * 4096)
    (cell / "test").mkdir()
    (cell / "test" / "report.json").write_text(json.dumps({"model": variant}))
    doc = {"params": {"variant": variant, "seed": seed}, "variant": variant, "seed": seed, "done": True,
           "dev_recall@10": 0.5, "test": test}
    (cell / "cell.json").write_text(json.dumps(doc))
    return cell, doc


def test_a_finished_cell_is_copied_small_and_commits_only_its_folder(tmp_path, git_env):
    """Its cell.json, report and runs (top RESULTS_DEPTH, gzipped) are copied, its checkpoint not; the commit holds
    exactly that folder although another file is staged, waits out a held index lock, and names cell and R@10."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README").write_text("x\n")
    git(repo, "add", "README")
    git(repo, "commit", "-qm", "init")
    (repo / "unrelated.txt").write_text("work in progress\n")
    git(repo, "add", "unrelated.txt")
    results = repo / "benchmarks" / "results" / "study_x"
    spec = StudySpec(target="medical", variants=("lbr",), seeds=(0,), data_root=str(ROOT / "data" / "demo"),
                     test_max_queries=30, test_max_corpus=300)
    cfg = load_config("configs/demo.yaml")
    cell, doc = fake_cell(tmp_path / "out", cfg, spec, "lbr", 0, hits=12)
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # another git process holds the index for a moment
    threading.Timer(1.5, lock.unlink).start()
    keep_cell(results, cell, doc, commit=True)
    folder = cell_dir(results, "lbr", 0)
    assert git(repo, "log", "-1", "--format=%s").strip() == (
        "study study_x: cell lbr seed 0 done, test R@10 medical 0.4000")
    committed = git(repo, "show", "--name-only", "--format=", "HEAD").split()
    assert committed and all(f.startswith("benchmarks/results/study_x/cells/lbr_seed0/") for f in committed)
    assert git(repo, "diff", "--cached", "--name-only").split() == ["unrelated.txt"]  # still staged, not committed
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "cell.json", "runs/medical.trec.gz", "test/report.json"]
    lines = gzip.decompress((folder / "runs" / "medical.trec.gz").read_bytes()).decode().splitlines()
    ranks = [int(line.split()[3]) for line in lines]
    assert max(ranks) == RESULTS_DEPTH and len(lines) == 30 * RESULTS_DEPTH
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 100_000


def test_a_fresh_clone_reports_over_the_committed_cells_without_training(tmp_path, monkeypatch):
    """Cells committed by an earlier session, their study folder deleted: --resume from the results folder trains
    nothing and starts no Ray (every cell is committed), scores bm25 and the untrained base on the same test sets
    (runs over exactly the cells' queries, paired tests against lbr) and reports every cell. (MiniLM is scored by
    the same dense path as base: test_the_baselines_are_what_lbr_eval_scores.)"""
    import ray

    from lbr_ray.eval.trec import read_qrels, read_run

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    results, first = tmp_path / "repo" / "results" / "study_x", tmp_path / "runs" / "study"
    spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=(0, 1), heldout=("chemistry",),
                     data_root=str(ROOT / "data" / "demo"), test_max_queries=20, test_max_corpus=60,
                     baselines=("bm25", "base"), results=str(results))
    cfg = study_config(load_config("configs/demo.yaml"), spec, first)
    save_spec(results, cfg, asdict(spec))
    check_eval_sets(cfg, spec, first)
    for (variant, seed), hits in {("lbr", 0): 16, ("lbr", 1): 15, ("cl", 0): 6, ("cl", 1): 5}.items():
        keep_cell(results, *fake_cell(first, cfg, spec, variant, seed, hits), commit=False)
    shutil.rmtree(first)  # a fresh clone: no runs/ folder

    clone = tmp_path / "clone-runs" / "study"
    cfg2, spec2 = load_study(clone, results)
    assert spec2.results == str(results) and spec2.baselines == ("bm25", "base")
    doc = run_study(cfg2, spec2, clone, resume=True)
    assert not (clone / "cells").exists()  # nothing trained
    assert doc["finished"] and doc["cells_done"] == 4 == doc["cells_total"]
    table = {r["variant"]: r for r in doc["table"]}
    assert table["lbr"]["seeds"] == [0, 1] and table["lbr"]["medical"]["mean"] == pytest.approx(31 / 40)
    sig = {(s["domain"], s["treatment"]): s for s in doc["significance"]}
    assert set(sig) == {(d, t) for d in ("medical", "chemistry") for t in ("cl", "bm25", "base")}
    assert sig[("medical", "cl")]["diff"] == pytest.approx(31 / 40 - 11 / 40) and sig[("medical", "cl")]["seeds"] == [
        0, 1]
    assert all(sig[("medical", b)]["baseline"] and sig[("medical", b)]["n_queries"] == 20 for b in ("bm25", "base"))
    for domain in ("medical", "chemistry"):
        qrels = read_qrels(results / "qrels" / f"{domain}.trec.gz")
        cell_run = read_run(cell_dir(results, "cl", 1) / "runs" / f"{domain}.trec.gz")
        for name in ("bm25", "base"):
            run = read_run(results / "baselines" / name / f"{domain}.trec.gz")
            assert set(run) == set(qrels) == set(cell_run)  # the same queries as every cell
            metrics = json.loads((results / "baselines" / name / "metrics.json").read_text())[domain]
            assert metrics["n_queries"] == len(qrels)
            assert metrics["corpus_size"] == doc["eval_sets"][domain]["passages"]
            assert metrics["hard_queries"] > 0 and doc["baselines_hard"][name][domain] == metrics["hard_recall@10"]
    # baselines committed by an older lbr (group all only): a resume takes their hard types' R@10 from their runs,
    # which gives what the evaluator scored
    scored = {n: json.loads((results / "baselines" / n / "metrics.json").read_text()) for n in ("bm25", "base")}
    for name, metrics in scored.items():
        older = {d: {k: v for k, v in m.items() if not k.startswith("hard_")} for d, m in metrics.items()}
        (results / "baselines" / name / "metrics.json").write_text(json.dumps(older))
    doc = run_study(cfg2, spec2, tmp_path / "clone2-runs" / "study", resume=True)
    for name, metrics in scored.items():
        again = json.loads((results / "baselines" / name / "metrics.json").read_text())
        assert again.keys() == metrics.keys() and all(again[d] == pytest.approx(metrics[d]) for d in metrics)
        assert doc["baselines_hard"][name] == pytest.approx({d: m["hard_recall@10"] for d, m in metrics.items()})
    md = (results / "results.md").read_text()
    assert "| BM25 (reference) | - |" in md and "| base model, untrained (reference) | - |" in md
    assert "| medical | base model, untrained (reference) | 0,1 | 20 |" in md
    assert "medical 20 queries × 60 passages" in md and (results / "study.png").stat().st_size > 5000
    # the test set changed (another cap): the committed cells do not pair with it, so the study stops
    with pytest.raises(ConfigError, match="the medical test set .19 queries, 60 passages. is not the one"):
        run_study(cfg2, replace(spec2, test_max_queries=19), tmp_path / "other", resume=True)


def test_the_baselines_are_what_lbr_eval_scores():
    """minilm = `lbr eval --baseline minilm`; base = the config's model untrained, cut where the cells' models cut."""
    from lbr_ray.eval.baselines import BM25Retriever, base_ref, minilm_ref
    from lbr_ray.tune.study import baseline_methods

    cfg = load_config("configs/demo.yaml")
    spec = StudySpec(target="medical", variants=("lbr",), seeds=(0,), data_root="x", baselines=("bm25", "minilm",
                                                                                                "base"),
                     eval_dtype="bfloat16")
    methods = baseline_methods(cfg, spec)
    assert isinstance(methods["bm25"], BM25Retriever) and methods["minilm"] == minilm_ref()
    assert methods["base"] == base_ref(cfg.model.name, True, max_length=cfg.data.max_input_tokens,
                                       dtype="bfloat16")


def test_the_eval_dtype_is_resolved_once_and_kept(tmp_path):
    """--eval-dtype auto becomes this machine's choice (bf16 where lbr eval's --dtype auto picks it) and is saved in
    the spec; a study saved before the field existed reads back as float32, the dtype it encoded in."""
    from cli.study import study_inputs
    from lbr_ray.hardware import bf16_is_fast
    from lbr_ray.tune.study import spec_from_dict

    def spec(dtype):
        return study_inputs(Path("configs/demo.yaml"), "medical", "lbr", "0", "", None, tmp_path / "s", False, [],
                            eval_dtype=dtype)[1]

    assert spec("auto").eval_dtype == ("bfloat16" if bf16_is_fast() else "float32")
    assert spec("float32").eval_dtype == "float32"
    with pytest.raises(ConfigError, match="--eval-dtype must be"):
        spec("fp8")
    old = {"target": "medical", "variants": ["lbr"], "seeds": [0], "data_root": "x"}
    assert spec_from_dict(old).eval_dtype == "float32"


def test_the_committed_spec_resolves_in_a_clone_elsewhere(tmp_path):
    """Local paths are stored relative to the results folder: a clone at another path with the same neighbours
    (../shared/data, a git-ignored models/ folder) finds them."""
    from lbr_ray.config import replace as replace_config

    def layout(top: Path) -> Path:
        (top / "shared" / "data" / "medical").mkdir(parents=True)
        (top / "shared" / "data" / "medical" / "pairs.jsonl").write_text("{}\n")
        shutil.copytree(ROOT / "lbr_ray" / "assets" / "tiny-llama", top / "repo" / "models" / "tiny")
        return top / "repo" / "benchmarks" / "results" / "study_x"

    results = layout(tmp_path / "a")
    data = tmp_path / "a" / "shared" / "data"
    model = tmp_path / "a" / "repo" / "models" / "tiny"
    cfg = replace_config(load_config("configs/demo.yaml"), model={"name": str(model)},
                         data={"pairs": (str(data / "medical" / "pairs.jsonl"),), "corpus": ()})
    spec = StudySpec(target="medical", variants=("lbr",), seeds=(0,), data_root=str(data), results=str(results))
    save_spec(results, cfg, asdict(spec))
    clone = layout(tmp_path / "b")
    shutil.copytree(results, clone)
    cfg2, spec2 = load_spec(clone)
    assert spec2["data_root"] == str(tmp_path / "b" / "shared" / "data") and spec2["results"] == str(clone)
    assert cfg2.model.name == str(tmp_path / "b" / "repo" / "models" / "tiny")
    assert cfg2.data.pairs == (str(tmp_path / "b" / "shared" / "data" / "medical" / "pairs.jsonl"),)
    assert "relative_paths" in json.loads((clone / "study.json").read_text())


def test_study_result_options_are_checked(lbr, tmp_path):
    def one_line(code, err, needle):
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err

    base = ["study", "--config", "configs/demo.yaml", "--target", "medical", "--seeds", "0"]
    one_line(*lbr(*base, "--output", tmp_path / "s", "--commit"), "--commit commits the --results folder")
    one_line(*lbr(*base, "--output", tmp_path / "s", "--results", tmp_path / "s" / "r"), "must be separate folders")
    one_line(*lbr(*base, "--output", tmp_path / "s", "--baselines", "bm25,gpt"), "--baselines must be distinct")
    one_line(*lbr("study", "--output", tmp_path / "s", "--results", tmp_path / "r", "--resume"),
             "nor does --results")
    assert not (tmp_path / "s").exists()


def test_a_variant_trains_on_mined_pairs_named_relative_to_the_study(tmp_path):
    """`cl+data.pairs=runs/mined/x.jsonl.gz`: a cell runs in its trial folder, so the path is taken from the folder
    `lbr study` runs in (a fresh clone's own root), not left relative."""
    from lbr_ray.tune.study import cell_config

    variant = "cl+data.pairs=runs/mined/medical.jsonl.gz+gr_cl.hard_negatives=1@0/1"
    cfg, _ = cell_config(load_config("configs/demo.yaml"), variant, 1, tmp_path, root="/clone")
    assert cfg.data.pairs == ("/clone/runs/mined/medical.jsonl.gz",) and cfg.gr_cl.hard_negatives == 1
