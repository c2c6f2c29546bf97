"""YAML + `a.b=c` overrides -> typed LbrConfig, with every problem reported at once."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lbr_ray.config.schema import CHOICES, SPLIT_KEYS, LbrConfig
from lbr_ray.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LbrConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    source = str(path) if path else None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    for item in overrides or []:
        _apply_override(raw, item)
    problems: list[str] = []
    cfg = _build(LbrConfig, raw, "", problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_from_dict(raw: dict) -> LbrConfig:
    """Rebuild a config from `to_dict` output (workers get plain dicts, never globals)."""
    problems: list[str] = []
    cfg = _build(LbrConfig, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def with_overrides(cfg: LbrConfig, overrides: list[str] | tuple[str, ...]) -> LbrConfig:
    """`cfg` with `key=value` overrides applied and checked as `load_config` checks a file's."""
    raw = to_dict(cfg)
    for item in overrides:
        _apply_override(raw, item)
    problems: list[str] = []
    out = _build(LbrConfig, raw, "", problems)
    problems += validate(out) if not problems else []
    if problems:
        raise ConfigError(problems)
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def replace(cfg: LbrConfig, **sections) -> LbrConfig:
    """Return a copy with fields of sections replaced, e.g. replace(cfg, run={"output": "x"})."""
    return dataclasses.replace(
        cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    )


def validate(cfg: LbrConfig) -> list[str]:
    problems = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {list(allowed)}")
    b = cfg.bottleneck
    if b.k is None and (b.ratio is None or b.ratio <= 0):
        problems.append(f"bottleneck.ratio (R) must be > 0, got {b.ratio}")
    if b.k is not None and b.k < 1:
        problems.append(f"bottleneck.k must be >= 1, got {b.k}")
    if not 1 <= b.k_min <= b.k_max:
        problems.append(f"need 1 <= bottleneck.k_min <= bottleneck.k_max, got {b.k_min}, {b.k_max}")
    if b.k is not None and b.k > b.k_max:
        problems.append(f"bottleneck.k={b.k} exceeds bottleneck.k_max={b.k_max}")
    lm = cfg.lm
    if lm.weights and len(lm.weights) != len(lm.sources):
        problems.append(f"lm.weights has {len(lm.weights)} values for {len(lm.sources)} lm.sources")
    if any(w <= 0 for w in lm.weights):
        problems.append(f"lm.weights must be positive numbers, got {list(lm.weights)}")
    if lm.seq_len < 2 or lm.tokenizer_vocab < 0:
        problems.append(f"lm.seq_len must be >= 2 and lm.tokenizer_vocab >= 0, got {lm.seq_len}, {lm.tokenizer_vocab}")
    for stage in ("ib_gl", "gr_cl", "lm"):
        s = getattr(cfg, stage)
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(s, name) < 1:
                problems.append(f"{stage}.{name} must be >= 1, got {getattr(s, name)}")
        if s.lr <= 0:
            problems.append(f"{stage}.lr must be > 0, got {s.lr}")
    if cfg.gr_cl.temperature <= 0:
        problems.append(f"gr_cl.temperature must be > 0, got {cfg.gr_cl.temperature}")
    if cfg.gr_cl.length_groups < 0:
        problems.append(f"gr_cl.length_groups must be >= 0 (0 = off), got {cfg.gr_cl.length_groups}")
    if cfg.model.attn_implementation not in ("", "sdpa", "eager"):
        problems.append(f"model.attn_implementation={cfg.model.attn_implementation!r} is not one of "
                        "['sdpa', 'eager'] ('' = the backend's own)")
    elif cfg.model.attn_implementation and cfg.model.attn_backend == "flex":
        problems.append("model.attn_implementation is for the dense and kv_split backends; flex runs FlexAttention")
    if cfg.gr_cl.cache_chunk < 0:
        problems.append(f"gr_cl.cache_chunk must be >= 0 (0 = off), got {cfg.gr_cl.cache_chunk}")
    if cfg.gr_cl.cache_chunk > 0 and cfg.gr_cl.grad_accum > 1:
        problems.append(f"gr_cl.cache_chunk={cfg.gr_cl.cache_chunk} with gr_cl.grad_accum={cfg.gr_cl.grad_accum}: "
                        "GradCache takes the whole batch in one step; set grad_accum: 1 and raise batch_size")
    if cfg.model.attn_backend == "flex" and not cfg.scaling.use_gpu:
        problems.append("model.attn_backend=flex trains only on GPU (FlexAttention has no CPU backward); "
                        "use dense or kv_split on CPU")
    for key, value in (("run.max_failures", cfg.run.max_failures), ("tune.max_failures", cfg.tune.max_failures)):
        if value is not None and value < -1:
            problems.append(f"{key} must be >= -1 (-1 = unlimited), got {value}")
    if cfg.scaling.num_workers < 1:
        problems.append(f"scaling.num_workers must be >= 1, got {cfg.scaling.num_workers}")
    if cfg.data.split.key not in SPLIT_KEYS:
        problems.append(f"data.split.key={cfg.data.split.key!r} is not one of {list(SPLIT_KEYS)}")
    if cfg.data.max_input_tokens < 1 or cfg.data.max_target_tokens < 1:
        problems.append("data.max_input_tokens and data.max_target_tokens must be >= 1")
    problems += _validate_pack(cfg)
    return problems + _validate_tune(cfg)


def _validate_pack(cfg: LbrConfig) -> list[str]:
    if not cfg.ib_gl.pack:
        return []
    from lbr_ray.layout import max_unit_length

    problems = []
    if cfg.model.attn_backend == "kv_split":
        problems.append("ib_gl.pack: true needs model.attn_backend dense or flex (kv_split runs one unit per row)")
    longest = max_unit_length(cfg.data.max_input_tokens, cfg.data.max_target_tokens, cfg.bottleneck.k_max)
    if cfg.ib_gl.pack_length and cfg.ib_gl.pack_length < longest:
        problems.append(f"ib_gl.pack_length={cfg.ib_gl.pack_length} is shorter than the longest unit ({longest} = 1 + "
                        "data.max_input_tokens + bottleneck.k_max + data.max_target_tokens)")
    return problems


def pack_length(cfg: LbrConfig) -> int | None:
    """Tokens per packed IB-GL row, or None when stage 1 does not pack."""
    if not cfg.ib_gl.pack:
        return None
    from lbr_ray.layout import max_unit_length

    return cfg.ib_gl.pack_length or max_unit_length(cfg.data.max_input_tokens, cfg.data.max_target_tokens,
                                                    cfg.bottleneck.k_max)


def compute_dtype(cfg: LbrConfig) -> str:
    """The dtype training computes in: bfloat16 under `deepspeed.bf16` (DeepSpeed casts the model, whatever
    `model.dtype`), else `model.dtype`. MFU's peak and `lbr plan`'s bytes per weight follow it."""
    return "bfloat16" if cfg.deepspeed.bf16 else cfg.model.dtype


def _validate_tune(cfg: LbrConfig) -> list[str]:
    t, problems = cfg.tune, []
    for key, allowed in (("search", ("grid", "random", "optuna")), ("metric", ("dev_recall@10", "dev_ndcg@10"))):
        if getattr(t, key) not in allowed:
            problems.append(f"tune.{key}={getattr(t, key)!r} is not one of {list(allowed)}")
    if t.ratio and t.k:
        problems.append("tune.ratio and tune.k are alternatives: search R or a fixed k, not both")
    for key in ("ratio", "temperature", "lr"):
        if any(v <= 0 for v in getattr(t, key)):
            problems.append(f"tune.{key} values must be > 0, got {list(getattr(t, key))}")
    if any(not 1 <= k <= cfg.bottleneck.k_max for k in t.k):
        problems.append(f"tune.k values must be in 1..bottleneck.k_max={cfg.bottleneck.k_max}, got {list(t.k)}")
    if any(r < 1 for r in t.lora_r) or (t.lora_r and not cfg.model.lora):
        problems.append(f"tune.lora_r needs model.lora: true and values >= 1, got {list(t.lora_r)}")
    if t.log_uniform and t.search != "grid":
        problems += [f"tune.log_uniform: tune.{key} needs exactly 2 values (low, high), got {list(getattr(t, key))}"
                     for key in ("ratio", "temperature", "lr") if len(getattr(t, key)) not in (0, 2)]
    for key in ("num_samples", "grace_period", "workers_per_trial", "ib_gl_steps", "gr_cl_steps", "eval_every",
                "test_max_queries", "test_max_corpus"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            problems.append(f"tune.{key} must be >= 1, got {getattr(t, key)}")
    for key in ("max_concurrent_trials", "eval_workers"):
        if getattr(t, key) < 0:
            problems.append(f"tune.{key} must be >= 0, got {getattr(t, key)}")
    if t.reduction_factor <= 1:
        problems.append(f"tune.reduction_factor must be > 1, got {t.reduction_factor}")
    return problems


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. gr_cl.temperature=0.05)")
    key, value = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            problems.append(f"unknown key {prefix}{key} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name in fields & raw.keys():
        value, hint = raw[name], hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", problems)
        else:
            ok, converted = _coerce(value, hint)
            if ok:
                kwargs[name] = converted
            else:
                problems.append(f"{prefix}{name}={value!r} should be {_type_name(hint)}")
    return cls(**kwargs)


def _coerce(value, hint) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        out = []
        for item in items:
            ok, v = _coerce(item, args[0])
            if not ok:
                return False, None
            out.append(v)
        return True, tuple(out)
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    return True, value


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
