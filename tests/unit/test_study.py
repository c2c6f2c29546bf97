"""`lbr study` without Ray: bad grids stop with one line, the significance test on constructed runs, the table
(mean +- std over seeds), paired significance over seed-averaged queries and the plot from constructed cells."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lbr_ray.tune.study import (
    StudySpec, as_named, cell_config, check_spec, grid_cells, markdown, parse_variant, plot, significance,
    spec_from_dict, summarize, table,
)


def lbr(*args):
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_unknown_variant_stops_with_one_line_and_exit_2(tmp_path):
    out = lbr("study", "--config", "configs/demo.yaml", "--target", "medical", "--variants", "lbr,cl,bogus",
              "--seeds", "0", "--output", str(tmp_path / "s"))
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown variant(s) bogus" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "s").exists()  # nothing started


def test_variants_with_overrides_and_pinned_seeds(tmp_path):
    """A k sweep point and a from-scratch control ride in the same grid: overrides reach the cell's config, pinned
    seeds run only those, after the main grid's whole seeds; a bad override stops with one line, exit 2."""
    from lbr_ray.config import load_config

    assert parse_variant("lbr+bottleneck.k=2@0/2") == ("lbr", ("bottleneck.k=2",), (0, 2))
    assert parse_variant("cl-mc") == ("cl-mc", (), None)
    spec = StudySpec(target="medical", variants=("lbr", "cl", "lbr+bottleneck.k=8@0", "cl+model.from_scratch=true@1"),
                     seeds=(0, 1), data_root="data/demo")
    assert [(c["variant"], c["seed"]) for c in grid_cells(spec)] == [
        ("lbr", 0), ("cl", 0), ("lbr", 1), ("cl", 1), ("lbr+bottleneck.k=8@0", 0), ("cl+model.from_scratch=true@1", 1)]
    base = load_config("configs/demo.yaml", ["bottleneck.k_max=8"])
    cfg, match = cell_config(base, "lbr+bottleneck.k=8@0", 0, tmp_path)
    assert cfg.bottleneck.k == 8 and cfg.run.variant == "lbr" and not match
    cfg, match = cell_config(base, "cl-mc+model.from_scratch=true", 3, tmp_path)
    assert cfg.model.from_scratch and cfg.run.variant == "cl" and cfg.run.seed == 3 and match
    out = lbr("study", "--config", "configs/demo.yaml", "--target", "medical", "--variants", "lbr,cl+gr_cl.nope=1",
              "--seeds", "0", "--output", str(tmp_path / "s"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "cl+gr_cl.nope=1" in lines[0] and "nope" in lines[0], out.stderr
    assert not (tmp_path / "s").exists()


def test_bad_grids_are_reported_together(demo_dir):
    spec = StudySpec(target="medical", variants=("lbr", "lbr"), seeds=(), heldout=("medical", "nope"),
                     data_root=str(demo_dir))
    with pytest.raises(Exception) as err:
        check_spec(spec)
    for part in ("must not repeat", "--seeds is empty", "cannot also be a held-out", "no domain folder"):
        assert part in str(err.value), part


def constructed(n_queries: int, hits: int, seed: int) -> dict:
    """A run over n queries whose relevant passage d{i} is ranked first for the first `hits` queries, below 10
    distractors for the rest."""
    run = {}
    for i in range(n_queries):
        docs = {f"x{seed}_{j}": 1.0 - j / 100 for j in range(12)}
        docs[f"d{i}"] = 2.0 if i < hits else 0.5
        run[f"q{i}"] = docs
    return run


def test_significance_on_constructed_runs():
    from lbr_ray.eval.trec import paired_significance

    qrels = {f"q{i}": {f"d{i}": 1} for i in range(60)}
    big = paired_significance(qrels, [constructed(60, 55, 0)], [constructed(60, 10, 0)], ("lbr", "cl"))
    assert big["significant"] and big["p_value"] <= 0.05 and big["diff"] == pytest.approx(45 / 60)
    assert (big["wins"], big["ties"], big["losses"]) == (45, 15, 0)
    same = paired_significance(qrels, [constructed(60, 30, 0)], [constructed(60, 30, 1)], ("lbr", "cl"))
    assert not same["significant"] and same["p_value"] > 0.5 and same["diff"] == 0
    t = paired_significance(qrels, [constructed(60, 55, 0)], [constructed(60, 10, 0)], ("lbr", "cl"),
                            stat_test="student")
    assert t["significant"] and t["stat_test"] == "student"


def write_study(study, n: int, hits: dict) -> list[dict]:
    """A study folder with qrels and one cell per (variant, seed): `hits[(variant, seed)]` = the queries whose
    relevant passage is ranked first (an int h: the first h queries). Returns read_cells(study)."""
    from lbr_ray.eval.trec import _write
    from lbr_ray.tune.study import read_cells

    (study / "qrels").mkdir(parents=True)
    _write(study / "qrels" / "medical.trec", [f"q{i} 0 d{i} 1" for i in range(n)])
    for index, ((variant, seed), h) in enumerate(hits.items()):
        cell = study / "cells" / f"{index:05d}_variant={variant}_seed={seed}"
        (cell / "runs").mkdir(parents=True)
        run = constructed(n, h, seed) if isinstance(h, int) else {
            f"q{i}": {f"x{j}": 1.0 - j / 100 for j in range(12)} | {f"d{i}": 2.0 if i in h else 0.5} for i in range(n)}
        _write(cell / "runs" / "medical.trec", [f"{q} Q0 {d} {r + 1} {s} t" for q, docs in run.items()
                                                 for r, (d, s) in enumerate(sorted(docs.items(), key=lambda x: -x[1]))])
        h = h if isinstance(h, int) else len(h)
        (cell / "cell.json").write_text(json.dumps({"done": True, "variant": variant, "seed": seed,
                                                    "dev_recall@10": h / n, "test": {"medical": {
                                                        "recall@10": h / n, "hard_recall@10": h / n / 2}}}))
    return read_cells(study)


def test_table_and_seed_averaged_significance_from_cells(tmp_path):
    study, n = tmp_path, 40
    cells = write_study(study, n, {("lbr", 0): 36, ("lbr", 1): 34, ("cl", 0): 8, ("cl", 1): 12})
    spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=(0, 1), data_root=str(tmp_path))
    rows = {r["variant"]: r for r in summarize(cells, spec)}
    assert rows["lbr"]["medical"][0] == pytest.approx(35 / 40) and rows["lbr"]["medical"][1] == pytest.approx(
        (2 / 40) / 2 ** 0.5)  # sample std of 36/40 and 34/40
    sig = significance(cells, spec, study)
    assert len(sig) == 1 and sig[0]["treatment"] == "cl" and sig[0]["seeds"] == [0, 1]
    assert sig[0]["n_queries"] == n and sig[0]["n_seeds"] == 2 and sig[0]["significant"]
    assert sig[0]["diff"] == pytest.approx(35 / 40 - 10 / 40)
    # per query, seed-averaged: q0-7 both 1.0, q8-11 lbr 1.0 / cl 0.5, q12-33 1.0 / 0, q34-35 0.5 / 0, q36-39 0 / 0
    assert (sig[0]["wins"], sig[0]["ties"], sig[0]["losses"]) == (28, 12, 0)
    doc = {"finished": True, "cells_done": 4, "cells_total": 4, "model": "m", "steps": {"ib_gl": 1, "gr_cl": 1},
           "wall_s": 1.0, "bm25": {"medical": 0.5}, "baselines_hard": {"bm25": {"medical": 0.25}},
           "significance": sig, "table": table(list(rows.values()), spec)}
    md = markdown(doc, spec)
    assert "| lbr | 0,1 | 0.8750 ± 0.0354" in md and "| medical | cl | 0,1 | 40 | +0.6250 | 28/12/0" in md
    assert "averaged over the seeds both ran, then Fisher's randomization test" in md
    assert "Hard query types only" in md and "| lbr | 0.4375 ± 0.0177 |" in md
    assert "| BM25 (reference) | 0.2500 |" in md  # the references' hard-type R@10 below the variants'
    assert plot(list(rows.values()), {"bm25": {"medical": 0.5}}, spec, tmp_path / "s.png").stat().st_size > 5000


def test_one_seed_has_no_spread_to_show(tmp_path):
    """A variant with one finished seed has a value, not a standard deviation of 0 (which would claim no spread)."""
    cells = write_study(tmp_path, 40, {("lbr", 0): 36, ("lbr", 1): 34, ("cl", 0): 8})
    spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=(0, 1), data_root=str(tmp_path))
    rows = {r["variant"]: r for r in summarize(cells, spec)}
    assert rows["cl"]["medical"] == (pytest.approx(8 / 40), None) and rows["lbr"]["medical"][1] > 0
    doc = {"finished": False, "cells_done": 3, "cells_total": 4, "model": "m", "steps": {"ib_gl": 1, "gr_cl": 1},
           "wall_s": 1.0, "bm25": {}, "significance": [], "table": table(list(rows.values()), spec)}
    md = markdown(doc, spec)
    assert "| cl | 0 | 0.2000 | 0.2000 |" in md and "| lbr | 0,1 | 0.8750 ± 0.0354 |" in md
    assert plot(list(rows.values()), {}, spec, tmp_path / "s.png").stat().st_size > 5000


def test_the_plot_holds_a_long_legend_and_leaves_out_variants_without_a_seed(tmp_path):
    """The saved image grows to hold a long variant name beside the axes (not squeezing or clipping them), and a
    variant that has no finished seed takes no bar slot or legend entry: the image is as if it were not there."""
    from matplotlib.image import imread

    cells = write_study(tmp_path, 40, {("lbr", 0): 36, ("cl", 0): 8})
    spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=(0,), data_root=str(tmp_path))
    rows = summarize(cells, spec)
    long = [dict(r, variant=r["variant"] + "+data.pairs=runs/mined/medical-minilm.jsonl.gz") for r in rows]
    empty = dict(rows[0], variant="cl+gr_cl.hard_negatives=1" * 3, seeds=[])
    sizes = {name: imread(plot(r, {}, spec, tmp_path / f"{name}.png")).shape[:2]  # (height, width)
             for name, r in {"short": rows, "long": long, "with_empty": rows + [empty]}.items()}
    assert sizes["long"][1] > sizes["short"][1] + 100 and sizes["long"][0] == sizes["short"][0]
    assert sizes["with_empty"] == sizes["short"]


def test_the_report_names_a_local_model_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Cells get absolute paths (Ray workers run elsewhere); the committed report keeps the name a clone can use."""
    monkeypatch.chdir(tmp_path)
    assert as_named(str(tmp_path / "models" / "smollm2-135m")) == "models/smollm2-135m"
    assert as_named("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert as_named(str(tmp_path.parent / "elsewhere")) == str(tmp_path.parent / "elsewhere")


def test_copies_of_a_seed_add_no_significance(tmp_path):
    """Issue 21.1: runs stacked over seeds made every (seed, query) a sample, so the same two runs copied under 1,
    3 and 5 seeds grew "significant"; each query is one sample, its R@10 averaged over the seeds."""
    n, p_values = 60, []
    for seeds in (1, 3, 5):
        hits = {(v, s): h for s in range(seeds) for v, h in (("lbr", 26), ("cl", 20))}
        spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=tuple(range(seeds)), data_root="x")
        sig = significance(write_study(tmp_path / str(seeds), n, hits), spec, tmp_path / str(seeds))[0]
        assert sig["n_queries"] == n and sig["diff"] == pytest.approx(6 / 60)
        assert (sig["wins"], sig["ties"], sig["losses"]) == (6, 54, 0)
        p_values.append(sig["p_value"])
    assert p_values[0] == p_values[1] == p_values[2] > 0.01  # 6 of 60 queries: not significant at 0.01
    # lbr finds q0-q9 at seed 0 and q10-q19 at seed 1, cl the other way round: per query the same mean R@10
    hits = {("lbr", 0): set(range(10)), ("lbr", 1): set(range(10, 20)), ("cl", 0): set(range(10, 20)),
            ("cl", 1): set(range(10))}
    spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=(0, 1), data_root="x")
    sig = significance(write_study(tmp_path / "swap", n, hits), spec, tmp_path / "swap")[0]
    assert (sig["wins"], sig["ties"], sig["losses"], sig["p_value"]) == (0, n, 0, 1.0)


def test_rescore_recomputes_a_studys_significance(tmp_path):
    from lbr_ray.tune.study import rescore

    cells = write_study(tmp_path, 40, {("lbr", 0): 36, ("cl", 0): 8})
    spec = {"target": "medical", "variants": ["lbr", "cl"], "seeds": [0], "data_root": "x", "domains": ["medical"]}
    doc = {"spec": spec, "finished": True, "cells_done": 2, "cells_total": 2, "model": "m", "wall_s": 1.0,
           "steps": {"ib_gl": 1, "gr_cl": 1}, "bm25": {"medical": 0.5}, "cells": cells,
           "significance": [{"domain": "medical", "treatment": "cl", "seeds": [0, 0], "n_queries": 80, "diff": 0.7,
                             "wins": 1, "ties": 0, "losses": 0, "p_value": 0.5, "significant": False}],
           "table": table(summarize(cells, spec_from_dict(spec)), spec_from_dict(spec))}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    from typer.testing import CliRunner

    from cli.main import app
    from lbr_ray.errors import ConfigError

    out = CliRunner().invoke(app, ["study", "--output", str(tmp_path), "--rescore"])
    assert out.exit_code == 0, out.output
    new = json.loads((tmp_path / "results.json").read_text())
    assert new["significance"] == rescore(tmp_path)["significance"]
    assert new["significance"][0]["n_queries"] == 40 and new["significance"][0]["p_value"] < 1e-3
    assert "| medical | cl | 0 | 40 | +0.7000 | 28/12/0 |" in (tmp_path / "results.md").read_text()
    bad = CliRunner().invoke(app, ["study", "--output", str(tmp_path / "none"), "--rescore"])
    assert isinstance(bad.exception, ConfigError) and "holds no results.json to rescore" in str(bad.exception)


def test_a_committed_results_folder_rescores_in_a_clone_elsewhere(tmp_path):
    """results.json records the spec as committed (no machine's folders), and rescore reads the folder's own
    study.json, so a clone at another path rescores an older report whose spec named the first machine's paths."""
    import shutil
    from dataclasses import asdict

    from lbr_ray.config import load_config
    from lbr_ray.tune.results import save_spec
    from lbr_ray.tune.study import rescore, write_results

    results = tmp_path / "a" / "repo" / "results"
    write_study(results, 40, {("lbr", 0): 36, ("cl", 0): 8})
    spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=(0,), data_root=str(tmp_path / "a" / "data"),
                     baselines=(), results=str(results))
    save_spec(results, load_config("configs/demo.yaml"), asdict(spec))
    doc = write_results(load_config("configs/demo.yaml"), spec, results)
    assert doc["spec"]["results"] == "" and doc["spec"]["data_root"] == "../../data"
    assert str(tmp_path) not in (results / "results.json").read_text()
    old = json.loads((results / "results.json").read_text())
    old["spec"], old["significance"] = asdict(spec), []  # as an older lbr wrote it: this machine's paths
    (results / "results.json").write_text(json.dumps(old))
    clone = tmp_path / "b" / "repo" / "results"
    shutil.copytree(results, clone)
    shutil.rmtree(tmp_path / "a")
    new = rescore(clone)
    assert new["spec"] == doc["spec"] and new["significance"] == doc["significance"]
    assert new["significance"][0]["treatment"] == "cl" and new["significance"][0]["p_value"] < 1e-3
    assert str(tmp_path) not in (clone / "results.json").read_text()
    before = (clone / "results.json").read_text()
    (clone / "study.json").unlink()  # results.json alone: rescored with its spec kept as recorded
    rescore(clone)
    assert (clone / "results.json").read_text() == before and '"relative_paths"' in before


def test_trec_files_round_trip_and_read_with_ranx(tmp_path):
    import numpy as np
    from ranx import Qrels, Run

    from lbr_ray.eval.sets import EvalSet
    from lbr_ray.eval.trec import query_id, read_qrels, read_run, write_qrels, write_run

    eset = EvalSet("d", ["what is a?", "what is b?"], ["qa"] * 2, ["hard"] * 2, [np.array([0]), np.array([1, 2])],
                   ["doc a", "pos:1", "c"], ["A", "B", "C"])
    write_qrels(eset, tmp_path / "q.trec")
    write_run(eset, np.array([[1, 0, -1], [2, 1, 0]]), np.array([[0.9, 0.5, 0.0], [0.8, 0.7, 0.1]]),
              tmp_path / "r.trec", "my run")
    qa, qb = query_id("what is a?"), query_id("what is b?")
    assert read_qrels(tmp_path / "q.trec") == {qa: {"doc_a": 1}, qb: {"pos:1": 1, "c": 1}}  # whitespace replaced
    assert read_run(tmp_path / "r.trec") == {qa: {"pos:1": 0.9, "doc_a": 0.5}, qb: {"c": 0.8, "pos:1": 0.7,
                                                                                "doc_a": 0.1}}  # -1 slot skipped
    assert len(Run.from_file(str(tmp_path / "r.trec"), kind="trec")) == 2
    assert len(Qrels.from_file(str(tmp_path / "q.trec"), kind="trec")) == 2


def test_a_run_read_back_scores_what_the_evaluator_scored(tmp_path):
    """Issue 21.8: TREC doc ids were the corpus ids as they are, and the demo medical corpus gives one id to
    different passages, so a run read back lost ranked entries and ranx scored it differently from the evaluator.
    BM25 on the whole medical test set, written and read back, scored by ranx: the evaluator's figures exactly."""
    from ranx import Qrels, Run, evaluate

    from lbr_ray.eval.baselines import BM25Retriever
    from lbr_ray.eval.evaluator import EvalOptions, RetrievalEvaluator
    from lbr_ray.eval.metrics import DEFAULT_METRICS, per_query_metrics
    from lbr_ray.eval.trec import read_qrels, read_run, write_qrels, write_run

    ev = RetrievalEvaluator(EvalOptions(domains=("medical",), data_root="data/demo", num_workers=0),
                            keep_ranking=True, log=lambda msg: None)
    res = ev.evaluate(BM25Retriever(), "bm25")["domains"]["medical"]
    eset = ev.eval_set("medical")
    assert len(set(eset.doc_ids)) == len(eset.doc_ids)  # one id per passage
    write_run(eset, res["top"], res["scores"], tmp_path / "run.trec", "bm25")
    write_qrels(eset, tmp_path / "qrels.trec")
    run = read_run(tmp_path / "run.trec")
    assert sum(map(len, run.values())) == int((res["top"] >= 0).sum())  # no ranked entry lost
    metrics = (*DEFAULT_METRICS, "mrr@100", "ndcg@100")  # deep metrics see every lost entry
    scores = evaluate(Qrels(read_qrels(tmp_path / "qrels.trec")), Run(run), list(metrics))
    mine = {m: float(v.mean()) for m, v in per_query_metrics(res["top"], eset.qrels, metrics).items()}
    assert {m: mine[m] for m in DEFAULT_METRICS} == {m: res["rows"][0][m] for m in DEFAULT_METRICS}
    assert scores == pytest.approx(mine, abs=1e-9)


@pytest.mark.parametrize("pairs", ["data/demo/medical", "data/demo/medical/pairs.jsonl.gz"])
def test_default_data_root_is_the_folder_above_the_domain(pairs, tmp_path):
    """data.pairs may name a domain folder (as configs/smollm2-135m-medical.yaml does) or a file in one: either
    way the study's held-out domains are looked up beside the target's folder."""
    from pathlib import Path

    from cli.study import study_inputs

    _, spec, _ = study_inputs(Path("configs/demo.yaml"), "medical", "lbr", "0", "biology", None, tmp_path / "s",
                              False, [f"data.pairs={pairs}"])
    assert spec.data_root == str(Path("data/demo").resolve())


def test_a_cells_evaluation_uses_the_cpus_its_training_freed():
    """Ray starts a cell's driver with one torch thread; its in-process test encoding runs on the Train workers'
    CPUs once they have ended, and the driver's setting comes back after."""
    import torch

    from lbr_ray.config import load_config
    from lbr_ray.tune.study import eval_threads

    cfg = load_config("configs/demo.yaml", ["scaling.num_workers=2", "scaling.cpus_per_worker=1"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with eval_threads(cfg) as threads:
            assert threads == torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
