"""S3 (moto's server mode on 127.0.0.1, started and stopped by the test by pid) and two Ray nodes on this machine.

One integration run checks, as a user would run it (`lbr train --address HEAD --output s3://...` in a subprocess):
- the data comes from S3 (`--data s3://bucket/data/medical`), checkpoints go to S3 (Ray Train storage_filesystem);
- the 2 Train workers sit one per node (custom resource `lbr_worker`, one unit per node);
- the run is stopped (Ctrl-C) after its second checkpoint; the newest checkpoint in S3 is then damaged (a file
  deleted); `--resume` names it in one line, resumes from the previous complete checkpoint, reaches max_steps and
  writes the final model, metrics, TensorBoard and summary.json to S3.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "lbr-test"
STEPS = 16


@pytest.fixture(scope="module")
def bucket(s3_server):
    """The bucket, with the demo's medical data in it."""
    import boto3

    from lbr_ray import storage

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    storage.upload_dir(ROOT / "data" / "demo" / "medical", f"s3://{BUCKET}/data/medical")
    return s3_server


@pytest.fixture(scope="module")
def two_nodes(bucket):
    """A Ray head and a second node joined with `ray start --address`, on this machine: 2 CPUs, one `lbr_worker`,
    their own temp dir and free ports each, worker ports chosen by the OS (the two raylets, and any other Ray on the
    machine, never compete for one), no dashboard; both stopped by pid (never `ray stop`, which would stop other
    Ray instances on the machine).

    Both run in Ray's cluster mode, on the machine's IP: Ray refuses to add a node to a loopback-only head
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what `lbr cluster up clusters/local.yaml` starts), and a joining
    `ray start` rewrites `--address 127.0.0.1:P` and `--node-ip-address 127.0.0.1` to the machine's IP
    (ray._private.services.resolve_ip_for_localhost), where a loopback head's GCS does not listen: it retried
    "Failed to connect to GCS at address <machine IP>:P" forever (ray-project/ray#59110)."""
    from ray._private.services import get_node_ip_address

    from lbr_ray.cluster import local_head as lh
    from lbr_ray.cluster.dashboard import auth_token

    ip = get_node_ip_address()
    gcs = lh.free_port()
    temp = {n: Path(tempfile.gettempdir()) / f"lbr-2n-{gcs}-{n}" for n in ("head", "node")}  # short: socket paths
    env = {**lh.loopback_env(), **bucket, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "PYTHONPATH": str(ROOT),
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token"}  # ports open on the machine's IP
    if not auth_token():
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this cluster's own; ~/.ray is left alone
    common = ["--node-ip-address", ip, "--disable-usage-stats", "--num-cpus=2", '--resources={"lbr_worker": 1}',
              f"--object-store-memory={512 * 2**20}", "--min-worker-port=0", "--max-worker-port=0"]
    ports = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    starts = {"head": ["--head", "--port", str(gcs), "--include-dashboard=false",
                       "--ray-client-server-port", str(lh.free_port())],
              "node": ["--address", f"{ip}:{gcs}"]}
    try:
        for name, args in starts.items():
            cmd = [lh.ray_executable(), "start", *args, "--temp-dir", str(temp[name]), *common,
                   *(a for p in ports for a in (f"--{p}", str(lh.free_port())))]
            r = subprocess.run(cmd, env={**env, **{k: str(lh.free_port()) for k in lh.METRIC_PORT_ENVS}},
                               capture_output=True, text=True, timeout=120, cwd=Path.home())
            assert r.returncode == 0, f"ray start ({name}): {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        yield {"address": f"{ip}:{gcs}", "env": env}
    finally:
        for t in temp.values():
            lh._kill_matching((f"{t}/session_", f"--temp-dir={t}"), 3.0)
            shutil.rmtree(t, ignore_errors=True)


def lbr(env: dict, *args: str) -> subprocess.Popen:
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_two_nodes_checkpoint_to_s3_resume_from_s3_past_a_damaged_checkpoint(two_nodes, tmp_path):
    env = {**two_nodes["env"], "LBR_STAGING": str(tmp_path / "staging")}
    s3_stop_damage_resume(env, ["--address", two_nodes["address"]], "run2n", ["scaling.worker_resource=lbr_worker"],
                          nodes=2)


def s3_stop_damage_resume(env: dict, address: list[str], name: str, extra: list[str], nodes: int) -> None:
    from pyarrow import fs as pafs

    from lbr_ray import storage

    out = f"s3://{BUCKET}/{name}"
    args = ["train", "--stage", "ib-gl", "--config", "configs/demo.yaml", *address,
            "--verbose",  # the workers' "on node" lines come to the console
            "--data", f"s3://{BUCKET}/data/medical", "--output", out, "--num-workers", "2"]
    for o in ("data.max_input_tokens=48", "data.max_target_tokens=48", "ib_gl.batch_size=8",
              f"ib_gl.max_steps={STEPS}", "ib_gl.log_every=1", "ib_gl.checkpoint_every=4", "run.self_check=false",
              *extra):
        args += ["--set", o]
    fs, stage = storage.filesystem(f"{out}/ib_gl")

    def manifests() -> list[str]:
        try:
            infos = fs.get_file_info(pafs.FileSelector(stage, recursive=True, allow_not_found=True))
        except OSError:
            return []
        return sorted(i.path.rsplit("/", 2)[-2] for i in infos if i.base_name == "manifest.json")

    t0 = time.time()
    first = lbr(env, *args)
    while len(manifests()) < 2 and first.poll() is None and time.time() - t0 < 600:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGINT)
    log1 = first.communicate(timeout=120)[0]
    t_first = time.time() - t0
    node_ids = set(re.findall(r"rank \d+ of \d+ on node ([0-9a-f]+)", log1))
    assert len(node_ids) == nodes, log1[-3000:]  # with 2 nodes: one Train worker per node
    complete = manifests()
    assert len(complete) >= 2, log1[-3000:]
    newest, previous = complete[-1], complete[-2]
    fs.delete_file(f"{stage}/{newest}/hf/model.safetensors")  # a partly deleted checkpoint
    with fs.open_input_stream(f"{stage}/{previous}/state.json") as fh:
        previous_step = json.loads(fh.read())["step"]

    t1 = time.time()
    second = lbr(env, *args, "--resume")
    log2 = second.communicate(timeout=900)[0]
    t_second = time.time() - t1
    assert second.returncode == 0, log2[-4000:]
    assert f"{newest} is incomplete (hf/model.safetensors is missing): resuming from {previous}" in log2
    metrics = [json.loads(line) for line in
               fs.open_input_stream(f"{stage}/metrics.jsonl").read().decode().splitlines() if line.strip()]
    resumed = [m for m in metrics if "resumed_at_step" in m]
    assert resumed and resumed[-1]["resumed_at_step"] == previous_step
    after = [m["step"] for m in metrics[metrics.index(resumed[-1]):] if "loss" in m]
    assert after == list(range(previous_step + 1, STEPS + 1))
    names = {i.path.split(f"{stage}/", 1)[1] for i in
             fs.get_file_info(pafs.FileSelector(stage, recursive=True)) if i.type == pafs.FileType.File}
    assert {"model/model.safetensors", "model/lbr_ray.json", "config.yaml"} <= names
    assert any(n.startswith("tensorboard/events.") for n in names)
    assert fs.get_file_info(f"{BUCKET}/{name}/summary.json").type == pafs.FileType.File
    print(f"\n[s3, {nodes} node(s)] first part {t_first:.0f}s (stopped after {len(complete)} checkpoints), resume "
          f"{t_second:.0f}s from step {previous_step} past damaged {newest}")
