"""Integration tests share one embedded local Ray (4 logical CPUs on a 2-core machine, as `lbr` itself starts)."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()
