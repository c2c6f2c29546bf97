"""DeepSpeed on CPU without its shared-memory all-reduce op: the engine's comm backend starts without JIT-building
it (only DeepSpeed's inference all-reduce uses it), and a ZeRO-2 step still trains."""
from __future__ import annotations

import pytest
import torch

from lbr_ray.config.schema import DeepSpeedConfig, StageConfig


def test_zero2_step_on_cpu_without_the_shm_op(monkeypatch):
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from lbr_ray.train.deepspeed import initialize

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed picked another accelerator in this process")

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 1)

        def forward(self, batch):
            return {"loss": (self.lin(batch["x"]) - batch["y"]).pow(2).mean()}

    torch.manual_seed(0)
    batch = {"x": torch.randn(4, 8), "y": torch.randn(4, 1)}
    engine = initialize(Objective(), DeepSpeedConfig(zero_stage=2), StageConfig(batch_size=4, lr=0.1, max_steps=3,
                                                                               warmup_steps=1))
    try:
        import deepspeed.comm.comm as ds_comm

        assert ds_comm.cdb.shm_comm_op is None  # not built
        losses = []
        for _ in range(3):
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            losses.append(float(out["loss"]))
        assert losses[-1] < losses[0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
