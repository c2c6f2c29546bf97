"""`lbr train|eval|tune ... --cluster FILE` (or `--address http://HOST:8265`): run that same command on a Ray
cluster as a Ray job, through Ray's Jobs API.

The job's runtime_env carries the project folder as its working_dir (so `configs/` and relative data paths
travel; .venv, runs/, .git and .gitignore'd files stay behind), its logs stream here, and `lbr` exits with the
job's status: 0 on success, 1 with the job's last log lines on failure, 130 after Ctrl-C (which stops the job).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

from lbr_ray.cluster.dashboard import auth_headers, probe
from lbr_ray.errors import ConfigError

EXCLUDES = [".venv", "venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "benchmarks/results"]
PASS_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # plus every LBR_* variable
OUTPUT_FLAGS = ("--output", "-o")
LAST_LINES = 20
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
QUIET_LOGGERS = ("ray._private.runtime_env.working_dir", "ray._private.runtime_env.packaging")


def is_job_address(address: str | None) -> bool:
    """True for a dashboard URL (http:// or https://), which means "submit as a Ray job"."""
    return bool(address) and address.strip().lower().startswith(("http://", "https://"))


def submit_as_job(argv: list[str], cluster: Path | None = None, address: str | None = None) -> int:
    """Run `lbr <argv without --cluster/--address>` on the cluster as a Ray job; return the exit code to use."""
    if cluster is not None and address:
        raise ConfigError("give --cluster FILE or --address URL, not both")
    if cluster is not None:
        from lbr_ray.cluster.launch import dashboard_address

        address = dashboard_address(Path(cluster))
    if not is_job_address(address):
        raise ConfigError(f"--address {address!r} is not a Ray dashboard URL (http://HOST:8265)")
    args = strip_cluster_args(argv)
    args = localize_outputs(args) if _is_loopback(address) else _warn_relative_outputs(args)
    cwd = Path.cwd()
    root = project_root(cwd)
    return run_job(address, job_entrypoint(args, cwd, root), working_dir=root)


def job_entrypoint(args: list[str], cwd: Path, root: Path) -> str:
    """`[cd SUBDIR &&] [VAR=value ...] lbr ARGS --address auto`.

    `--address auto` makes the command join the cluster it runs on (the job's $RAY_ADDRESS) instead of starting
    an embedded Ray. Variables go on the command line, not into runtime_env.env_vars, so the command's own
    `ray.init(runtime_env=...)` does not clash with the job's runtime env (Ray refuses to merge equal keys).
    """
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("LBR_") or k in PASS_ENV}
    cmd = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "LBR_CLUSTER_STATE_DIR")
    cmd = (cmd + " " if cmd else "") + shlex.join(["lbr", *args, "--address", "auto"])
    return cmd if cwd == root else f"cd {shlex.quote(str(cwd.relative_to(root)))} && {cmd}"


def strip_cluster_args(argv: list[str]) -> list[str]:
    """Drop `--cluster X`, `--address X` (and their `=X` forms): inside the job the command runs in place."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--cluster", "--address"):
            skip = True
        elif not a.startswith(("--cluster=", "--address=")):
            out.append(a)
    return out


def localize_outputs(args: list[str]) -> list[str]:
    """On a head on this machine a relative --output means this folder, not the job's temporary working dir."""
    out = list(args)
    for i, a in enumerate(out):
        if a in OUTPUT_FLAGS and i + 1 < len(out):
            out[i + 1] = _absolute(out[i + 1])
        elif a.startswith("--output="):
            out[i] = "--output=" + _absolute(a.split("=", 1)[1])
    return out


def project_root(start: Path) -> Path:
    """The lbr-ray checkout containing `start` (pyproject.toml + lbr_ray/), else `start` itself."""
    for d in (start, *start.parents):
        if (d / "pyproject.toml").is_file() and (d / "lbr_ray").is_dir():
            return d
    return start


def run_job(address: str, entrypoint: str, working_dir: Path | None = None,
            env_vars: dict[str, str] | None = None, out=None) -> int:
    """Submit `entrypoint` as a Ray job, stream its logs to `out` and return 0 / 1 (failed) / 130 (Ctrl-C)."""
    out = out or sys.stdout
    headers = auth_headers()
    server_version = probe(address, headers)  # fails within seconds when unreachable
    client = _client(address, headers)
    import ray

    if server_version != ray.__version__:
        _say(f"warning: the cluster runs Ray {server_version}, this machine Ray {ray.__version__}")
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES} if working_dir else {}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    t0 = time.monotonic()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"submitted_by": "lbr"})
    _say(f"submitted Ray job {job_id} to {address}: {entrypoint}\n(logs follow; Ctrl-C stops the job)")
    last: deque[str] = deque(maxlen=LAST_LINES)
    try:
        try:
            asyncio.run(_stream(client, job_id, last, out))
        except Exception as e:  # noqa: BLE001  (the log websocket dropped; the job itself may be fine)
            _say(f"log stream lost ({e}); waiting for the job to finish")
        info = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        _say(f"\nstopping Ray job {job_id} ...")
        client.stop_job(job_id)
        info = _wait_terminal(client, job_id, timeout_s=30)
        _say(f"job {job_id}: {_status(info) if info else 'stop requested'}")
        return 130
    status = _status(info)
    if status == "SUCCEEDED":
        _say(f"job {job_id} succeeded after {time.monotonic() - t0:.1f}s")
        return 0
    lines = list(last) or client.get_job_logs(job_id).splitlines()[-LAST_LINES:]
    reason = (info.message or "").split(", last available logs")[0].splitlines()[:1]  # Ray appends the logs
    _say(f"job {job_id} {status}: {' '.join(reason)}\n--- last log lines ---\n" + "\n".join(lines))
    return 1


async def _stream(client, job_id: str, last: deque, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        last.extend(line for line in chunk.splitlines() if line.strip())


def _wait_terminal(client, job_id: str, timeout_s: float | None = None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if _status(info) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(1.0)


def _client(address: str, headers: dict):
    """JobSubmissionClient for `address` exactly: Ray would let $RAY_ADDRESS override it (e.g. inside a job)."""
    from ray.job_submission import JobSubmissionClient

    for name in QUIET_LOGGERS:  # Ray notes on every upload that .git/.venv/.gitignore'd files stay behind
        logging.getLogger(name).setLevel(logging.ERROR)

    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(saved)


def _status(info) -> str:
    return getattr(info.status, "value", str(info.status))


def _is_loopback(address: str) -> bool:
    return (urlparse(address).hostname or "") in {"127.0.0.1", "localhost", "::1"}


def _absolute(p: str) -> str:
    return p if "://" in p else str(Path(p).expanduser().resolve())


def _warn_relative_outputs(args: list[str]) -> list[str]:
    for i, a in enumerate(args):
        val = args[i + 1] if a in OUTPUT_FLAGS and i + 1 < len(args) else None
        if val is not None and "://" not in val and not Path(val).is_absolute():
            _say(f"warning: --output {val} is relative, so it is created inside the job's temporary working dir on "
                 "the cluster; pass an absolute path on storage the cluster keeps")
    return args


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
