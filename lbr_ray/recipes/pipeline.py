"""`lbr train`: stage 1 (IB-GL), stage 2 (GR-CL) or both, for the variants lbr / gl-cl / cl."""
from __future__ import annotations

import json
import time
from pathlib import Path

from lbr_ray.config import LbrConfig
from lbr_ray.errors import ConfigError
from lbr_ray.data import ray_data
from lbr_ray.train.launcher import StageResult, ensure_ray, print_config, run_stage

STAGES = ("ib-gl", "gr-cl", "all")


def train(cfg: LbrConfig, stage: str = "ib-gl", init: str | None = None, address: str | None = None,
          t0: float | None = None) -> dict[str, StageResult]:
    """Run the requested stage(s) and write <output>/summary.json."""
    t0 = t0 or time.time()
    print_config(cfg)
    preflight(cfg, init)
    ensure_ray(cfg, address)
    summary = ray_data.summarize(cfg)  # streams once: file:line errors or counted skips, split sizes
    for line in summary.lines():
        print(f"[lbr] data: {line}", flush=True)
    results: dict[str, StageResult] = {}
    if stage in ("ib-gl", "all") and cfg.run.variant != "cl":
        from lbr_ray.recipes import ib_gl

        ds = {"train": ray_data.stage1_dataset(cfg, summary.heldout_keys)}
        results["ib_gl"] = run_stage(cfg, "ib_gl", ib_gl.train_fn, ds, init=init, t0=t0)
        _print_stage(results["ib_gl"])
    _write_summary(cfg, summary, results, time.time() - t0)
    return results


def preflight(cfg: LbrConfig, init: str | None = None) -> None:
    """Fail in seconds, before Ray starts: data paths exist, the model and tokenizer load, init is a model."""
    from transformers import AutoConfig

    from lbr_ray.data.readers import resolve_paths
    from lbr_ray.model.bottleneck import load_tokenizer, resolve_model_path
    from lbr_ray.train.checkpoint import hf_dir

    resolve_paths(cfg.data.pairs, "pairs")
    if cfg.data.corpus:
        resolve_paths(cfg.data.corpus, "corpus")
    name = str(hf_dir(init)) if init else cfg.model.name
    load_tokenizer(name, cfg.bottleneck.k_max)
    try:
        AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a model config from {name!r} ({str(e).splitlines()[0]})") from None


def _print_stage(res: StageResult) -> None:
    last = res.last
    figures = {k: round(last[k], 4) for k in ("loss", "tokens_per_s", "steps_per_s", "first_step_s") if k in last}
    print(f"[lbr] {res.stage} done in {res.wall_s:.1f}s: {figures}; model: {res.model_dir}", flush=True)


def _write_summary(cfg: LbrConfig, data, results: dict[str, StageResult], wall_s: float) -> None:
    out = Path(cfg.run.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    doc = {"variant": cfg.run.variant, "wall_s": wall_s,
           "data": {"pairs_by_split": dict(data.pairs_by_split), "corpus": data.corpus,
                    "bad_records": data.bad, "bad_by_file": dict(data.bad_by_file),
                    "bad_examples": data.bad_examples},
           "stages": {k: {"model": str(r.model_dir), "wall_s": r.wall_s, "last": r.last} for k, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(doc, indent=2, default=str))


__all__ = ["train", "STAGES"]
