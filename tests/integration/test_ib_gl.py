"""Stage 1 on real Ray Train + DeepSpeed ZeRO-2 with 2 CPU workers: loss falls, the checkpoint is a HF model,
and a killed run resumes from its last checkpoint at the saved step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbr_ray.config import load_config
from lbr_ray.train.deepspeed import lr_lambda

pytestmark = pytest.mark.integration
SMALL = ["data.max_input_tokens=48", "data.max_target_tokens=48", "ib_gl.batch_size=8", "ib_gl.warmup_steps=5"]


def _saved_steps(stage_dir: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in stage_dir.glob("checkpoint_*/state.json"))


def _latest_saved_step(stage_dir: Path) -> int:
    return max(_saved_steps(stage_dir), default=0)


def test_two_worker_zero2_run_resumes_at_the_saved_step_and_loss_falls(ray_local, tmp_path):
    """One run, stopped with Ctrl-C after its second checkpoint, then resumed with --resume semantics."""
    from transformers import AutoModelForCausalLM

    from lbr_ray.recipes.pipeline import train

    overrides = SMALL + ["ib_gl.max_steps=24", "ib_gl.log_every=1", "ib_gl.checkpoint_every=6",
                         "deepspeed.zero_stage=2", "scaling.num_workers=2"]
    cmd = [sys.executable, "-m", "cli.main", "train", "--stage", "ib-gl", "--config", "configs/demo.yaml",
           "--output", str(tmp_path), "--num-workers", "2"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stage_dir = tmp_path / "ib_gl"
    deadline = time.time() + 400
    while _latest_saved_step(stage_dir) < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the driver stops and takes its embedded Ray down
    proc.wait(timeout=120)
    on_disk = _saved_steps(stage_dir)
    saved = max(on_disk)
    assert 12 <= saved < 24, "the run should be interrupted between checkpoints"

    cfg = load_config("configs/demo.yaml", overrides + [f"run.output={tmp_path}", "run.resume=true"])
    res = train(cfg, stage="ib-gl")["ib_gl"]
    restart = max(i for i, m in enumerate(res.metrics) if "resumed_at_step" in m)
    # Ray hands back its latest *registered* checkpoint: the newest one on disk, or the one before it when the
    # interrupt came while the newest was still being registered
    resumed = res.metrics[restart]["resumed_at_step"]
    assert resumed > 0 and resumed in on_disk and resumed >= saved - 6
    saved = resumed
    after = [m for m in res.metrics[restart:] if "loss" in m]
    assert after[0]["step"] == saved + 1  # continues at the saved step, not from 0
    assert [m["step"] for m in after] == list(range(saved + 1, 25))
    # the LR schedule continued too (DeepSpeed restored the scheduler with the optimizer)
    expect_lr = cfg.ib_gl.lr * lr_lambda(saved + 1, cfg.ib_gl.warmup_steps, cfg.ib_gl.max_steps)
    assert after[0]["lr"] == pytest.approx(expect_lr, rel=1e-6)

    # across both parts the IB-GL loss falls, and the result is a Hugging Face model with the bottleneck rows
    first = next(m for m in res.metrics if m.get("step") == 1 and "loss" in m)
    assert after[-1]["loss"] < first["loss"] - 0.5, (first["loss"], after[-1]["loss"])
    assert after[-1]["tokens_per_s"] > 0 and after[-1]["input_loss"] == 0
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    card = json.loads((res.model_dir / "lbr_ray.json").read_text())
    assert model.get_input_embeddings().weight.shape[0] == max(card["bottleneck_ids"]) + 1
    assert (res.stage_dir / "tensorboard").is_dir() and (res.stage_dir / "config.yaml").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"]["bad_records"] == 0 and summary["data"]["pairs_by_split"]["train"] > 2000


def test_existing_run_needs_resume(tmp_path):
    from lbr_ray.errors import ConfigError
    from lbr_ray.recipes.pipeline import train

    (tmp_path / "ib_gl" / "checkpoint_x").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--resume"):
        train(load_config("configs/demo.yaml", [f"run.output={tmp_path}"]), stage="ib-gl")
