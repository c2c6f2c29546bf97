"""Real Ray jobs on a real local head (127.0.0.1, free ports), started once for the module and always stopped.

End to end as a user would: `lbr train ... --address http://127.0.0.1:<dashboard>` submits the training as a Ray
job, streams its logs, exits 0 and leaves a checkpoint in --output. Plus: a failing job exits 1 with its last log
lines, Ctrl-C stops the job, `lbr cluster status` sees the head, and the cluster files pass Ray's own config check.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lbr_ray.cluster import local_head
from lbr_ray.cluster.dashboard import auth_headers
from lbr_ray.cluster.jobs import run_job
from lbr_ray.cluster.launch import head_start_args, status

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"\bstep \d+|ib_gl:\s+\d+%\|[^|]*\|\s*[1-9]\d*/\d+")  # telemetry line or progress bar


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head of its own (own name, own state dir), so a developer's `lbr-local` head is never touched."""
    import ray.job_submission  # noqa: F401  (Ray's log handlers bind to stderr now, not to a test's capsys)

    tmp = tmp_path_factory.mktemp("cluster")
    saved = os.environ.get("LBR_CLUSTER_STATE_DIR")
    os.environ["LBR_CLUSTER_STATE_DIR"] = str(tmp / "state")
    cfg = yaml.safe_load((REPO / "clusters" / "local.yaml").read_text())
    cfg["cluster_name"] = f"lbr-test-{os.getpid()}"
    cfg_path = tmp / "local.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    try:
        state, started = local_head.start_head(cfg["cluster_name"], cfg_path, head_start_args(cfg))
        assert started
        yield state, cfg_path
    finally:
        local_head.stop_head(cfg["cluster_name"])
        if saved is None:
            os.environ.pop("LBR_CLUSTER_STATE_DIR", None)
        else:
            os.environ["LBR_CLUSTER_STATE_DIR"] = saved


def test_head_listens_on_loopback_only_and_status_sees_it(head, capsys):
    state, cfg_path = head
    assert state.dashboard.startswith("http://127.0.0.1:") and state.gcs_address.startswith("127.0.0.1:")
    assert status(cfg_path) == 0
    out = capsys.readouterr()
    assert "up, dashboard " + state.dashboard in out.err
    assert "CPU" in out.out


def test_job_succeeds_and_a_failing_job_returns_its_last_lines(head, capsys):
    state, _ = head
    ok = run_job(state.dashboard, "python -c \"import lbr_ray; print('hello from', lbr_ray.__name__)\"",
                 working_dir=REPO)
    out = capsys.readouterr()
    assert ok == 0, out.err
    assert "hello from lbr_ray" in out.out
    bad = run_job(state.dashboard, "python -c \"import sys; print('boom-marker'); sys.exit(3)\"")
    err = capsys.readouterr().err
    assert bad == 1
    assert "FAILED" in err and "exit code 3" in err
    assert "boom-marker" in err.split("--- last log lines ---")[1]


def test_ctrl_c_stops_the_job(head):
    state, _ = head
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from lbr_ray.cluster.jobs import run_job\n"
            f"sys.exit(run_job({state.dashboard!r}, 'sleep 300'))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    job_id = None
    for line in proc.stderr:
        m = re.search(r"submitted Ray job (\S+)", line)
        job_id = job_id or (m.group(1) if m else None)
        if "Running entrypoint" in line or "logs follow" in line:
            break
    assert job_id, "the job was not submitted"
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert rc == 130
    from lbr_ray.cluster.jobs import _client

    client = _client(state.dashboard, auth_headers())
    deadline = time.monotonic() + 30
    while str(client.get_job_status(job_id).value) not in {"STOPPED", "FAILED"} and time.monotonic() < deadline:
        time.sleep(1)
    assert client.get_job_status(job_id).value == "STOPPED"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_launcher_files_pass_rays_own_config_check(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((REPO / "clusters" / name).read_text())))


@pytest.mark.skipif(not (REPO / "cli" / "train.py").exists() or not (REPO / "configs" / "demo.yaml").exists(),
                    reason="needs `lbr train` and configs/demo.yaml")
def test_lbr_train_as_a_job_end_to_end(head, tmp_path, record_property):
    state, _ = head
    out_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "lbr"), "train", "--stage", "ib-gl", "--config", "configs/demo.yaml",
           "--set", "ib_gl.max_steps=4", "--set", "ib_gl.log_every=1", "--num-workers", "1", "--output", str(out_dir),
           "--address", state.dashboard]
    marks: dict[str, float] = {"command": time.time()}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, DS_ACCELERATOR="cpu"))
    lines: list[str] = []

    def read():  # \r too: the progress bar redraws in place
        for raw in iter(lambda: proc.stdout.readline(), b""):
            for line in re.split(r"[\r\n]+", raw.decode(errors="replace")):
                lines.append(line)
                if "submitted Ray job" in line:
                    marks.setdefault("submitted", time.time())
                if STEP_LINE.search(line):
                    marks.setdefault("steps_logged", time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=600)
    finally:
        proc.kill()
    reader.join(timeout=10)
    tail = "\n".join(lines[-40:])
    assert rc == 0, tail
    assert "succeeded" in tail
    stage = out_dir / "ib_gl"
    assert list(stage.glob("checkpoint_*")), f"no Ray Train checkpoint in {stage}"
    assert (stage / "model" / "config.json").is_file()
    marks["done"] = time.time()
    marks["first_step"] = _first_step_wall_time(stage / "tensorboard")
    timing = {f"{a}_to_{b}_s": round(marks[b] - marks[a], 1) if marks.get(a) and marks.get(b) else None
              for a, b in [("command", "submitted"), ("submitted", "first_step"), ("command", "first_step"),
                           ("submitted", "steps_logged"), ("command", "done")]}
    record_property("cluster_job_timing", json.dumps(timing))
    print(f"\n[lbr] local-head job timing: {timing}")


def _first_step_wall_time(tb_dir: Path) -> float | None:
    """Wall clock of step 1's TensorBoard scalars (log_every=1; the head is this machine, so clocks agree).
    The streamed progress bar can't tell: its redraws end in \\r, and Ray forwards them only at the stage's end."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    walls = [e.wall_time for tag in acc.Tags().get("scalars", []) for e in acc.Scalars(tag) if e.step == 1]
    return min(walls) if walls else None
