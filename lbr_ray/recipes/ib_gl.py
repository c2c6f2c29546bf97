"""Stage 1, IB-GL: next-token loss on the target through the bottleneck, on Ray Train + DeepSpeed; and the
causal-LM pre-training stage (`--stage lm`), which is the same loop on packed plain-text rows.

`train_fn(config)` / `lm_train_fn(config)` run on every Ray Train worker; launcher.run_stage builds their datasets
and TorchTrainer.
"""
from __future__ import annotations

import torch
from torch import nn

from lbr_ray.config.load import pack_length
from lbr_ray.losses import IBGenerativeLoss
from lbr_ray.layout import PAD
from lbr_ray.recipes.setup import build_model, self_check
from lbr_ray.train.deepspeed import initialize
from lbr_ray.train.flops import FlopCounter
from lbr_ray.train.loop import train_loop
from lbr_ray.train.worker import WorkerRun


class IBGLObjective(nn.Module):
    """Wraps model + loss so DeepSpeed's engine runs the whole forward."""

    def __init__(self, model, alpha: float, ib: bool, packed: bool = False):
        super().__init__()
        self.model, self.loss, self.ib, self.packed = model, IBGenerativeLoss(alpha), ib, packed
        self.counter = FlopCounter(model)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        ids, seg = batch["ib_ids"], batch["ib_seg"]
        out = self.loss(self.model, ids, seg, ib=self.ib, packed=self.packed)
        return {"loss": out["loss"], "target_loss": out["target_loss"], "input_loss": out["input_loss"],
                "pad_frac": (seg == PAD).float().mean(), "tokens": (seg != PAD).sum(),
                "flops": self.counter.flops(seg, out["head_rows"], self.ib)}


def uses_mask(cfg) -> bool:
    return cfg.ib_gl.mask and cfg.run.variant != "gl-cl"


def train_fn(config: dict) -> None:
    _train(config, "ib_gl")


def lm_train_fn(config: dict) -> None:
    """`--stage lm`: the same loop on packed plain-text rows (no bottleneck, no mask but the document mask)."""
    _train(config, "lm")


def _train(config: dict, stage: str) -> None:
    run = WorkerRun(config, stage)
    cfg, st = run.cfg, getattr(run.cfg, stage)
    ib = uses_mask(cfg) if stage == "ib_gl" else False
    packed, length = (st.pack, pack_length(cfg)) if stage == "ib_gl" else (True, st.seq_len)
    batches = run.batches(["ib"], st.batch_size, run.pad_id(config.get("init")), length=length)  # prefetches
    model, tok = build_model(cfg, init=config.get("init"))
    run.mark("model")
    if ib and cfg.run.self_check:
        self_check(model, tok, cfg, run.rank)
        run.mark("self_check")
    engine = initialize(IBGLObjective(model, st.alpha if ib else 0.0, ib, packed=packed), cfg.deepspeed, st,
                        run.world)
    run.mark("deepspeed")
    state = run.resume(engine)
    telemetry = run.telemetry(st.max_steps, state)
    try:
        train_loop(engine, batches, st, state, telemetry, run.world,
                   on_log=run.report, on_checkpoint=lambda s: run.checkpoint(engine, model, tok, s))
    finally:
        telemetry.close()
