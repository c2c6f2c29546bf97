"""One short `lbr train --stage ib-gl` run with packed rows (2 workers, ZeRO-2) checks, together: the quiet console
(lbr's lines only, Ray's chatter in the run's log files), the packed self-check, the placement-group cleaner
(no failed State API queries), the step telemetry (padding share, TFLOP/s, MFU, start-up milestones); and the
cleaner removes the group of a controller that died."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_packed_quiet_run(tmp_path):
    overrides = ["data.max_input_tokens=48", "data.max_target_tokens=48", "ib_gl.batch_size=4", "ib_gl.max_steps=6",
                 "ib_gl.log_every=2", "ib_gl.checkpoint_every=100", "ib_gl.pack=true", "run.tensorboard=false"]
    cmd = [sys.executable, "-m", "cli.main", "train", "--stage", "ib-gl", "--config", "configs/demo.yaml",
           "--output", str(tmp_path), "--num-workers", "2"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    lines = console.splitlines()
    ansi = re.search(r"\x1b\[", console)  # no ANSI colour codes
    assert not ansi, console[max(0, ansi.start() - 500):ansi.start() + 500]
    assert "Failed to query Ray Train Controller" not in console and "Reporting training result" not in console
    assert not [line for line in lines if line.startswith("(")], "Ray's (Actor pid=...) lines reach the console"
    assert any("mask self-check passed (dense, packed rows)" in line for line in lines)
    assert any(line.startswith("[lbr] ib_gl step 6/6") for line in lines)
    assert (tmp_path / "ib_gl" / "logs" / "rank0.log").stat().st_size > 0  # the workers' own output
    assert (tmp_path / "logs" / "driver.log").exists()
    ray_logs = tmp_path / "logs" / "ray"
    assert ray_logs.is_dir()
    leaks = [p.name for p in ray_logs.rglob("*") if p.is_file() and b"Failed to query Ray Train Controller"
             in p.read_bytes()]
    assert not leaks, f"the placement-group cleaner still fails: {leaks}"

    rows = [json.loads(line) for line in (tmp_path / "ib_gl" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(0 <= r["pad_frac"] < 0.5 and r["tflops"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    first = rows[0]
    for mark in ("worker_start", "model", "self_check", "deepspeed", "first_batch"):
        assert 0 < first[f"startup_{mark}_s"] <= first["first_step_s"], mark
    summary = json.loads((tmp_path / "summary.json").read_text())
    driver = summary["startup_driver_s"]  # small local data: summarised by the preflight's read, no Ray Data pass
    assert driver["preflight"] < driver["ray"] and "data_summary" not in driver
    assert summary["data"]["pairs_by_split"]["train"] > 0 and summary["data"]["corpus"] > 0
    threads = max(1, (os.cpu_count() or 1) // 2)  # the embedded Ray's cores split between the 2 workers
    assert "rank 0 of 2 on node" in (rank0 := (tmp_path / "ib_gl" / "logs" / "rank0.log").read_text())
    assert f", {threads} torch threads" in rank0


def test_cleaner_removes_the_group_of_a_dead_controller(ray_local):
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from lbr_ray.train.pg_cleaner import GcsPlacementGroupCleaner, gcs_actor_alive

    @ray.remote(num_cpus=0)
    class Controller:
        def ping(self):
            return True

    controller = Controller.remote()
    ray.get(controller.ping.remote())
    controller_id = controller._actor_id.hex()
    assert gcs_actor_alive(controller_id)
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready())
    cleaner = ray.remote(num_cpus=0)(GcsPlacementGroupCleaner).options(lifetime="detached").remote(
        controller_actor_id=controller_id, check_interval_s=0.2, get_actor_timeout_s=1, stop_timeout=2)
    ray.get(cleaner.register_placement_group.remote(pg))
    ray.get(cleaner.start_monitoring.remote())
    time.sleep(1.0)
    assert placement_group_table(pg)["state"] == "CREATED"  # controller alive: the group stays
    ray.kill(controller)
    deadline = time.time() + 20
    while placement_group_table(pg)["state"] != "REMOVED" and time.time() < deadline:
        time.sleep(0.2)
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert not gcs_actor_alive(controller_id)
