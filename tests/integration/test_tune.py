"""`lbr tune` on real Ray Tune + Ray Train + DeepSpeed: one small 2 x 2 sweep (R x temperature), interrupted after
its third trial and resumed with the CLI. Checks stage-1 reuse, ASHA stopping, resume keeping finished trials, the
table, plots, best config and the best trial's test evaluation."""
from __future__ import annotations

import csv
import json
import os
import signal

import pytest
from ray import tune

from lbr_ray.config import load_config

pytestmark = pytest.mark.integration
SMALL = ["data.max_input_tokens=48", "data.max_target_tokens=48", "ib_gl.batch_size=8", "ib_gl.warmup_steps=1",
         "gr_cl.warmup_steps=2", "gr_cl.batch_size=16", "gr_cl.eval_queries=100", "gr_cl.eval_corpus=400",
         "gr_cl.log_every=4", "gr_cl.checkpoint_every=100",
         "run.self_check=false"]  # the mask self-check has its own tests (test_masks, test_packed_quiet_run); saves start-up here
# R=16 -> k <= 3, R=48 -> k = 1 on 48-token inputs. Temperature 1e20 freezes the model (its gradients vanish under
# AdamW's epsilon), so at step 4 it still has the step-0 dev R@10, which the same R's 0.05 trial has improved on.
# Trials run R-fastest: (16, .05), (48, .05), (16, 1e20), (48, 1e20). With reduction_factor 1000 the step-4 cutoff is
# the best earlier trial, so (16, 1e20) is stopped at step 4 whatever the R=48 trial did.
SWEEP = ["tune.ratio=[16,48]", "tune.temperature=[0.05,1.0e+20]", "tune.ib_gl_steps=3", "tune.gr_cl_steps=8",
         "tune.eval_every=4", "tune.grace_period=4", "tune.reduction_factor=1000", "tune.test_max_queries=60",
         "tune.test_max_corpus=300", "tune.eval_workers=0"]


class InterruptAfter(tune.Callback):
    """Sends the sweep SIGUSR1 (Tune's graceful stop, like Ctrl-C) when the n-th trial ends; once per sweep."""

    def __init__(self, n: int, flag: str):
        self.n, self.flag, self.ended = n, flag, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        if self.ended == self.n and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_sweep_reuses_stage1_stops_early_resumes_and_reports(ray_local, tmp_path, capfd):
    from typer.testing import CliRunner

    from cli.main import app
    from lbr_ray.tune.search import run_sweep

    sweep = tmp_path / "sweep"
    cfg = load_config("configs/demo.yaml", SMALL + SWEEP + [f"tune.output={sweep}"])
    run_sweep(cfg, callbacks=[InterruptAfter(3, str(tmp_path / "interrupted"))])
    trials = sorted(p.name for p in (sweep / "trials").iterdir())
    assert len(trials) >= 3 and (tmp_path / "interrupted").exists()
    done_before = trials[:3]  # one trial at a time, in order: the three that ended before the interrupt
    partial = json.loads((sweep / "results.json").read_text())
    assert partial["finished"] is False and partial["best"] is None  # no best config / test eval yet
    assert "interrupted" in (sweep / "results.md").read_text()
    console = capfd.readouterr().out  # the quiet console: a line per trial as it starts and ends, with its metric
    assert console.count("[lbr] tune: trial ") >= 6 and " done in " in console and "dev_recall@10 0." in console
    assert "Configuration for experiment" not in console and "View detailed results" not in console  # Tune's own

    out = CliRunner().invoke(app, ["tune", "--output", str(sweep), "--resume"])
    assert out.exit_code == 0, out.output[-3000:]

    # resume kept the three finished trials (each ran once) and ran the fourth
    attempts = {t: len((sweep / "trials" / t / "attempts.jsonl").read_text().splitlines())
                for t in sorted(p.name for p in (sweep / "trials").iterdir())}
    assert len(attempts) == 4 and all(attempts[t] == 1 for t in done_before), attempts
    sessions = [json.loads(line) for line in (sweep / "sessions.jsonl").read_text().splitlines()]
    assert [s["resume"] for s in sessions] == [False, True]

    # stage 1 trained once per R (2 cache entries, 2 training runs), reused by the other two trials
    entries = [p for p in (sweep / "stage1").iterdir() if p.is_dir()]
    assert len(entries) == 2 and all((p / "DONE.json").is_file() for p in entries)
    assert len((sweep / "stage1" / "runs.jsonl").read_text().splitlines()) == 2

    doc = json.loads((sweep / "results.json").read_text())
    rows = {(r["R"], r["temperature"]): r for r in doc["trials"]}
    assert set(rows) == {(16.0, 0.05), (48.0, 0.05), (16.0, 1e20), (48.0, 1e20)}
    assert [rows[(r, t)]["stage1"] for r in (16.0, 48.0) for t in (0.05, 1e20)] == \
        ["trained", "reused", "trained", "reused"]
    assert doc["reuse"]["stage1_reused"] == 2 and doc["reuse"]["saved_s"] > 0

    # ASHA: the frozen R=16 trial stopped at the step-4 rung; stopped trials never reached step 8
    frozen, good = rows[(16.0, 1e20)], rows[(16.0, 0.05)]
    assert frozen["status"] == "stopped (ASHA)" and frozen["step"] == 4, frozen
    assert frozen["dev_recall@10"] < max(c[1] for c in doc["curves"][good["trial"]] if c[0] == 4)
    assert good["status"] == "completed" and good["step"] == 8 and good["model"]
    for r in doc["trials"]:
        assert (r["status"] == "completed") == (r["step"] == 8), r
        assert r["status"] in ("completed", "stopped (ASHA)"), r

    # outputs: table, plots, best config (loadable by `lbr train`), the best trial's test evaluation
    with open(sweep / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    md = (sweep / "results.md").read_text()
    assert md.count("| 0000") == 4 and "stopped (ASHA)" in md and "reused" in md
    for name in ("metric_vs_R.png", "metric_vs_temperature.png", "heatmap_R_temperature.png", "learning_curves.png"):
        assert (sweep / name).stat().st_size > 5000, name
    best = doc["best"]
    assert best["status"] == "completed" and best["test_recall@10"] >= 0 and best["test_queries"] > 0
    best_cfg = load_config(sweep / "best_config.yaml")
    assert best_cfg.gr_cl.temperature == best["temperature"] and best_cfg.bottleneck.ratio == best["R"]
    assert best_cfg.gr_cl.max_steps == cfg.gr_cl.max_steps  # full training steps, not the tuning ones
    assert (sweep / "best_test" / "report.json").is_file()


def test_failed_trial_is_retried_as_tune_max_failures_says(ray_local, tmp_path, monkeypatch):
    """tune.max_failures reaches the sweep's real Tuner (build_tuner: its FailureConfig, scheduler, callbacks):
    a trial whose first attempt fails runs again and ends well with tune.max_failures=1, and ends in error with 0.
    The trial body is a stand-in that counts its attempts (the retry is Tune's, not the training's)."""
    from pathlib import Path

    from lbr_ray.tune import search

    def fails_once(params: dict, base: dict, sweep: str, quiet: bool = True) -> None:
        attempts = Path(sweep) / f"{tune.get_context().get_trial_name()}.attempts"
        n = len(attempts.read_text()) if attempts.exists() else 0
        attempts.write_text("x" * (n + 1))
        if n == 0:
            raise RuntimeError("the first attempt fails")
        tune.report({"dev_recall@10": 0.5, "step": 1})

    monkeypatch.setattr(search, "train_trial", fails_once)
    for retries, errors, attempts in ((1, 0, 2), (0, 1, 1)):
        sweep = tmp_path / f"retries{retries}"
        cfg = load_config("configs/demo.yaml", ["tune.ratio=[16]", "tune.temperature=[0.05]", "tune.asha=false",
                                                f"tune.max_failures={retries}", f"tune.output={sweep}"])
        assert search.trial_failures(cfg) == retries
        grid = search.build_tuner(cfg, sweep).fit()
        counts = [len(p.read_text()) for p in sweep.glob("*.attempts")]
        assert (len(grid), grid.num_errors, counts) == (1, errors, [attempts])
