"""The Ray that `lbr train` starts for itself creates Ray Data's cluster-wide actors as soon as it is up, from the
driver, so they take Ray's prestarted worker processes instead of new ones started while a stage waits (issue 11)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

CODE = """
import json, sys
import ray
from lbr_ray.config import load_config
from lbr_ray.train import launcher
launcher.ensure_ray(load_config("configs/demo.yaml", ["run.output=" + sys.argv[1]]))
from ray._private.state import actors
print(json.dumps({a["Name"]: a["State"] for a in actors().values()}))
ray.shutdown()
"""


def test_embedded_ray_starts_ray_data_actors_before_any_stage(tmp_path):
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    states = json.loads(out.stdout.strip().splitlines()[-1])
    # no stage has run: these exist because ensure_ray created them, under the names Ray Data and Ray Train look up
    assert set(states) == {"AutoscalingCoordinator", "datasets_stats_actor"}
    assert set(states.values()) <= {"ALIVE", "PENDING_CREATION", "DEPENDENCIES_UNREADY"}
