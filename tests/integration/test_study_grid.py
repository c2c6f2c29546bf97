"""`lbr study` on real Ray Tune + Ray Train + DeepSpeed: a tiny grid (variants cl, lbr x seed 0, medical target,
biology held out, results copied to a results folder), interrupted after its first cell, resumed with the CLI on a
"fresh clone" (the study folder gone, only the results folder left), then the first study folder resumed too
(Tuner.restore). Checks that a finished cell is never rerun, per-query TREC runs, the table, paired significance,
the BM25 reference and the plot."""
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
    from typer.testing import CliRunner

    from cli.main import app
    from cli.study import study_inputs
    from lbr_ray.eval.trec import read_run
    from lbr_ray.tune.study import run_study

    study, results = tmp_path / "study", tmp_path / "repo" / "results" / "study_x"
    cfg, spec, folder = study_inputs(Path("configs/demo.yaml"), "medical", "cl,lbr", "0", "biology", None, study,
                                     False, SMALL + STEPS, results=results, test_max_queries=30,
                                     test_max_corpus=200, eval_workers=0, stat_test="fisher", max_p=0.05)
    partial = run_study(cfg, spec, folder, callbacks=[InterruptAfter(1, str(tmp_path / "interrupted"))])
    assert (tmp_path / "interrupted").exists() and partial["finished"] is False and partial["cells_done"] == 1
    assert [(c["variant"], c["cell"]) for c in partial["cells"]] == [("cl", "cl_seed0")]  # the committed copy
    console = capfd.readouterr().out  # the quiet console: one line per cell as it starts and as it ends
    assert "[lbr] study: cell 1 of 2 (cl seed 0) started" in console
    assert "[lbr] study: cell 1 of 2 (cl seed 0) done in" in console and "test_medical_recall@10 0." in console

    assert (results / "cells" / "cl_seed0" / "runs" / "medical.trec.gz").is_file()  # copied as the cell ended
    assert (results / "baselines" / "bm25" / "biology.trec.gz").is_file() and (results / "study.json").is_file()

    # a fresh clone: no study folder, only the committed results; --resume runs the lbr cell alone
    elsewhere = tmp_path / "study-on-another-machine"
    study.rename(elsewhere)
    clone = tmp_path / "clone"
    out = CliRunner().invoke(app, ["study", "--output", str(clone), "--results", str(results), "--resume"])
    assert out.exit_code == 0, out.output[-3000:]
    cells = [p.name for p in (clone / "cells").iterdir()]
    assert len(cells) == 1 and "variant=lbr" in cells[0], cells  # cl was not retrained
    assert "[lbr] study: 1 of 2 cells are done in" in out.output
    assert "View detailed results" not in out.output and "TensorBoard" not in out.output  # Tune's chatter
    assert len((clone / "stage1" / "runs.jsonl").read_text().splitlines()) == 1  # lbr's stage 1, trained once
    lbr_json = (results / "cells" / "lbr_seed0" / "cell.json").read_bytes()

    # the first machine's study resumed (Tuner.restore): lbr is committed by now, so nothing trains again
    elsewhere.rename(study)
    out = CliRunner().invoke(app, ["study", "--output", str(study), "--resume"])
    assert out.exit_code == 0, out.output[-3000:]
    assert "Configuration for experiment" not in out.output  # Tuner.restore's run is quiet too
    assert (results / "cells" / "lbr_seed0" / "cell.json").read_bytes() == lbr_json
    assert not any((study / "cells").glob("*variant=lbr*/gr_cl/model"))
    assert json.loads((study / "results.json").read_text())["table"] == json.loads(
        (clone / "results.json").read_text())["table"]
    study = clone

    doc = json.loads((study / "results.json").read_text())
    assert doc["finished"] and doc["cells_done"] == 2
    table = {r["variant"]: r for r in doc["table"]}
    for variant in ("cl", "lbr"):
        for domain in ("medical", "biology", "dev"):
            assert 0 <= table[variant][domain]["mean"] <= 1 and table[variant][domain]["std"] is None  # one seed
    sig = {(s["domain"], s["treatment"]): s for s in doc["significance"]}
    assert set(sig) == {(d, t) for d in ("medical", "biology") for t in ("cl", "bm25")}
    assert sig[("medical", "cl")]["n_queries"] == 30 and sig[("medical", "bm25")]["baseline"]
    assert all(s["control"] == "lbr" and 0 <= s["p_value"] <= 1 for s in sig.values())
    for cell in ("cl_seed0", "lbr_seed0"):  # per-query results a later comparison can read
        for domain in ("medical", "biology"):
            run = read_run(results / "cells" / cell / "runs" / f"{domain}.trec.gz")
            assert len(run) == (30 if domain == "medical" else len(run)) and len(run) > 0
    assert (study / "qrels" / "medical.trec").is_file()
    assert (results / "baselines" / "bm25" / "biology.trec.gz").is_file()
    assert 0 < doc["bm25"]["medical"] <= 1
    md = (study / "results.md").read_text()
    assert "| lbr | 0 |" in md and "| cl | 0 |" in md and "BM25 (reference)" in md and "p |" in md
    assert (study / "study.png").stat().st_size > 5000 and (study / "results.csv").is_file()
