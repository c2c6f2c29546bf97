"""Integration tests share one embedded local Ray (4 logical CPUs on a 2-core machine, as `lbr` itself starts)."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by Ray's processes (no runtime_env: see ensure_ray)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# The demo config with its own model, bottleneck (R=32), token limits, backend and ZeRO stage; only the step counts,
# batch sizes and dev-set caps are cut to test size.
DEMO_RUN = ["ib_gl.batch_size=8", "ib_gl.warmup_steps=3", "ib_gl.max_steps=20", "gr_cl.warmup_steps=3",
            "gr_cl.batch_size=16", "gr_cl.max_steps=40", "gr_cl.log_every=5", "gr_cl.eval_every=20",
            "gr_cl.eval_queries=100", "gr_cl.eval_corpus=400"]


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory):
    """One two-stage run of configs/demo.yaml shared by the tests that inspect a trained model."""
    from lbr_ray.config import load_config
    from lbr_ray.recipes.pipeline import train

    out = tmp_path_factory.mktemp("demo-run")
    return out, train(load_config("configs/demo.yaml", DEMO_RUN + [f"run.output={out}"]), stage="all")
