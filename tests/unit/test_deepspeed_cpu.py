"""DeepSpeed on CPU without its shared-memory all-reduce op: the engine's comm backend starts without JIT-building
it (only DeepSpeed's inference all-reduce uses it), and a ZeRO-2 step still trains; on one worker, lbr runs ZeRO-1/2
configs at stage 0, which takes the same update."""
from __future__ import annotations

import pytest
import torch

from lbr_ray.config.schema import DeepSpeedConfig, StageConfig
from tests.conftest import free_port


class Objective(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, batch):
        return {"loss": (self.lin(batch["x"]) - batch["y"]).pow(2).mean()}


@pytest.fixture(scope="module")
def world_of_one():
    """This process as a DeepSpeed world of one rank on the CPU accelerator (one process group for the module:
    DeepSpeed keeps its groups across a torch.distributed restart)."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                     "WORLD_SIZE": "1"}.items():
            mp.setenv(k, v)
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            pytest.skip("DeepSpeed picked another accelerator in this process")
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


def train(world: int, steps: int = 3, clip: float = 0.5,
          ds: DeepSpeedConfig = DeepSpeedConfig(zero_stage=2)) -> tuple[object, list[float], torch.Tensor]:
    """`steps` DeepSpeed steps of a seeded linear model, lbr's config as for a run of `world` workers (gradient
    clipping active: the updates differ from plain AdamW's only if it is applied the same way)."""
    from lbr_ray.train.deepspeed import initialize

    torch.manual_seed(0)
    batch = {"x": torch.randn(4, 8), "y": 10 * torch.randn(4, 1)}
    stage = StageConfig(batch_size=4, lr=0.1, max_steps=steps, warmup_steps=1, grad_clip=clip)
    engine = initialize(Objective(), ds, stage, world)
    losses = []
    for _ in range(steps):
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].item())
    return engine, losses, torch.cat([p.detach().flatten() for p in engine.module.parameters()])


def test_zero2_step_on_cpu_without_the_shm_op(world_of_one):
    import deepspeed.comm.comm as ds_comm

    engine, losses, _ = train(world=2)  # a 2-worker run's config: ZeRO-2 as configured
    assert engine.zero_optimization_stage() == 2
    assert ds_comm.cdb.shm_comm_op is None  # not built
    assert losses[-1] < losses[0]


def test_one_worker_runs_zero_2_as_stage_0_with_the_same_update(world_of_one):
    from lbr_ray.train.deepspeed import zero_stage

    zero2, losses2, params2 = train(world=2)
    zero0, losses0, params0 = train(world=1)
    assert (zero2.zero_optimization_stage(), zero0.zero_optimization_stage()) == (2, 0)
    assert losses0 == pytest.approx(losses2, rel=1e-6)
    assert torch.allclose(params0, params2, atol=1e-6)
    # offload (memory), bf16 (another optimizer wrapper) and ZeRO-3 keep the configured stage on one worker
    for ds in (DeepSpeedConfig(zero_stage=2, offload_optimizer=True), DeepSpeedConfig(zero_stage=2, bf16=True),
               DeepSpeedConfig(zero_stage=3)):
        assert zero_stage(ds, 1) == ds.zero_stage


def test_zero2_with_the_optimizer_offloaded_takes_the_same_update(world_of_one):
    """deepspeed.offload_optimizer: DeepSpeed >= 0.16 refuses a torch optimizer under ZeRO-Offload unless told
    (zero_force_ds_cpu_optimizer): the run stopped at engine start."""
    engine, losses, params = train(world=2, ds=DeepSpeedConfig(zero_stage=2, offload_optimizer=True))
    _, losses2, params2 = train(world=2)
    assert engine.zero_optimization_stage() == 2 and engine.zero_cpu_offload()
    assert losses == pytest.approx(losses2, rel=1e-6) and torch.allclose(params, params2, atol=1e-6)
