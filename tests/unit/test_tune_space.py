"""`lbr tune` without Ray running: search space from the config and --set, trial configs, the stage-1 cache key,
the results table and plots from synthetic rows, CLI errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lbr_ray.config import load_config
from lbr_ray.errors import ConfigError
from lbr_ray.tune.space import (
    final_config, k_max_for, param_space, searched, stage1_key, trial_config, trial_label, tuning_config,
)


def test_demo_grid_is_the_papers_3x3_at_demo_scale():
    cfg = load_config("configs/demo.yaml")
    space = searched(cfg.tune)
    assert list(space) == ["bottleneck.ratio", "gr_cl.temperature"]  # R first: concurrent trials start different R
    assert len(space["bottleneck.ratio"]) == 3 and space["gr_cl.temperature"] == (0.01, 0.02, 0.05)
    ks = [k_max_for(trial_config(cfg, {"bottleneck.ratio": r}, "x")) for r in space["bottleneck.ratio"]]
    assert ks == sorted(ks, reverse=True) and ks[0] == cfg.bottleneck.k_max and ks[-1] == 1


def test_command_line_overrides_the_space_and_kinds():
    cfg = load_config("configs/demo.yaml", ["tune.temperature=[0.01,0.05]", "tune.ratio=[]", "tune.k=[1,2]",
                                            "tune.lr=[1.0e-4]"])
    assert searched(cfg.tune) == {"bottleneck.k": (1, 2), "gr_cl.temperature": (0.01, 0.05), "gr_cl.lr": (1e-4,)}
    assert param_space(cfg)["gr_cl.temperature"] == {"grid_search": [0.01, 0.05]}
    rnd = load_config("configs/demo.yaml", ["tune.search=random", "tune.log_uniform=true",
                                            "tune.temperature=[0.01,0.1]", "tune.ratio=[8,96]"])
    from ray.tune.search.sample import Categorical, Float

    space = param_space(rnd)
    assert isinstance(space["gr_cl.temperature"], Float) and space["gr_cl.temperature"].lower == 0.01
    assert not isinstance(space["bottleneck.ratio"], Categorical)
    choice = param_space(load_config("configs/demo.yaml", ["tune.search=optuna"]))
    assert isinstance(choice["gr_cl.temperature"], Categorical)


def test_bad_tune_values_all_reported():
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo.yaml", ["tune.search=bayes", "tune.k=[2]", "tune.temperature=[0,0.1]",
                                          "tune.metric=loss", "tune.lora_r=[8]", "tune.reduction_factor=1"])
    msg = str(info.value)
    for part in ("tune.search='bayes'", "tune.ratio and tune.k are alternatives", "tune.temperature values must be > 0",
                 "tune.metric='loss'", "tune.lora_r needs model.lora: true", "tune.reduction_factor must be > 1"):
        assert part in msg


def test_trial_config_applies_steps_workers_and_values():
    cfg = load_config("configs/demo.yaml", ["bottleneck.k=2", "tune.ib_gl_steps=7", "tune.gr_cl_steps=9",
                                            "tune.eval_every=3", "tune.workers_per_trial=1"])
    t = trial_config(cfg, {"bottleneck.ratio": 32.0, "gr_cl.temperature": 0.02}, "/tmp/trial")
    assert (t.ib_gl.max_steps, t.gr_cl.max_steps, t.gr_cl.eval_every, t.scaling.num_workers) == (7, 9, 3, 1)
    assert t.bottleneck.ratio == 32.0 and t.bottleneck.k is None  # a searched R replaces a fixed k
    assert t.gr_cl.temperature == 0.02 and t.run.output == "/tmp/trial"
    best = final_config(cfg, {"bottleneck.ratio": 32.0, "gr_cl.temperature": 0.02}, "/tmp/best")
    assert best.ib_gl.max_steps == cfg.ib_gl.max_steps and best.gr_cl.temperature == 0.02  # full training steps
    assert tuning_config(cfg).tune == cfg.tune
    assert trial_label({"bottleneck.ratio": 32.0, "gr_cl.temperature": 0.02}) == "R=32_temperature=0.02"


def test_stage1_key_ignores_stage2_settings_but_not_stage1_ones():
    cfg = load_config("configs/demo.yaml")
    key = lambda **p: stage1_key(trial_config(cfg, p, f"/tmp/{len(p)}"))  # noqa: E731
    base = key(**{"bottleneck.ratio": 8.0, "gr_cl.temperature": 0.01})
    assert base == key(**{"bottleneck.ratio": 8.0, "gr_cl.temperature": 0.05})
    assert base == key(**{"bottleneck.ratio": 8.0, "gr_cl.lr": 1e-3})
    assert base != key(**{"bottleneck.ratio": 32.0, "gr_cl.temperature": 0.01})
    assert base != key(**{"bottleneck.k": 2})
    lora = load_config("configs/demo.yaml", ["model.lora=true"])
    assert stage1_key(trial_config(lora, {"model.lora_r": 4}, "a")) != \
        stage1_key(trial_config(lora, {"model.lora_r": 8}, "a"))
    steps = [stage1_key(tuning_config(load_config("configs/demo.yaml", [f"tune.ib_gl_steps={n}"]))) for n in (5, 6)]
    assert steps[0] != steps[1]
    assert stage1_key(tuning_config(load_config("configs/demo.yaml", ["tune.gr_cl_steps=7"]))) == \
        stage1_key(tuning_config(load_config("configs/demo.yaml", ["tune.gr_cl_steps=9"])))
    assert len(base) == 16 and int(base, 16) >= 0


def test_table_plots_and_reuse_from_rows(tmp_path):
    from lbr_ray.tune.analysis import best_row, markdown, reuse_summary
    from lbr_ray.tune.plots import write_plots

    rows, curves = [], {}
    for i, (r, t) in enumerate([(8.0, 0.01), (32.0, 0.01), (8.0, 0.05), (32.0, 0.05)]):
        name = f"0000{i}_R={r:g}_temperature={t:g}"
        stopped = i == 3
        rows.append({"trial": name, "label": name[6:], "params": {}, "R": r, "k": None, "k_max": 4 if r == 8 else 3,
                     "temperature": t, "lora_r": None, "lr": 5e-4, "status": "stopped (ASHA)" if stopped else
                     "completed", "step": 4 if stopped else 8, "dev_recall@10": 0.1 * (i + 1), "dev_ndcg@10": 0.05,
                     "best_dev": 0.1 * (i + 1), "stage1": "reused" if i >= 2 else "trained", "stage1_key": str(r),
                     "stage1_s": 1.0 if i >= 2 else 30.0, "stage1_train_s": 30.0, "stage2_s": 20.0,
                     "trial_s": 21.0 if i >= 2 else 50.0, "model": "m", "error": None})
        curves[name] = [(0, 0.05), (4, 0.1 * (i + 1))] + ([] if stopped else [(8, 0.1 * (i + 1))])
    assert best_row(rows, "dev_recall@10")["trial"].startswith("00002")  # the stopped trial is not eligible
    reuse = reuse_summary(rows)
    assert reuse["saved_s"] == 60.0 and reuse["stage1_trained"] == 2
    assert reuse["saved_fraction"] == pytest.approx(60 / (142 + 60))
    doc = {"trials": rows, "metric": "dev_recall@10", "reuse": reuse, "best": None, "search": "grid",
           "space": {"bottleneck.ratio": [8, 32], "gr_cl.temperature": [0.01, 0.05]}, "wall_s": 150.0,
           "sessions": [{}], "asha": {"on": True, "grace_period": 4, "reduction_factor": 2},
           "steps": {"ib_gl": 4, "gr_cl": 8}}
    md = markdown(doc)
    assert "| 00003_R=32_temperature=0.05 | 32 | 3 | 0.05 | stopped (ASHA) | 4 |" in md and "saved 60 s" in md
    paths = write_plots(rows, curves, "dev_recall@10", tmp_path)
    assert {p.name for p in paths} == {"metric_vs_R.png", "metric_vs_temperature.png", "heatmap_R_temperature.png",
                                        "learning_curves.png"}
    assert all(p.stat().st_size > 5000 for p in paths)


def test_cli_resume_without_a_sweep_is_one_line(tmp_path):
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", code, "tune", "--resume", "--output", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "holds no sweep to resume" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-c", code, "tune", "--config", "configs/demo.yaml", "--set",
                          "tune.search=bayes", "--output", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "tune.search='bayes'" in out.stderr
