"""Stage 2 and the two-stage pipeline on real Ray Train + DeepSpeed (2 CPU workers), export, variants; the cl
variant through the CLI with its output on gs:// (gcp-storage-emulator)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lbr_ray.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.max_input_tokens=48", "data.max_target_tokens=48", "ib_gl.batch_size=8", "ib_gl.warmup_steps=3",
         "gr_cl.warmup_steps=3", "gr_cl.batch_size=16", "gr_cl.eval_queries=100", "gr_cl.eval_corpus=400",
         "bottleneck.k=2"]


@pytest.fixture(scope="module")
def lbr_run(demo_run):
    return demo_run


def test_two_stage_run_loss_falls_and_dev_recall_rises(lbr_run):
    out, results = lbr_run
    gr = results["gr_cl"]
    losses = [m["nce_loss"] for m in gr.metrics if "nce_loss" in m]
    assert losses[-1] < losses[0], losses
    dev = [m for m in gr.metrics if "dev_recall@10" in m]
    assert dev[0]["step"] == 0 and dev[-1]["step"] == 40
    assert dev[-1]["dev_recall@10"] > dev[0]["dev_recall@10"]
    assert all("emb_std" in m and "emb_mean_cos" in m for m in gr.metrics if "nce_loss" in m)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"ib_gl", "gr_cl"}
    ctx = summary["dev_vs_bm25"]  # the closing line's figures: the model next to BM25 on the same dev set
    assert ctx["dev_recall@10"] == dev[-1]["dev_recall@10"] and 0 < ctx["bm25_dev_recall@10"] <= 1
    assert 0 < ctx["dev_queries"] <= 100
    assert (out / "ib_gl" / "model" / "lbr_ray.json").is_file() and (out / "gr_cl" / "model" / "lbr_ray.json").is_file()


VARIANT_RUN = SMALL + ["ib_gl.max_steps=4", "gr_cl.max_steps=4", "gr_cl.log_every=2", "gr_cl.eval_every=0",
                      "gr_cl.gen_weight=0.1"]


def test_gl_cl_variant_trains_stage_1_as_a_plain_lm(ray_local, tmp_path):
    from lbr_ray.recipes.pipeline import train

    cfg = load_config("configs/demo.yaml", VARIANT_RUN + [f"run.output={tmp_path}", "run.variant=gl-cl"])
    results = train(cfg, stage="ib-gl")  # its stage 2 is lbr's (the demo run; gen_weight: the cl run below)
    # stage 1 was a plain LM: no target tokens, loss on the input
    assert results["ib_gl"].last["target_loss"] == 0 and results["ib_gl"].last["input_loss"] > 0
    assert results["ib_gl"].last["step"] == 4


def test_cl_variant_from_the_cli_to_gs(gcs_server, tmp_path):
    """`lbr train --variant cl --output gs://...` on the embedded Ray that the command starts: Ray Train's
    checkpoints (each with its manifest), the metrics and the final model land in the bucket. GR-CL runs with
    GradCache (gr_cl.cache_chunk; tests/unit/test_gradcache.py proves it equal to the plain step) and evaluates dev
    only at the end (no step-0 evaluation: gr_cl.eval_at_start=false, as `make demo-llm` does)."""
    from lbr_ray import storage

    gcs_server("lbr-runs")
    out = "gs://lbr-runs/cl"
    cmd = [sys.executable, "-m", "cli.main", "train", "--stage", "all", "--variant", "cl", "--config",
           "configs/demo.yaml", "--output", out, "--num-workers", "2"]
    for o in VARIANT_RUN + ["gr_cl.checkpoint_every=2", "gr_cl.cache_chunk=6", "gr_cl.eval_at_start=false"]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LBR_STAGING": str(tmp_path / "staging")})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    files = [f[len(out) + 1:] for f in storage.list_files(out)]
    assert not any(f.startswith("ib_gl/") for f in files)  # cl: GR-CL only
    checkpoints = {f.split("/")[1] for f in files if f.startswith("gr_cl/checkpoint_") and f.count("/") > 1}
    assert len(checkpoints) == 2 and all(f"gr_cl/{c}/manifest.json" in files for c in checkpoints), files
    assert {"gr_cl/model/lbr_ray.json", "gr_cl/model/config.json", "summary.json"} <= set(files), files
    with storage.open_binary(f"{out}/summary.json") as fh:
        assert json.loads(fh.read())["stages"]["gr_cl"]["model"] == f"{out}/gr_cl/model"
    assert f"; model: {out}/gr_cl/model (local copy: " in proc.stdout  # the user hears where the model is
    assert "GradCache, the 16 rows per worker of each text column encoded 6 at a time (3 chunks)" in proc.stdout
    with storage.open_binary(f"{out}/gr_cl/metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]
    last = [r for r in rows if "nce_loss" in r][-1]
    assert last["step"] == 4 and last["gen_loss"] > 0  # gen_weight > 0: the IB loss on query -> positive trains too
    assert {r["step"] for r in rows if "dev_recall@10" in r} == {4}  # no step-0 row
    assert re.search(r"\[lbr\] dev R@10: [0-9.]+ at step 4 \(", proc.stdout), proc.stdout[-2000:]


def test_collapse_monitor_flags_the_failure_signature():
    import torch

    from lbr_ray.config import load_config as load
    from lbr_ray.recipes.gr_cl import collapse_warning
    from lbr_ray.train.telemetry import embedding_stats

    cfg = load("configs/demo.yaml")
    healthy = embedding_stats(torch.nn.functional.normalize(torch.randn(64, 32), dim=-1))
    collapsed = embedding_stats(torch.nn.functional.normalize(torch.ones(64, 32) + 1e-4 * torch.randn(64, 32), dim=-1))
    assert abs(healthy["emb_mean_cos"]) < 0.1 and collapsed["emb_mean_cos"] > 0.99 and collapsed["emb_std"] < 1e-3
    assert not collapse_warning({**healthy, "step": 1}, cfg) and collapse_warning({**collapsed, "step": 1}, cfg)


def test_match_compute_gives_cl_the_two_stage_budget():
    from lbr_ray.recipes.pipeline import matched_steps

    cfg = load_config("configs/demo.yaml", ["run.variant=cl"])
    steps = matched_steps(cfg)
    assert steps > cfg.gr_cl.max_steps
    more = matched_steps(load_config("configs/demo.yaml", ["run.variant=cl", "ib_gl.max_steps=300"]))
    assert more - cfg.gr_cl.max_steps == pytest.approx(2 * (steps - cfg.gr_cl.max_steps), abs=1)
