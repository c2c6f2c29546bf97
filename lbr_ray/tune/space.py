"""Search space and per-trial configs from the `tune:` section; the stage-1 cache key (no Ray needed).

    searched(cfg.tune)      -> {"bottleneck.ratio": (8.0, 32.0, 96.0), "gr_cl.temperature": (0.01, 0.02, 0.05)}
    param_space(cfg)        -> the same as Ray Tune domains (grid_search / choice / loguniform)
    trial_config(cfg, params, out) -> the LbrConfig one trial trains with
    stage1_key(cfg)         -> sha1 of what stage 1 depends on (not the temperature, not stage-2 settings)
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from lbr_ray.config import LbrConfig, replace, to_dict
from lbr_ray.config.schema import TuneConfig

# tune.<name> -> the config key it sets. R first: Tune varies the first key fastest, so concurrent trials of a
# grid start different stage-1 models instead of waiting for one.
SEARCH_KEYS = {"ratio": "bottleneck.ratio", "k": "bottleneck.k", "temperature": "gr_cl.temperature",
               "lora_r": "model.lora_r", "lr": "gr_cl.lr"}
LOG_KEYS = ("ratio", "temperature", "lr")  # sampled log-uniformly with tune.log_uniform (random / optuna)
SHORT = {"bottleneck.ratio": "R", "bottleneck.k": "k", "gr_cl.temperature": "temperature",
         "model.lora_r": "lora_r", "gr_cl.lr": "lr"}


def searched(t: TuneConfig) -> dict[str, tuple]:
    """Config key -> values, for the keys the sweep searches (empty tuples are not searched)."""
    return {path: tuple(getattr(t, name)) for name, path in SEARCH_KEYS.items() if getattr(t, name)}


def param_space(cfg: LbrConfig) -> dict:
    """Ray Tune's param_space: grid_search for grid; choice (or loguniform with log_uniform) for random/optuna."""
    from ray import tune

    t, space = cfg.tune, {}
    for name, path in SEARCH_KEYS.items():
        values = list(getattr(t, name))
        if not values:
            continue
        if t.search == "grid":
            space[path] = tune.grid_search(values)
        elif t.log_uniform and name in LOG_KEYS:
            space[path] = tune.loguniform(min(values), max(values))
        else:
            space[path] = tune.choice(values)
    return space


def tuning_config(cfg: LbrConfig) -> LbrConfig:
    """The base config with the sweep's step counts, eval interval and workers per trial applied."""
    t = cfg.tune
    ib = {"max_steps": t.ib_gl_steps} if t.ib_gl_steps else {}
    gr = {k: v for k, v in (("max_steps", t.gr_cl_steps), ("eval_every", t.eval_every)) if v}
    workers = {"num_workers": t.workers_per_trial} if t.workers_per_trial else {}
    return replace(cfg, ib_gl=ib, gr_cl=gr, scaling=workers)


def apply_params(cfg: LbrConfig, params: dict) -> LbrConfig:
    """Set each searched key (`section.name` -> value) on the config; a searched R clears a fixed k."""
    sections: dict[str, dict] = {}
    for path, value in params.items():
        section, name = path.split(".")
        if path not in SHORT:
            raise KeyError(f"{path} is not a searchable key ({', '.join(SHORT)})")
        sections.setdefault(section, {})[name] = _typed(name, value)
    if "ratio" in sections.get("bottleneck", {}):
        sections["bottleneck"]["k"] = None
    return replace(cfg, **sections)


def trial_config(cfg: LbrConfig, params: dict, output: str | Path) -> LbrConfig:
    """What one trial trains with: tuning steps/workers, the trial's values, its own output folder."""
    return replace(apply_params(tuning_config(cfg), params), run={"output": str(output), "resume": False})


def final_config(cfg: LbrConfig, params: dict, output: str | Path) -> LbrConfig:
    """The base config (full training steps) with the best trial's values: for `lbr train --config`."""
    return replace(apply_params(cfg, params), run={"output": str(output), "resume": False})


def stage1_fields(cfg: LbrConfig) -> dict:
    """Everything stage 1's result depends on: model, bottleneck (not pooling; no R with a fixed k), data, ib_gl,
    DeepSpeed, workers (the global batch), seed and variant. Not gr_cl (temperature, lr), not run.output."""
    d = to_dict(cfg)
    bottleneck = {k: v for k, v in d["bottleneck"].items() if k != "pooling"}
    if bottleneck["k"] is not None:
        bottleneck["ratio"] = None
    return {"model": d["model"], "bottleneck": bottleneck, "data": d["data"], "ib_gl": d["ib_gl"],
            "deepspeed": d["deepspeed"],
            "scaling": {"num_workers": cfg.scaling.num_workers, "use_gpu": cfg.scaling.use_gpu},
            "run": {"seed": cfg.run.seed, "variant": cfg.run.variant}}


def stage1_key(cfg: LbrConfig) -> str:
    blob = json.dumps(stage1_fields(cfg), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def k_max_for(cfg: LbrConfig) -> int:
    """The most bottleneck tokens a trial's texts get: k for the longest admissible input."""
    b = cfg.bottleneck
    if b.k is not None:
        return b.k
    return min(max(math.ceil(cfg.data.max_input_tokens / b.ratio), b.k_min), b.k_max)


def trial_label(params: dict) -> str:
    """e.g. 'R=32_temperature=0.05' (file-name safe)."""
    return "_".join(f"{SHORT.get(k, k)}={_fmt(v)}" for k, v in params.items()) or "base"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _typed(name: str, value):
    return int(value) if name in ("k", "lora_r") else float(value)


__all__ = ["SEARCH_KEYS", "searched", "param_space", "tuning_config", "apply_params", "trial_config",
           "final_config", "stage1_fields", "stage1_key", "k_max_for", "trial_label"]
