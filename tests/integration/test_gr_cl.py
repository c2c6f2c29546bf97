"""Stage 2 and the two-stage pipeline on real Ray Train + DeepSpeed (2 CPU workers), export, variants."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lbr_ray.config import load_config

pytestmark = pytest.mark.integration
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


@pytest.mark.parametrize("variant", ["gl-cl", "cl"])
def test_variants_run(ray_local, tmp_path, variant):
    from lbr_ray.recipes.pipeline import train

    cfg = load_config("configs/demo.yaml", SMALL + ["ib_gl.max_steps=4", "gr_cl.max_steps=4", "gr_cl.log_every=2",
                                                    "gr_cl.eval_every=0", f"run.output={tmp_path}",
                                                    f"run.variant={variant}", "gr_cl.gen_weight=0.1"])
    results = train(cfg, stage="all")
    assert set(results) == ({"gr_cl"} if variant == "cl" else {"ib_gl", "gr_cl"})
    if variant == "gl-cl":  # stage 1 was a plain LM: no target tokens, loss on the input
        assert results["ib_gl"].last["target_loss"] == 0 and results["ib_gl"].last["input_loss"] > 0
    assert results["gr_cl"].last["step"] == 4
    assert results["gr_cl"].last["gen_loss"] > 0  # gen_weight > 0: the IB loss on query -> positive is trained too


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
