"""The step loop without Ray or DeepSpeed: when it logs, evaluates and checkpoints."""
from __future__ import annotations

import torch

from lbr_ray.config.schema import StageConfig
from lbr_ray.train.checkpoint import LoopState
from lbr_ray.train.loop import train_loop
from lbr_ray.train.telemetry import Telemetry


class CountingEngine:
    """Stands in for the DeepSpeed engine: every micro-batch is an optimizer step."""

    def __call__(self, batch):
        return {"loss": torch.tensor(1.0), "tokens": torch.tensor(4)}

    def is_gradient_accumulation_boundary(self):
        return True

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_lr(self):
        return [1e-4]


def run(stage: StageConfig, eval_every: int):
    logged, evaluated, saved = [], [], []
    train_loop(CountingEngine(), lambda epoch: iter([{}] * 10_000), stage, LoopState(),
               Telemetry("t", stage.max_steps, rank=1, tb_dir=None), world=1,
               on_log=logged.append, on_checkpoint=lambda s: saved.append(s.step),
               on_eval=lambda s: evaluated.append(s.step) or {"dev_recall@10": 0.5}, eval_every=eval_every)
    return logged, evaluated, saved


def test_evaluation_follows_its_own_schedule_not_the_logging_one():
    """Issue 13.3: with log_every 20 and eval_every 250 the evaluations at 250 and 750 used to be skipped."""
    stage = StageConfig(max_steps=1000, log_every=20, checkpoint_every=500)
    logged, evaluated, saved = run(stage, eval_every=250)
    assert evaluated == [250, 500, 750, 1000]
    assert [m["step"] for m in logged if "dev_recall@10" in m] == [250, 500, 750, 1000]
    assert [m["step"] for m in logged] == sorted({*range(20, 1001, 20), 250, 750})
    assert saved == [500, 1000]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    """Issue 13: resume re-seeded, so dropout replayed the masks of step 0; the saved state continues the stream."""
    import random

    import numpy as np

    from lbr_ray.train.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    torch.rand(5)
    torch.save(rng_state(), tmp_path / "rank0.pt")
    expect = (torch.rand(4), np.random.rand(2), random.random())
    torch.manual_seed(3)  # what a re-seeding resume did
    assert not torch.equal(torch.rand(4), expect[0])
    set_rng_state(torch.load(tmp_path / "rank0.pt", weights_only=False))
    got = (torch.rand(4), np.random.rand(2), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_workers_build_deepspeed_ops_with_the_environments_ninja(monkeypatch, tmp_path):
    """The interpreter's bin folder (pip's ninja, DeepSpeed's dependency) goes first on PATH, once; a system ninja
    first on a node's PATH would rebuild DeepSpeed's cached comm op (another ninja log format) on every switch."""
    import os
    import sys

    from lbr_ray.train.deepspeed import use_environment_ninja

    bindir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bindir, "ninja"))  # deepspeed requires the ninja package
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path), "/usr/bin", bindir]))
    use_environment_ninja()
    use_environment_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [bindir, str(tmp_path), "/usr/bin", bindir]


class TokenEngine(CountingEngine):
    """1,000 non-padding tokens per micro-batch on each rank."""

    def __call__(self, batch):
        return {"loss": torch.tensor(1.0), "tokens": torch.tensor(1000)}


def _tokens_worker(rank: int, world: int, store: str, queue) -> None:
    import itertools
    import time
    import types

    import torch.distributed as dist

    from lbr_ray.train import telemetry

    clock = itertools.chain([0.0], itertools.repeat(2.0))  # the log window starts at 0 s, is flushed at 2 s
    monkey = types.SimpleNamespace(perf_counter=lambda: next(clock), time=time.time)
    telemetry.time = monkey  # a spawned process: nothing to restore
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        logged = []
        state = train_loop(TokenEngine(), lambda epoch: iter([{}] * 10), StageConfig(max_steps=2, log_every=2),
                           LoopState(), Telemetry("t", 2, rank=rank, tb_dir=None, bar=False), world=world,
                           on_log=logged.append, on_checkpoint=lambda s: None)
        queue.put((rank, logged[-1]["tokens_per_s"], state.tokens))
    finally:
        dist.destroy_process_group()


def test_tokens_per_s_of_two_ranks_is_their_sum(tmp_path):
    """Issue 21.7: the loop multiplied each rank's tokens by the world size and the telemetry summed the ranks
    again, so 2 ranks of 1,000 tokens/s each reported 4,000. Two gloo processes, a fixed clock: 2,000."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tokens_worker, args=(r, 2, str(tmp_path / "store"), queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert [(tps, tokens) for _, tps, tokens in results] == [(2000.0, 4000), (2000.0, 4000)]  # 2 x 2 x 1,000 tokens
