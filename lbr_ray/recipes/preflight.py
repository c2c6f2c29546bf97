"""Checks that fail in seconds, before Ray starts (no Ray): data, output location, model, tokenizer, --init.

Each problem is one LbrError naming the file or the option; docs/errors.md lists every kind with its message.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lbr_ray.config import LbrConfig, load_config
from lbr_ray.errors import ConfigError, DataError
from lbr_ray.plan import check_fits

CHECKPOINTS_KEPT = 2  # launcher's CheckpointConfig(num_to_keep=2)


def preflight(cfg: LbrConfig, init: str | None = None, stages: tuple[str, ...] = ()):
    """Data files exist and hold records, the output location takes the run, the model, tokenizer and --init
    fit the config, and a resumed run continues the same model. Returns the data summary when the data was small
    and local enough to be read here (lbr_ray.data.summary), else None."""
    from transformers import AutoConfig

    from lbr_ray.model.bottleneck import load_tokenizer, resolve_model_path
    from lbr_ray.train.checkpoint import hf_dir

    summary = check_data(cfg)
    name = str(hf_dir(init)) if init else cfg.model.name
    try:
        model_config = AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a model config from {name!r} ({str(e).splitlines()[0]})") from None
    check_positions(cfg, model_config)
    load_tokenizer(name, cfg.bottleneck.k_max)
    if init:
        check_init(cfg, Path(resolve_model_path(name)))
    check_fits(cfg, stages)  # `lbr plan`'s estimate: a run that cannot fit the GPUs stops here, before the disk check
    check_output_location(cfg.run.output, checkpoint_bytes(cfg, model_config) * (CHECKPOINTS_KEPT + 1))
    if "gr_cl" in stages and cfg.gr_cl.cache_chunk:
        check_gradcache(cfg)
    if cfg.run.resume:
        for stage in stages:
            check_resume_config(cfg, stage)
    return summary


def check_gradcache(cfg: LbrConfig) -> None:
    """GradCache under ZeRO-1/2/3 needs a DeepSpeed with coalesce_grad_reduction (the workers check their own)."""
    from importlib.metadata import version

    from lbr_ray.train.gradcache import deepspeed_problem

    problem = deepspeed_problem(cfg.deepspeed.zero_stage, version("deepspeed"))
    if problem:
        raise ConfigError(problem)


def check_data(cfg: LbrConfig):
    """Every pairs/corpus file exists and holds records (an empty file is an error, never 'no data'). Small local
    data is also read record by record here, so its errors (file:line) come before Ray starts, and that one read
    is the run's data summary (returned; None for larger or remote data, which Ray Data's first pass,
    ray_data.summarize, validates with the same messages)."""
    from lbr_ray.data.readers import has_records
    from lbr_ray.data.summary import input_files, small_local

    files = input_files(cfg)
    for path, kind in files.items():
        try:
            empty = not has_records(path)
        except OSError as e:
            raise DataError(path, None, f"cannot read file ({str(e).splitlines()[0]})") from None
        if empty:
            raise DataError(path, None, f"the {kind} file is empty (no records); remove it or fill it")
    return validate_records(cfg, files) if small_local(files) else None


def validate_records(cfg: LbrConfig, files: dict[str, str]):
    """Read every record once: the first bad one stops (on_bad_record=error); with skip, all-bad data stops.
    Returns the DataSummary of what was read."""
    from lbr_ray.data.summary import summarize_files

    summary = summarize_files(cfg, files)
    if not sum(summary.pairs_by_split.values()):
        pairs = [f for f, k in files.items() if k == "pairs"]
        skipped = sum(summary.bad_by_file[f] for f in pairs)
        example = next((e for e in summary.bad_examples if any(e.startswith(f"{f}:") for f in pairs)), "-")
        raise DataError(", ".join(pairs), None, f"every pairs record was skipped as bad ({skipped}; "
                        f"data.on_bad_record=skip), e.g. {example}")
    return summary


def check_positions(cfg: LbrConfig, model_config) -> None:
    """The longest row, [sink][x][b_1..b_k_max][y], must fit the model's position range."""
    limit = getattr(model_config, "max_position_embeddings", None)
    d, b = cfg.data, cfg.bottleneck
    longest = 1 + d.max_input_tokens + b.k_max + d.max_target_tokens
    if limit is not None and longest > limit:
        raise ConfigError(f"bottleneck.k_max={b.k_max}: rows of up to 1 + {d.max_input_tokens} + {b.k_max} + "
                          f"{d.max_target_tokens} = {longest} tokens exceed the model's max_position_embeddings="
                          f"{limit}; lower bottleneck.k_max or data.max_input_tokens / max_target_tokens")


def check_init(cfg: LbrConfig, model_dir: Path) -> None:
    """--init must be an lbr-ray model of the configured kind: same bottleneck tokens, same architecture."""
    from transformers import AutoConfig

    from lbr_ray.model.bottleneck import resolve_model_path
    from lbr_ray.train.checkpoint import MODEL_CARD

    card = json.loads((model_dir / MODEL_CARD).read_text())
    if card.get("k_max") != cfg.bottleneck.k_max:
        raise ConfigError(f"--init {model_dir}: trained with bottleneck.k_max={card.get('k_max')}, the config has "
                          f"{cfg.bottleneck.k_max}; use the stage-1 model of this config or set bottleneck.k_max")
    try:
        base = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name))
    except (OSError, ValueError):
        return  # a hub name offline: nothing local to compare with
    init = AutoConfig.from_pretrained(model_dir)
    mine = (base.model_type, getattr(base, "hidden_size", None), getattr(base, "num_hidden_layers", None))
    theirs = (init.model_type, getattr(init, "hidden_size", None), getattr(init, "num_hidden_layers", None))
    if mine != theirs:
        raise ConfigError(f"--init {model_dir} is a {theirs[0]} model (hidden {theirs[1]}, {theirs[2]} layers) but "
                          f"model.name {cfg.model.name!r} is {mine[0]} (hidden {mine[1]}, {mine[2]} layers): pass "
                          "the stage-1 model trained from this config's model")


def checkpoint_bytes(cfg: LbrConfig, model_config) -> int:
    """One checkpoint on disk: HF weights + DeepSpeed module weights + fp32 master copy and Adam moments."""
    from lbr_ray.plan import count_params

    params, trainable = count_params(cfg, model_config)
    width = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    return params * width * 2 + trainable * 12


def check_output_location(output: str, need_bytes: int = 0) -> None:
    """The output folder can be created and written, and its disk holds the run's checkpoints."""
    from lbr_ray.storage import file_info, is_remote

    if is_remote(output):
        check_remote_output(output)
        return
    path = Path(output).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output {output}: {existing} is a file, not a folder; choose another --output")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".lbr-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot write in {existing} ({e.strerror or e}); choose another "
                          "--output") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ConfigError(f"--output {output}: {free / 2**30:.2f} GiB free on its disk, the run's checkpoints need "
                          f"about {need_bytes / 2**30:.2f} GiB; free space or choose another --output")


def check_remote_output(output: str) -> None:
    """The bucket exists and takes a write (a probe object, removed again) with these credentials."""
    from pyarrow import fs as pafs

    from lbr_ray.storage import file_info, filesystem, join

    file_info(output)  # names the output when the endpoint cannot be reached
    bucket = output.split("://", 1)[0] + "://" + output.split("://", 1)[1].split("/", 1)[0]
    if file_info(bucket).type == pafs.FileType.NotFound:
        raise ConfigError(f"--output {output}: the bucket {bucket} does not exist (or these credentials cannot see "
                          "it); create it first")
    fs, probe = filesystem(join(output, ".lbr-write-test"))
    try:
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot write there ({str(e).splitlines()[0]})") from None


def check_resume_config(cfg: LbrConfig, stage: str) -> None:
    """--resume continues the same model: a stage folder trained from another model is refused."""
    from lbr_ray.storage import is_remote

    if is_remote(cfg.run.output):
        return
    saved = Path(cfg.run.output).expanduser() / stage / "config.yaml"
    if not saved.is_file():
        return
    old = load_config(saved)
    for key in ("model.name", "model.lora", "bottleneck.k_max", "deepspeed.zero_stage", "scaling.num_workers"):
        section, name = key.split(".")
        before, now = getattr(getattr(old, section), name), getattr(getattr(cfg, section), name)
        if before != now:
            raise ConfigError(f"--resume: {saved.parent} was trained with {key}={before!r}, the config has {now!r}; "
                              "resume with the run's own config or choose another --output")
