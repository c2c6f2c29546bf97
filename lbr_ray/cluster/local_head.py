"""A Ray head on this machine, bound to 127.0.0.1, started and stopped by lbr (clusters/local.yaml).

`ray start --head` would pick the machine's routable IP even when told 127.0.0.1, so the head runs with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's own loopback-only mode) and every port it opens is a free one chosen
here, so it coexists with other Ray instances. `ray stop` would kill *every* Ray process of the user, so the
head is stopped by pid instead: the processes whose command line names its private temp dir or GCS port.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lbr_ray.cluster.dashboard import auth_headers, auth_token, probe
from lbr_ray.errors import LbrError

PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
              "object-manager-port")
METRIC_PORT_ENVS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")  # fixed 44217/44227 otherwise


@dataclass
class HeadState:
    cluster_name: str
    dashboard: str        # http://127.0.0.1:D, what `--address` and the Jobs API take
    gcs_address: str      # 127.0.0.1:P, what `ray status --address` and ray.init take
    temp_dir: str
    config: str
    started_at: float


def state_dir() -> Path:
    return Path(os.environ.get("LBR_CLUSTER_STATE_DIR") or Path.home() / ".lbr" / "clusters").expanduser()


def read_state(name: str) -> HeadState | None:
    try:
        return HeadState(**json.loads((state_dir() / f"{name}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ray_executable() -> str:
    """The `ray` next to this Python, so the head (and every job on it) runs in lbr's environment."""
    sibling = Path(sys.executable).parent / "ray"
    found = str(sibling) if sibling.exists() else shutil.which("ray")
    if not found:
        raise LbrError("the `ray` command is not installed next to this Python: pip install 'ray[default]'")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Environment for `ray` commands on the local head: Ray's loopback mode (else "127.0.0.1" is rewritten to the
    machine's IP, where nothing listens), lbr's venv first on PATH (jobs find `lbr`), no inherited address, and
    token auth when a token exists."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    if auth_token() and "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"  # `ray start` turns token auth on when a token exists; clients must follow
    return env


def is_alive(state: HeadState) -> bool:
    try:
        probe(state.dashboard, auth_headers(), timeout=(1.0, 3.0))
        return True
    except LbrError:
        return False


def start_head(name: str, config: str | Path, extra_args: list[str] | None = None,
               timeout_s: float = 90.0) -> tuple[HeadState, bool]:
    """Start the head (or find it running); return its state and whether it was started now."""
    old = read_state(name)
    if old is not None and is_alive(old):
        return old, False
    if old is not None:
        stop_head(name)  # stale: a crashed head or a reboot; clear what is left of it
    ports = {flag: free_port() for flag in PORT_FLAGS}
    temp_dir = Path(tempfile.gettempdir()) / f"lbr-{name}-{ports['port']}"  # short: Unix socket paths <= 107 chars
    env = dict(loopback_env(), **{k: str(free_port()) for k in METRIC_PORT_ENVS})
    cmd = [ray_executable(), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    cmd += [a for flag, port in ports.items() for a in (f"--{flag}", str(port))] + list(extra_args or [])
    state = HeadState(name, f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}",
                      str(temp_dir), str(Path(config).resolve()), time.time())
    _write_state(state)
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=Path.home())
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
            raise LbrError(f"`ray start --head` failed (exit {r.returncode}):\n{tail}")
        _wait_for_jobs_api(state, deadline=time.monotonic() + timeout_s)
    except BaseException:
        stop_head(name)
        raise
    return state, True


def _wait_for_jobs_api(state: HeadState, deadline: float) -> None:
    import requests

    while True:
        try:
            if requests.get(state.dashboard + "/api/jobs/", headers=auth_headers(), timeout=2).ok:
                return
        except requests.exceptions.RequestException:
            pass
        if time.monotonic() > deadline:
            raise LbrError(f"the Ray head started but its Jobs API at {state.dashboard} did not answer; "
                           f"see the logs under {state.temp_dir}")
        time.sleep(0.5)


def stop_head(name: str, grace_s: float = 3.0) -> bool:
    """Stop the head recorded for `name` (only its own processes); False when none was recorded.

    SIGTERM, then SIGKILL after `grace_s`: raylet and GCS drain for 10+ s on SIGTERM, pointless for a head whose
    every process is going away (a running job is killed with it)."""
    state = read_state(name)
    if state is None:
        return False
    markers = (f"{state.temp_dir}/session_", f"--temp-dir={state.temp_dir}", f"--address={state.gcs_address}")
    _kill_matching(markers, grace_s)
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    (state_dir() / f"{name}.json").unlink(missing_ok=True)
    return True


def _kill_matching(markers: tuple[str, ...], grace_s: float) -> None:
    import psutil

    me = psutil.Process()
    skip = {me.pid} | {p.pid for p in me.parents()}
    procs: set = set()
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if p.pid not in skip and any(m in arg for arg in cmdline for m in markers):
            procs.add(p)
    for p in list(procs):  # workers, job supervisors and their entrypoints hang below the raylet
        try:
            procs.update(c for c in p.children(recursive=True) if c.pid not in skip)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _write_state(state: HeadState) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    path = state_dir() / f"{state.cluster_name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)
