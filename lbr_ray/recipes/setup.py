"""Model setup shared by the stage recipes (no Ray)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from lbr_ray.layout import SequenceBuilder, pack, pad_rows
from lbr_ray.model.bottleneck import BottleneckLM
from lbr_ray.model.selfcheck import SELF_CHECK_TEXTS, check_mask

log = logging.getLogger("lbr_ray")


def build_model(cfg, init: str | None = None):
    """The stage's model: the configured base model, or the HF folder of an earlier stage (`init`)."""
    model_cfg = cfg.model if init is None else dataclasses.replace(cfg.model, name=str(init), from_scratch=False)
    model, tok = BottleneckLM.build(model_cfg, cfg.bottleneck, seed=cfg.run.seed)
    model.train()  # from_pretrained leaves the base model's modules in eval mode: the stage trains all of them
    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    return model, tok


def self_check(model, tok, cfg, rank: int = 0) -> dict:
    """Stop the run (MaskLeakError) if the mask leaks or the backend disagrees with the dense reference."""
    builder = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)
    rows = builder.stage1_rows(SELF_CHECK_TEXTS, "continuation", ib=True)
    if cfg.ib_gl.pack:  # one packed row holding every unit, plus the units alone
        rows = pack(rows, sum(len(r[0]) for r in rows)) + rows
    ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    device = next(model.parameters()).device
    result = check_mask(model, ids.to(device), seg.to(device))
    if rank == 0:
        log.info("mask self-check passed (%s%s): %s", model.backend, ", packed rows" if cfg.ib_gl.pack else "",
                 {k: float(f"{v:.3g}") for k, v in result.items()})
    return result
