"""DeepSpeed config dict, optimizer and schedule for one stage (ZeRO 0-3, bf16 on GPU)."""
from __future__ import annotations

import logging
import math
import os
import sys

import torch

from lbr_ray.config.schema import DeepSpeedConfig, StageConfig

log = logging.getLogger("lbr_ray")


def zero_stage(ds: DeepSpeedConfig, world: int) -> int:
    """The ZeRO stage a run uses: `deepspeed.zero_stage`, except stages 1-2 on one worker (fp32, no offload), which
    would split optimizer states and gradients over a single rank: nothing saved, time lost (docs/performance.md).
    Stage 0 takes the same update. bf16 keeps the configured stage: at stage 0 it runs through another DeepSpeed
    optimizer wrapper that lbr has not run."""
    if world == 1 and ds.zero_stage in (1, 2) and not (ds.offload_optimizer or ds.bf16):
        return 0
    return ds.zero_stage


def ds_config(ds: DeepSpeedConfig, stage: StageConfig, world: int) -> dict:
    zero: dict = {"stage": zero_stage(ds, world)}
    extra = {}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        extra["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW steps on the CPU copy (no JIT-built op)
    return {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no compiled DeepSpeed op needed on CPU
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **extra,
    }


def lr_lambda(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to `floor` at `total` (pure, for tests)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_and_schedule(model: torch.nn.Module, stage: StageConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": stage.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, stage.warmup_steps, stage.max_steps))
    return opt, sched


def skip_cpu_shm_op() -> bool:
    """On the CPU accelerator, DeepSpeed's comm backend JIT-builds (C++, ninja) a shared-memory all-reduce op when it
    starts; only its inference all-reduce uses it (training all-reduces go through torch.distributed), yet every
    worker paid the build check at start-up, and a full rebuild (a minute or more on 2 cores) whenever the cached
    build's flags differed from another process's. Returns whether the build was switched off."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is torch
    if not hasattr(ds_torch, "build_shm_op"):  # another DeepSpeed release: leave it alone
        return False
    ds_torch.build_shm_op = lambda: None
    return True


def initialize(objective: torch.nn.Module, ds: DeepSpeedConfig, stage: StageConfig, world: int):
    """deepspeed.initialize with our optimizer/schedule for a run of `world` workers; DeepSpeed steps and
    checkpoints both."""
    use_environment_ninja()
    import deepspeed

    skip_cpu_shm_op()
    opt, sched = optimizer_and_schedule(objective, stage)
    config = ds_config(ds, stage, world)
    if config["zero_optimization"]["stage"] != ds.zero_stage:
        log.info("1 worker: DeepSpeed ZeRO stage 0 instead of %d (nothing to split over one rank; the same update)",
                 ds.zero_stage)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def use_environment_ninja() -> None:
    """Put this Python's bin folder (where pip installed DeepSpeed's `ninja`) first on PATH.

    DeepSpeed JIT-builds its C++ ops on CPU (torch's cpp_extension runs `ninja` from PATH; e.g. the CPU Adam of
    `deepspeed.offload_optimizer`) into a cache every process of the user shares (~/.cache/torch_extensions). A Ray
    node started with the environment's bin folder on PATH (`lbr cluster up`, the two-node test) found pip's ninja
    1.13, an embedded Ray started by `.venv/bin/python` found the system's 1.11; their build logs differ (v7 vs v5
    command hashes), so each switch rebuilt the op: 1-3 minutes of C++ on a loaded 2-core machine before the first
    step. One ninja for every worker, whatever PATH its node started with."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path
