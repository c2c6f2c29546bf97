"""Stage-1 reuse: trials with the same stage-1 config share one IB-GL model, trained once.

<sweep>/stage1/<key>/        the IB-GL run (ib_gl/ checkpoints, ib_gl/model/, summary.json)
<sweep>/stage1/<key>/DONE.json  written last (atomic rename): model path, training time, the hashed fields
<sweep>/stage1/<key>.lock    held while a trial trains or checks that entry (concurrent trials wait, not retrain)
<sweep>/stage1/runs.jsonl    one line per stage-1 training run (tests count them)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from lbr_ray.config import LbrConfig, replace
from lbr_ray.tune.space import stage1_fields, stage1_key

MARKER = "DONE.json"


@dataclass(frozen=True)
class Stage1:
    key: str
    model_dir: Path
    reused: bool  # the model was already in the cache when this trial asked for it
    train_s: float  # how long training it took (once, in whichever trial trained it)
    trial_s: float  # how long this trial spent on stage 1 (training, or waiting for the lock and reading)


def read_marker(folder: Path) -> dict | None:
    path = folder / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_stage1(cfg: LbrConfig, cache: str | Path, quiet: bool = False) -> Stage1:
    """Return the cached stage-1 model for this config, training it first if no trial has.

    An interrupted stage-1 run (checkpoints but no marker) is resumed from its last checkpoint."""
    start = time.time()
    key = stage1_key(cfg)
    cache = Path(cache)
    folder = cache / key
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{key}.lock")):
        marker = read_marker(folder)
        reused = marker is not None
        if marker is None:
            marker = _train(cfg, folder, key, quiet)
            with open(cache / "runs.jsonl", "a") as fh:
                fh.write(json.dumps({"key": key, "train_s": marker["train_s"], "pid": os.getpid()}) + "\n")
    return Stage1(key, folder / marker["model"], reused, marker["train_s"], time.time() - start)


def _train(cfg: LbrConfig, folder: Path, key: str, quiet: bool = False) -> dict:
    """Stage 1 as `lbr train --stage ib-gl` runs it (data summary, Ray Data stream, IB-GL TorchTrainer), with the
    run's placement group recorded (lbr_ray.tune.cleanup)."""
    from lbr_ray.data import ray_data
    from lbr_ray.recipes import ib_gl
    from lbr_ray.recipes.pipeline import preflight
    from lbr_ray.train.launcher import run_stage
    from lbr_ray.tune.cleanup import RecordPlacementGroup

    print(f"[lbr] tune: training stage 1 for {key} in {folder}", flush=True)
    start = time.time()
    cfg = replace(cfg, run={"output": str(folder), "resume": True})  # resume: an interrupted run continues
    summary = preflight(cfg) or ray_data.summarize(cfg)  # small local data: the preflight's one read
    ds = {"train": ray_data.stage1_dataset(cfg, summary.heldout_keys)}
    res = run_stage(cfg, "ib_gl", ib_gl.train_fn, ds, t0=start, callbacks=[RecordPlacementGroup(folder)],
                    quiet=quiet)
    marker = {"key": key, "model": str(res.model_dir.relative_to(folder.resolve())), "train_s": time.time() - start,
              "last": res.last, "data": summary.lines(), "fields": stage1_fields(cfg)}
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2, default=str))
    tmp.replace(folder / MARKER)
    print(f"[lbr] tune: stage 1 {key} trained in {marker['train_s']:.1f}s", flush=True)
    return marker


__all__ = ["Stage1", "ensure_stage1", "read_marker", "MARKER"]
