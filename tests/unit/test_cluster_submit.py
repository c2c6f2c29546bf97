"""Job submission pieces that need no Ray cluster: address handling, argv rewriting, auth token, and the fast,
clear failure for an address that is not (or not yet) a reachable Ray dashboard. Servers here bind 127.0.0.1."""
from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from lbr_ray.cluster import dashboard
from lbr_ray.cluster.jobs import is_job_address, localize_outputs, project_root, strip_cluster_args, submit_as_job
from lbr_ray.errors import ConfigError, LbrError

REPO = Path(__file__).resolve().parents[2]


def test_is_job_address():
    assert is_job_address("http://127.0.0.1:8265") and is_job_address("HTTPS://head:443/")
    for a in (None, "", "auto", "127.0.0.1:6379", "ray://head:10001"):
        assert not is_job_address(a)


def test_strip_cluster_args_keeps_everything_else():
    argv = ["train", "--stage", "ib-gl", "--cluster", "c.yaml", "--set", "a.b=1", "--address=http://h:8265",
            "--output", "runs/x"]
    assert strip_cluster_args(argv) == ["train", "--stage", "ib-gl", "--set", "a.b=1", "--output", "runs/x"]


def test_relative_output_is_made_absolute_for_a_local_head(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = localize_outputs(["train", "-o", "runs/a", "--output=runs/b", "--output", "s3://bucket/c"])
    assert args == ["train", "-o", str(tmp_path / "runs/a"), f"--output={tmp_path / 'runs/b'}", "--output",
                    "s3://bucket/c"]


def test_project_root_is_the_checkout():
    assert project_root(REPO / "lbr_ray" / "cluster") == REPO
    assert project_root(Path("/")) == Path("/")


def test_auth_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert dashboard.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("file-token\n")
    assert dashboard.auth_headers() == {"Authorization": "Bearer file-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert dashboard.auth_headers() == {"Authorization": "Bearer env-token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_within_seconds():
    address = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(LbrError, match=r"cannot reach the Ray dashboard at http://127\.0\.0\.1:\d+"):
        submit_as_job(["train", "--address", address], address=address)
    assert time.monotonic() - t0 < 10


def test_silent_address_times_out_quickly(monkeypatch):
    monkeypatch.setattr(dashboard, "PROBE_TIMEOUT", (1.0, 1.0))
    with socket.socket() as srv:  # accepts the TCP connection (backlog) but never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        address = f"http://127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(LbrError, match="ReadTimeout|timeout"):
            dashboard.probe(address, timeout=dashboard.PROBE_TIMEOUT)
        assert time.monotonic() - t0 < 5


class _Fake(http.server.BaseHTTPRequestHandler):
    status, body = 200, b"<html>not ray</html>"

    def do_GET(self):  # noqa: N802
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,body,expect", [
    (401, b"Unauthorized", "requires an auth token"),
    (403, b"Forbidden", "rejected the auth token"),
    (200, b"<html>not ray</html>", "not a Ray dashboard"),
    (200, b'{"ray_version": "2.60.0"}', None),
])
def test_probe_explains_what_the_server_said(status, body, expect):
    handler = type("H", (_Fake,), {"status": status, "body": body})
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{srv.server_address[1]}"
        if expect is None:
            assert dashboard.probe(address) == "2.60.0"
        else:
            with pytest.raises(LbrError, match=expect):
                dashboard.probe(address)
    finally:
        srv.shutdown()
        srv.server_close()


def test_cluster_and_address_together_is_a_config_error():
    with pytest.raises(ConfigError, match="not both"):
        submit_as_job([], cluster=Path("clusters/local.yaml"), address="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="not a Ray dashboard URL"):
        submit_as_job([], address="127.0.0.1:6379")


def test_job_entrypoint_joins_the_cluster_and_carries_lbr_variables(monkeypatch):
    import os

    from lbr_ray.cluster.jobs import PASS_ENV, job_entrypoint

    for k in [k for k in os.environ if k.startswith("LBR_") or k in PASS_ENV]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LBR_DEBUG", "1 2")
    cmd = job_entrypoint(["train", "--config", "configs/demo.yaml"], REPO / "configs", REPO)
    assert cmd == "cd configs && DS_ACCELERATOR=cpu LBR_DEBUG='1 2' lbr train --config configs/demo.yaml --address auto"
    assert job_entrypoint(["eval"], REPO, REPO).endswith("lbr eval --address auto")
