"""CLI errors are one clear line with exit code 2 (run as a real subprocess, as a user would)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def lbr(*args, cwd=None):
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_help_lists_commands():
    out = lbr("--help")
    assert out.returncode == 0 and "train" in out.stdout
    out = lbr("train", "--help")
    assert "--resume" in out.stdout and "--num-workers" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "bottleneck.ratio=0"], "bottleneck.ratio (R) must be > 0"),
    (["--set", "model.name=/no/such/model", "--set", "model.from_scratch=false"], "model.name: cannot load"),
    (["--data", "/no/such/pairs.jsonl"], "/no/such/pairs.jsonl: pairs path does not exist"),
    (["--stage", "xx"], "--stage 'xx'"),
])
def test_bad_options_are_one_line_exit_2(args, message, tmp_path):
    out = lbr("train", "--config", "configs/demo.yaml", "--output", str(tmp_path), *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    out = lbr("train", "--config", str(bad))
    assert out.returncode == 2 and "not valid YAML" in out.stderr and "Traceback" not in out.stderr


def test_broken_line_17_stops_the_run_naming_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"query": f"what is item {i}?", "positive": f"item {i} is a thing"}) for i in range(40)]
    lines[16] = '{"query": "broken'
    pairs.write_text("\n".join(lines) + "\n")
    out = lbr("train", "--config", "configs/demo.yaml", "--data", str(pairs), "--set", "data.corpus=[]",
              "--output", str(tmp_path / "run"))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert f"{pairs}:17" in last and "broken JSON" in last
