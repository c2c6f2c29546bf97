"""`lbr study` without Ray: bad grids stop with one line, the significance test on constructed runs, the table
(mean +- std over seeds), seed-stacked paired significance and the plot from constructed cells."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lbr_ray.tune.study import (
    StudySpec, cell_config, check_spec, grid_cells, markdown, parse_variant, plot, significance, summarize, table,
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
    big = paired_significance(qrels, constructed(60, 55, 0), constructed(60, 10, 0), ("lbr", "cl"))
    assert big["significant"] and big["p_value"] <= 0.05 and big["diff"] == pytest.approx(45 / 60)
    assert (big["wins"], big["ties"], big["losses"]) == (45, 15, 0)
    same = paired_significance(qrels, constructed(60, 30, 0), constructed(60, 30, 1), ("lbr", "cl"))
    assert not same["significant"] and same["p_value"] > 0.5 and same["diff"] == 0
    t = paired_significance(qrels, constructed(60, 55, 0), constructed(60, 10, 0), ("lbr", "cl"),
                            stat_test="student")
    assert t["significant"] and t["stat_test"] == "student"


def test_table_and_seed_stacked_significance_from_cells(tmp_path):
    from lbr_ray.eval.trec import _write

    study, n = tmp_path, 40
    (study / "qrels").mkdir()
    _write(study / "qrels" / "medical.trec", [f"q{i} 0 d{i} 1" for i in range(n)])
    hits = {("lbr", 0): 36, ("lbr", 1): 34, ("cl", 0): 8, ("cl", 1): 12}
    for index, ((variant, seed), h) in enumerate(hits.items()):
        cell = study / "cells" / f"{index:05d}_variant={variant}_seed={seed}"
        (cell / "runs").mkdir(parents=True)
        run = constructed(n, h, seed)
        _write(cell / "runs" / "medical.trec", [f"{q} Q0 {d} {r + 1} {s} t" for q, docs in run.items()
                                                 for r, (d, s) in enumerate(sorted(docs.items(), key=lambda x: -x[1]))])
        (cell / "cell.json").write_text(json.dumps({"done": True, "variant": variant, "seed": seed,
                                                    "dev_recall@10": h / n, "test": {"medical": {
                                                        "recall@10": h / n, "hard_recall@10": h / n / 2}}}))
    from lbr_ray.tune.study import read_cells

    spec = StudySpec(target="medical", variants=("lbr", "cl"), seeds=(0, 1), data_root=str(tmp_path))
    cells = read_cells(study)
    rows = {r["variant"]: r for r in summarize(cells, spec)}
    assert rows["lbr"]["medical"][0] == pytest.approx(35 / 40) and rows["lbr"]["medical"][1] == pytest.approx(
        (2 / 40) / 2 ** 0.5)  # sample std of 36/40 and 34/40
    sig = significance(cells, spec, study)
    assert len(sig) == 1 and sig[0]["treatment"] == "cl" and sig[0]["seeds"] == [0, 1]
    assert sig[0]["n_queries"] == 2 * n and sig[0]["significant"]  # paired over (seed, query)
    assert sig[0]["diff"] == pytest.approx(35 / 40 - 10 / 40)
    doc = {"finished": True, "cells_done": 4, "cells_total": 4, "model": "m", "steps": {"ib_gl": 1, "gr_cl": 1},
           "wall_s": 1.0, "bm25": {"medical": 0.5}, "significance": sig,
           "table": table(list(rows.values()), spec)}
    md = markdown(doc, spec)
    assert "| lbr | 0,1 | 0.8750 ± 0.0354" in md and "| medical | cl | 0,1 | 80 | +0.6250" in md
    assert "Hard query types only" in md and "| lbr | 0.4375 ± 0.0177 |" in md
    assert plot(list(rows.values()), {"medical": 0.5}, spec, tmp_path / "s.png").stat().st_size > 5000


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
