"""Model, loss, data-format and metric code imports and runs without Ray (e.g. on a GPU box with torch only)."""
from __future__ import annotations

import subprocess
import sys

RAY_FREE = ["lbr_ray.model.bottleneck", "lbr_ray.model.masks", "lbr_ray.model.attention", "lbr_ray.model.selfcheck",
            "lbr_ray.losses", "lbr_ray.data.schema", "lbr_ray.data.readers", "lbr_ray.layout",
            "lbr_ray.data.split", "lbr_ray.train.loop", "lbr_ray.train.telemetry", "lbr_ray.train.flops",
            "lbr_ray.train.console",
            "lbr_ray.train.deepspeed", "lbr_ray.recipes.setup", "lbr_ray.config"]


def test_imports_without_ray():
    code = "import sys; sys.modules['ray'] = None\n" + "\n".join(f"import {m}" for m in RAY_FREE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
