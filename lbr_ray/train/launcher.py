"""Driver side: embedded or remote Ray, data summary, TorchTrainer per stage, final model folder."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig
from ray.train.v2.api.callback import UserCallback

from lbr_ray.config import LbrConfig, save_config, to_dict, to_yaml
from lbr_ray.errors import CheckpointError, ConfigError, LbrError, find_lbr_error

log = logging.getLogger("lbr_ray")


def ensure_ray(cfg: LbrConfig, address: str | None = None, quiet: bool = False) -> None:
    """Connect to `address`, or start an embedded local Ray sized for the run (logical CPUs may exceed the
    physical ones so Ray Data's tokenizer actors and the Train workers can share a small machine).
    `quiet`: Ray's output goes to the run's log files (lbr_ray.train.console), not to the console."""
    if not ray.is_initialized():
        _init_ray(cfg, address, quiet)
        if quiet:
            from lbr_ray.train import console

            logs = console.quiet_driver(Path(cfg.run.output).expanduser().resolve())
            session = console.link_ray_logs(logs) if not (address or os.environ.get("RAY_ADDRESS")) else None
            where = f"{logs}/driver.log" + (f", {logs}/ray -> {session}" if session else "")
            print(f"[lbr] Ray's own output goes to the log files ({where}; workers: <stage>/logs/); "
                  "--verbose shows it here", flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same files + seed -> same stream (resume skips batches)
    ctx.enable_progress_bars = False


def _init_ray(cfg: LbrConfig, address: str | None, quiet: bool = False) -> None:
    address = address or os.environ.get("RAY_ADDRESS")  # inside a Ray job: the job's cluster
    level = logging.ERROR if quiet else logging.WARNING  # quiet: console.quiet_driver sends the rest to a file
    if address:  # the workers pick their DeepSpeed accelerator themselves (train.worker.WorkerRun)
        ray.init(address=address, log_to_driver=not quiet, logging_level=level)
    else:
        env = {"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}} if not cfg.scaling.use_gpu else {}
        need = int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) + 2
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, runtime_env=env or None,
                 logging_level=level, log_to_driver=not quiet)


class MetricsLog(UserCallback):
    """Appends rank 0's reported metrics to <stage>/metrics.jsonl (runs in the Train controller)."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0]:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(metrics[0]) + "\n")


@dataclass
class StageResult:
    stage: str
    stage_dir: Path
    model_dir: Path
    metrics: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def last(self) -> dict:
        """The last full metrics row (checkpoint-only reports carry just the step)."""
        rows = [m for m in self.metrics if "loss" in m]
        return rows[-1] if rows else {}


def check_output(cfg: LbrConfig, stage: str) -> Path:
    """The stage's folder; an existing run there is continued only with --resume, never overwritten."""
    stage_dir = Path(cfg.run.output).expanduser().resolve() / stage
    has_run = stage_dir.is_dir() and any(stage_dir.glob("checkpoint_*"))
    if has_run and not cfg.run.resume:
        raise ConfigError(f"{stage_dir} already holds a run: pass --resume to continue it, or choose another --output")
    return stage_dir


def prepare_stage_dir(cfg: LbrConfig, stage: str) -> Path:
    stage_dir = check_output(cfg, stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, stage_dir / "config.yaml")
    return stage_dir


def run_stage(cfg: LbrConfig, stage: str, train_fn, datasets: dict, init: str | None = None,
              extra: dict | None = None, t0: float | None = None, callbacks: list | None = None,
              quiet: bool = False) -> StageResult:
    """Run one stage as a TorchTrainer; returns the final HF model folder and the logged metrics.
    `callbacks` are added to the trainer's RunConfig (e.g. ray.tune's TuneReportCallback inside a Tune trial).
    `quiet`: workers write to <stage>/logs/ and <stage>/console.log, whose lines the driver prints."""
    from lbr_ray.train.console import CONSOLE_LOG, Follow
    from lbr_ray.train.pg_cleaner import LbrTorchTrainer

    stage_dir = prepare_stage_dir(cfg, stage)
    start = time.time()
    trainer = LbrTorchTrainer(
        train_fn,
        train_loop_config={"cfg": to_dict(cfg), "t0": t0 or start, "stage_dir": str(stage_dir), "init": init,
                           "quiet": quiet, **(extra or {})},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=stage, storage_path=str(stage_dir.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING") if quiet else None,
                             callbacks=[MetricsLog(stage_dir / "metrics.jsonl"), *(callbacks or [])]),
        datasets=datasets,
    )
    try:
        if quiet:
            with Follow(stage_dir / CONSOLE_LOG):
                result = trainer.fit()
        else:
            result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - surface the LbrError behind Ray's wrappers
        err = find_lbr_error(exc)
        if err is not None:
            raise err from None
        raise
    if result.checkpoint is None:
        raise CheckpointError(f"stage {stage} finished without a checkpoint in {stage_dir}")
    model_dir = stage_dir / "model"
    with result.checkpoint.as_directory() as d:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(Path(d) / "hf", model_dir)
    metrics = read_metrics(stage_dir)
    return StageResult(stage, stage_dir, model_dir, metrics, time.time() - start)


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_config(cfg: LbrConfig) -> None:
    print("[lbr] resolved config:\n" + "\n".join("    " + line for line in to_yaml(cfg).splitlines()), flush=True)


__all__ = ["ensure_ray", "run_stage", "StageResult", "print_config", "LbrError"]
