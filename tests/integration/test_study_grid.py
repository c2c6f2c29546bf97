"""`lbr study` on real Ray Tune + Ray Train + DeepSpeed: a tiny grid (variants cl, lbr x seed 0, medical target,
biology held out), interrupted after its first cell and resumed with the CLI. Checks that the finished cell is not
rerun, per-query TREC runs, the table, paired significance, BM25 reference and the plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tune import SMALL, InterruptAfter

pytestmark = pytest.mark.integration
STEPS = ["tune.ib_gl_steps=2", "tune.gr_cl_steps=2", "tune.eval_every=2", "gr_cl.eval_queries=40",
         "gr_cl.eval_corpus=150"]


@pytest.mark.slow
def test_study_grid_resumes_without_rerunning_finished_cells(ray_local, tmp_path, capfd):
    from ranx import Run
    from typer.testing import CliRunner

    from cli.main import app
    from cli.study import study_inputs
    from lbr_ray.tune.study import run_study

    study = tmp_path / "study"
    cfg, spec, folder = study_inputs(Path("configs/demo.yaml"), "medical", "cl,lbr", "0", "biology", None, study,
                                     False, SMALL + STEPS, test_max_queries=30, test_max_corpus=200, eval_workers=0,
                                     stat_test="fisher", max_p=0.05)
    partial = run_study(cfg, spec, folder, callbacks=[InterruptAfter(1, str(tmp_path / "interrupted"))])
    assert (tmp_path / "interrupted").exists() and partial["finished"] is False and partial["cells_done"] == 1
    first = [c["cell"] for c in partial["cells"]]
    assert len(first) == 1 and "variant=cl" in first[0]
    console = capfd.readouterr().out  # the quiet console: one line per cell as it starts and as it ends
    assert "[lbr] study: cell 1 of 2 (cl seed 0) started" in console
    assert "[lbr] study: cell 1 of 2 (cl seed 0) done in" in console and "test_medical_recall@10 0." in console

    out = CliRunner().invoke(app, ["study", "--output", str(study), "--resume"])
    assert out.exit_code == 0, out.output[-3000:]

    cells = sorted(p.name for p in (study / "cells").iterdir())
    attempts = {c: len((study / "cells" / c / "attempts.jsonl").read_text().splitlines()) for c in cells}
    assert len(cells) == 2 and attempts[first[0]] == 1, attempts  # the finished cell was not rerun
    assert len((study / "stage1" / "runs.jsonl").read_text().splitlines()) == 1  # lbr's stage 1, trained once

    doc = json.loads((study / "results.json").read_text())
    assert doc["finished"] and doc["cells_done"] == 2
    table = {r["variant"]: r for r in doc["table"]}
    for variant in ("cl", "lbr"):
        for domain in ("medical", "biology", "dev"):
            assert 0 <= table[variant][domain]["mean"] <= 1 and table[variant][domain]["std"] == 0  # one seed
    sig = {s["domain"]: s for s in doc["significance"]}
    assert set(sig) == {"medical", "biology"} and sig["medical"]["n_queries"] == 30
    assert all(s["control"] == "lbr" and s["treatment"] == "cl" and 0 <= s["p_value"] <= 1 for s in sig.values())
    for cell in cells:  # per-query results a later comparison can read
        for domain in ("medical", "biology"):
            run = Run.from_file(str(study / "cells" / cell / "runs" / f"{domain}.trec"), kind="trec")
            assert len(run) == (30 if domain == "medical" else len(run)) and len(run) > 0
    assert (study / "qrels" / "medical.trec").is_file() and (study / "bm25" / "biology.trec").is_file()
    assert 0 < doc["bm25"]["medical"] <= 1
    md = (study / "results.md").read_text()
    assert "| lbr | 0 |" in md and "| cl | 0 |" in md and "BM25 (reference)" in md and "p |" in md
    assert (study / "study.png").stat().st_size > 5000 and (study / "results.csv").is_file()
