"""Checkpoints: a Hugging Face model folder (`hf/`, safetensors + tokenizer + lbr_ray.json), DeepSpeed engine
state (`ds/`, every rank its own shard), every rank's RNG state (`rng/`) and the loop position (`state.json`), plus
the resolved config."""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lbr_ray.config import LbrConfig, save_config
from lbr_ray.errors import CheckpointError

DS_TAG = "state"
MODEL_CARD = "lbr_ray.json"


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (skipped on resume)
    tokens: int = 0


def lbr_card(cfg: LbrConfig, bottleneck_ids: list[int], stage: str) -> dict:
    """What an lbr-ray model folder needs besides HF weights to embed exactly as training did."""
    b = cfg.bottleneck
    return {"format": "lbr-ray", "version": 1, "stage": stage, "bottleneck_ids": list(bottleneck_ids),
            "ratio": b.ratio, "k": b.k, "k_min": b.k_min, "k_max": b.k_max, "sink": b.sink, "pooling": b.pooling,
            "max_input_tokens": cfg.data.max_input_tokens, "split": asdict(cfg.data.split)}


def export_hf(model, tokenizer, cfg: LbrConfig, stage: str, out: Path) -> Path:
    """Merged HF model (LoRA folded in) + tokenizer + lbr_ray.json; loads with AutoModelForCausalLM."""
    from lbr_ray.model.bottleneck import merged_lm

    out.mkdir(parents=True, exist_ok=True)
    merged_lm(model, cfg.model.dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / MODEL_CARD).write_text(json.dumps(lbr_card(cfg, model.bottleneck_ids, stage), indent=2))
    return out


def rng_state() -> dict:
    """This process's random number generators (torch CPU and CUDA, numpy, python): dropout and shuffles."""
    import random

    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(saved: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    np.random.set_state(saved["numpy"])
    random.setstate(saved["python"])


def save(engine, model, tokenizer, cfg: LbrConfig, stage: str, state: LoopState, out: Path, rank: int) -> None:
    """Every rank writes its DeepSpeed shard and its RNG state under `out`; rank 0 adds the HF folder, state and
    config."""
    gather = contextlib.nullcontext()
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    engine.save_checkpoint(str(out / "ds"), tag=DS_TAG, client_state={"loop": asdict(state)})
    (out / "rng").mkdir(parents=True, exist_ok=True)
    import torch

    torch.save(rng_state(), out / "rng" / f"rank{rank}.pt")
    with gather:
        if rank == 0:
            export_hf(model, tokenizer, cfg, stage, out / "hf")
    if rank == 0:
        (out / "state.json").write_text(json.dumps(asdict(state)))
        save_config(cfg, out / "config.yaml")


def load(engine, ckpt_dir: Path, rank: int = 0) -> LoopState:
    """Restore engine (weights, optimizer, schedule), the loop position and this rank's RNG state."""
    if not (ckpt_dir / "ds").is_dir():
        raise CheckpointError(f"{ckpt_dir} has no DeepSpeed state (ds/); it is not an lbr-ray training checkpoint")
    _, client = engine.load_checkpoint(str(ckpt_dir / "ds"), tag=DS_TAG)
    if client is None:
        raise CheckpointError(f"could not load the DeepSpeed state in {ckpt_dir / 'ds'}")
    rng = ckpt_dir / "rng" / f"rank{rank}.pt"
    if rng.is_file():  # checkpoints from before RNG states were saved resume re-seeded
        import torch

        set_rng_state(torch.load(rng, weights_only=False))
    return LoopState(**client["loop"])


def hf_dir(path: str | Path) -> Path | str:
    """The HF model folder of a run folder, a stage folder, a checkpoint or an exported model (s3:// URIs too)."""
    from lbr_ray.storage import file_info, is_remote, join

    if is_remote(path):
        for sub in ("", "hf", "model", "gr_cl/model", "ib_gl/model", "lm/model"):
            candidate = join(str(path), sub) if sub else str(path).rstrip("/")
            if file_info(join(candidate, MODEL_CARD)).size is not None:
                return candidate
        raise CheckpointError(f"{path} is not an lbr-ray model or checkpoint (no config.json + {MODEL_CARD} found)")
    p = Path(path)
    for candidate in (p, p / "hf", p / "model", p / "gr_cl" / "model", p / "ib_gl" / "model", p / "lm" / "model"):
        if (candidate / "config.json").is_file() and (candidate / MODEL_CARD).is_file():
            return candidate
    raise CheckpointError(f"{path} is not an lbr-ray model or checkpoint (no config.json + {MODEL_CARD} found)")


def local_hf_dir(path: str | Path) -> Path:
    """hf_dir as a local folder: a remote model is downloaded once per process."""
    from lbr_ray.storage import local_copy

    return Path(local_copy(str(hf_dir(path))))
