"""`lbr cluster up|down|status FILE`: Ray's cluster launcher for cloud/on-prem files, lbr's own local head for
clusters/local.yaml (provider local, head_ip 127.0.0.1), and the dashboard address jobs are submitted to."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from lbr_ray.cluster import local_head
from lbr_ray.cluster.validate import is_local_head, load_launcher
from lbr_ray.errors import LbrError

DASHBOARD_PORT = 8265  # Ray's default; the launcher's default head_start_ray_commands keep it
HEAD_FLAGS = ("--num-cpus", "--num-gpus", "--resources", "--object-store-memory")  # taken over for a local head


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def up(path: Path) -> int:
    cfg = load_launcher(path)
    if not is_local_head(cfg):
        return _ray_cli("up", "-y", str(path))
    state, started = local_head.start_head(cfg["cluster_name"], path, head_start_args(cfg))
    _say(f"{'started' if started else 'already up:'} {cfg['cluster_name']} dashboard {state.dashboard} "
         f"(GCS {state.gcs_address}, logs {state.temp_dir})")
    _say(f"submit with: lbr train ... --cluster {path}   or   --address {state.dashboard}")
    return 0


def head_start_args(cfg: dict) -> list[str]:
    """The resource flags of the file's `ray start --head` command (head_start_ray_commands), for the local head."""
    out: list[str] = []
    for command in cfg.get("head_start_ray_commands") or []:
        words = shlex.split(command.split(";")[-1])
        if words[:2] != ["ray", "start"]:
            continue
        for i, w in enumerate(words):
            flag, eq, value = w.partition("=")
            if flag in HEAD_FLAGS:
                value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
                out += [flag, value]
    return out


def down(path: Path) -> int:
    cfg = load_launcher(path)
    if not is_local_head(cfg):
        return _ray_cli("down", "-y", str(path))
    stopped = local_head.stop_head(cfg["cluster_name"])
    _say(f"stopped {cfg['cluster_name']}" if stopped else f"{cfg['cluster_name']} is not up (nothing to stop)")
    return 0


def status(path: Path) -> int:
    """0 when the cluster answers, 1 when it is down."""
    cfg = load_launcher(path)
    if not is_local_head(cfg):
        return _ray_cli("exec", str(path), "ray status")
    state = local_head.read_state(cfg["cluster_name"])
    if state is None or not local_head.is_alive(state):
        _say(f"{cfg['cluster_name']}: down" + (" (stale record; `lbr cluster down` clears it)" if state else ""))
        return 1
    _say(f"{cfg['cluster_name']}: up, dashboard {state.dashboard}, GCS {state.gcs_address}")
    deadline = time.monotonic() + 30
    while True:  # a head started seconds ago has no autoscaler report yet ("No cluster status")
        r = subprocess.run([local_head.ray_executable(), "status", "--address", state.gcs_address],
                           capture_output=True, text=True, timeout=120, env=local_head.loopback_env())
        if r.returncode != 0 or "No cluster status" not in r.stdout or time.monotonic() > deadline:
            break
        time.sleep(2)
    print((r.stdout if r.returncode == 0 else r.stderr).rstrip(), flush=True)
    return 0


def dashboard_address(path: Path) -> str:
    """The Jobs API URL of the cluster a launcher file describes (the local head's, or the cloud head's IP:8265)."""
    cfg = load_launcher(path)
    name = cfg["cluster_name"]
    if is_local_head(cfg):
        state = local_head.read_state(name)
        if state is None:
            raise LbrError(f"cluster {name} is not up: run `lbr cluster up {path}` first")
        return state.dashboard
    try:
        from ray.autoscaler.sdk import get_head_node_ip

        ip = get_head_node_ip(str(path))
    except Exception as e:  # noqa: BLE001  (cloud SDK errors of every kind)
        raise LbrError(f"cannot find the head node of {path} ({type(e).__name__}: {e}); is it up "
                       f"(`lbr cluster up {path}`)? Or forward its dashboard with `ray dashboard {path}` and pass "
                       f"--address http://127.0.0.1:{DASHBOARD_PORT}") from None
    return f"http://{ip}:{DASHBOARD_PORT}"


def _ray_cli(*args: str) -> int:
    """Run Ray's own launcher command (output streams through); its exit code becomes ours."""
    cmd = [local_head.ray_executable(), *args]
    _say("+ " + " ".join(cmd))
    return subprocess.call(cmd)
