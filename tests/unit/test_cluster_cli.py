"""`lbr cluster ...` through typer's CliRunner (no Ray runtime: cloud commands are checked for the Ray launcher
command they would run; the local head is only asked about while it is down)."""
from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cli import cluster as cluster_cli
from lbr_ray.errors import LbrError

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
runner = CliRunner()


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("LBR_CLUSTER_STATE_DIR", str(tmp_path / "state"))
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        """lbr (test root)."""

    cluster_cli.register(root)
    return root


def test_help_lists_the_commands(app):
    result = runner.invoke(app, ["cluster", "--help"])
    assert result.exit_code == 0
    for cmd in ("up", "down", "status", "validate"):
        assert cmd in result.output


def test_validate_aws_passes(app):
    result = runner.invoke(app, ["cluster", "validate", str(CLUSTERS / "aws.yaml")])
    assert result.exit_code == 0, result.output
    assert "valid Ray cluster launcher (aws)" in result.output


def test_validate_broken_copy_fails_naming_the_key(app, tmp_path):
    cfg = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    cfg["available_node_types"]["gpu_4x"]["max_workers"] = "lots"
    bad = tmp_path / "aws-broken.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["cluster", "validate", str(bad)])
    assert result.exit_code == 1
    assert "INVALID" in result.output
    assert "available_node_types.gpu_4x.max_workers: 'lots' is not of type 'integer'" in result.output


@pytest.mark.parametrize("cmd,ray_args", [("up", ["up", "-y"]), ("down", ["down", "-y"])])
def test_cloud_files_go_to_rays_launcher(app, monkeypatch, cmd, ray_args):
    calls = []
    monkeypatch.setattr("lbr_ray.cluster.launch.subprocess.call", lambda argv: calls.append(argv) or 0)
    path = str(CLUSTERS / "gcp.yaml")
    result = runner.invoke(app, ["cluster", cmd, path])
    assert result.exit_code == 0, result.output
    assert calls and Path(calls[0][0]).name == "ray" and calls[0][1:] == [*ray_args, path]


def test_up_refuses_an_invalid_file_before_launching(app, monkeypatch, tmp_path):
    monkeypatch.setattr("lbr_ray.cluster.launch.subprocess.call", lambda argv: pytest.fail("launched"))
    bad = tmp_path / "x.yaml"
    bad.write_text("cluster_name: x\nprovider: {region: us-west-2}\n")
    result = runner.invoke(app, ["cluster", "up", str(bad)])
    assert result.exit_code != 0
    assert "provider.type: required key is missing" in str(result.exception)


def test_local_status_and_down_when_not_up(app):
    local = str(CLUSTERS / "local.yaml")
    result = runner.invoke(app, ["cluster", "status", local])
    assert result.exit_code == 1 and "lbr-local: down" in result.output
    result = runner.invoke(app, ["cluster", "down", local])
    assert result.exit_code == 0 and "not up" in result.output


def test_submitting_to_a_local_cluster_that_is_down_says_what_to_do(tmp_path, monkeypatch):
    from lbr_ray.cluster.jobs import submit_as_job

    monkeypatch.setenv("LBR_CLUSTER_STATE_DIR", str(tmp_path))
    with pytest.raises(LbrError, match=r"not up: run `lbr cluster up .*local.yaml` first"):
        submit_as_job(["train", "--cluster", "clusters/local.yaml"], cluster=CLUSTERS / "local.yaml")


def test_local_head_takes_only_resource_flags_from_the_file():
    from lbr_ray.cluster.launch import head_start_args
    from lbr_ray.cluster.validate import load_launcher

    assert head_start_args(load_launcher(CLUSTERS / "local.yaml")) == ["--num-cpus", "8"]
    cfg = {"head_start_ray_commands": ["ray stop", "ulimit -n 65536; ray start --head --port=6379 --num-gpus 1 "
                                       "--resources='{\"x\": 1}' --dashboard-host=0.0.0.0"]}
    assert head_start_args(cfg) == ["--num-gpus", "1", "--resources", '{"x": 1}']


def test_cluster_file_resolves_to_the_recorded_local_head(tmp_path, monkeypatch):
    import json

    from lbr_ray.cluster.launch import dashboard_address

    monkeypatch.setenv("LBR_CLUSTER_STATE_DIR", str(tmp_path))
    (tmp_path / "lbr-local.json").write_text(json.dumps({
        "cluster_name": "lbr-local", "dashboard": "http://127.0.0.1:40001", "gcs_address": "127.0.0.1:40000",
        "temp_dir": "/tmp/x", "config": "clusters/local.yaml", "started_at": 0.0}))
    assert dashboard_address(CLUSTERS / "local.yaml") == "http://127.0.0.1:40001"
