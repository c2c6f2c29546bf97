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
from lbr_ray import storage
from lbr_ray.train import manifest

log = logging.getLogger("lbr_ray")
_EMBEDDED = False  # this process started its own single-machine Ray (ensure_ray without an address)


def ensure_ray(cfg: LbrConfig, address: str | None = None, quiet: bool = False) -> None:
    """Connect to `address`, or start an embedded local Ray sized for the run (logical CPUs may exceed the
    physical ones so Ray Data's tokenizer actors and the Train workers can share a small machine).
    `quiet`: Ray's output goes to the run's log files (lbr_ray.train.console), not to the console."""
    global _EMBEDDED
    if not ray.is_initialized():
        _EMBEDDED = _init_ray(cfg, address, quiet)
        if _EMBEDDED:
            start_ray_data_actors()
        if quiet:
            from lbr_ray.train import console

            out = cfg.run.output  # a remote output logs into its local staging mirror, like the stage folders
            logs = console.quiet_driver(storage.staging_dir(out) if storage.is_remote(out)
                                        else Path(out).expanduser().resolve())
            session = console.link_ray_logs(logs) if not (address or os.environ.get("RAY_ADDRESS")) else None
            where = f"{logs}/driver.log" + (f", {logs}/ray -> {session}" if session else "")
            print(f"[lbr] Ray's own output goes to the log files ({where}; workers: <stage>/logs/); "
                  "--verbose shows it here", flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same files + seed -> same stream (resume skips batches)
    ctx.enable_progress_bars = False


def _init_ray(cfg: LbrConfig, address: str | None, quiet: bool = False) -> bool:
    """Start or join Ray; True when this process started an embedded single-machine Ray."""
    address = address or os.environ.get("RAY_ADDRESS")  # inside a Ray job: the job's cluster
    level = logging.ERROR if quiet else logging.WARNING  # quiet: console.quiet_driver sends the rest to a file
    if address:  # the workers pick their DeepSpeed accelerator themselves (train.worker.WorkerRun)
        ray.init(address=address, log_to_driver=not quiet, logging_level=level)
        return False
    if not cfg.scaling.use_gpu:  # inherited by the Ray this process starts, so no runtime_env is needed: a job
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # runtime env would keep Ray's prestarted workers unused
    need = int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) + 2
    ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, logging_level=level,
             log_to_driver=not quiet)
    return True


def start_ray_data_actors() -> list:
    """Create Ray Data's two cluster-wide actors (its autoscaling coordinator and its stats actor) from the driver,
    right after it started its own Ray, without waiting for them. Created here they take two of the worker
    processes Ray prestarts for the job; created by the Train controller, whose runtime env differs from the job's,
    each would be a new process started while the stage waits (docs/performance.md). Both are get-if-exists
    singletons, so Ray Data and Ray Train find and use these. Returns their handles (none on a Ray release without
    these functions)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return []
    return [get_or_create_autoscaling_coordinator(), get_or_create_stats_actor()]


REPORT_POLL_S = "0.5"  # Ray Train's default is 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)


def collect_reports_often() -> None:
    """Have Ray Train's controller collect the workers' reports every 0.5 s instead of every 2 s, unless the user
    set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S. A worker holds one uncollected report at a time: `ray.train.report`
    blocks the training loop until the controller's next poll takes the previous one, so a stage that logs more
    often than every 2 s trained at the pace of the polls (the demo: 0.20 s per step instead of 0.11 s, and every
    stage's end waited for a poll; docs/performance.md). Ray passes the variable on to the controller it starts."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)


def worker_threads(cfg: LbrConfig, embedded: bool | None = None) -> int | None:
    """torch threads per Train worker: `scaling.threads_per_worker`, else, on the embedded Ray of this machine, its
    cores split among the workers (Ray alone would give each worker floor(cpus_per_worker) threads: 1 of the 2
    cores for a 1-worker run), else None (Ray's default, for clusters and Tune trials, which share their nodes)."""
    if cfg.scaling.threads_per_worker > 0:
        return cfg.scaling.threads_per_worker
    if (_EMBEDDED if embedded is None else embedded) and not cfg.scaling.use_gpu:
        return max(1, (os.cpu_count() or 1) // cfg.scaling.num_workers)
    return None


class MetricsLog(UserCallback):
    """Appends rank 0's reported metrics to <stage>/metrics.jsonl (runs in the Train controller); with a remote
    output, the file is uploaded at every checkpoint, so an interrupted run's log survives with its checkpoints."""

    def __init__(self, path: Path, remote: str | None = None):
        self.path, self.remote = path, remote

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0]:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(metrics[0]) + "\n")
        if checkpoint is not None and self.remote:
            storage.upload_file(self.path, self.remote)


class ManifestWriter(UserCallback):
    """Writes manifest.json into each persisted checkpoint once every rank has uploaded its files (the last file
    of a checkpoint; resume trusts only checkpoints that have it, see train/manifest.py)."""

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None:
            return
        step = next((m.get("checkpoint_step") for m in metrics if m and "checkpoint_step" in m), None)
        if manifest.write_manifest(checkpoint.filesystem, checkpoint.path, {"step": step}) is None:
            log.warning("checkpoint %s: a rank's files are missing or truncated on the storage; no manifest, "
                        "resume will not use it", checkpoint.path)


def max_failures(cfg: LbrConfig) -> int:
    """run.max_failures, or by default 3 worker-group restarts on a multi-node cluster and 0 on one machine (where
    a crash is a bug to see, not a lost node)."""
    if cfg.run.max_failures is not None:
        return cfg.run.max_failures
    return 3 if sum(1 for n in ray.nodes() if n.get("Alive")) > 1 else 0


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


def stage_paths(cfg: LbrConfig, stage: str) -> tuple[Path, str | None]:
    """(local stage folder, its remote URI or None). With an s3:// / gs:// output the local folder is a staging
    mirror: checkpoints go straight to the storage (Ray Train), the rest is uploaded at the end of the stage."""
    out = cfg.run.output
    if storage.is_remote(out):
        return storage.staging_dir(out) / stage, storage.join(out, stage)
    return Path(out).expanduser().resolve() / stage, None


def check_output(cfg: LbrConfig, stage: str) -> Path:
    """The stage's folder; an existing run there is continued only with --resume, never overwritten."""
    stage_dir, uri = stage_paths(cfg, stage)
    if uri is not None:
        has_run, where = any(n.startswith("checkpoint_") for n in storage.list_dirs(uri)), uri
    else:
        has_run, where = stage_dir.is_dir() and any(stage_dir.glob("checkpoint_*")), str(stage_dir)
    if has_run and not cfg.run.resume:
        raise ConfigError(f"{where} already holds a run: pass --resume to continue it, or choose another --output")
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
    _, uri = stage_paths(cfg, stage)
    remote_log = storage.join(uri, "metrics.jsonl") if uri else None
    if uri is not None:  # resumed: continue the metrics log where the storage has it; the config goes up now
        storage.download_file(remote_log, stage_dir / "metrics.jsonl")
        storage.upload_file(stage_dir / "config.yaml", storage.join(uri, "config.yaml"))
    fs, storage_path = storage.filesystem(uri.rsplit("/", 1)[0]) if uri else (None, str(stage_dir.parent))
    start = time.time()
    collect_reports_often()
    trainer = LbrTorchTrainer(
        train_fn,
        train_loop_config={"cfg": to_dict(cfg), "t0": t0 or start, "stage_dir": str(stage_dir), "stage_uri": uri,
                           "init": init, "quiet": quiet, "threads": worker_threads(cfg), **(extra or {})},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=stage, storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures(cfg)),
                             logging_config=LoggingConfig(log_level="WARNING") if quiet else None,
                             callbacks=[MetricsLog(stage_dir / "metrics.jsonl", remote_log), ManifestWriter(),
                                        *(callbacks or [])]),
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
        raise CheckpointError(f"stage {stage} finished without a checkpoint in {uri or stage_dir}")
    model_dir = stage_dir / "model"
    with result.checkpoint.as_directory() as d:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(Path(d) / "hf", model_dir)
    if uri is not None:
        storage.upload_dir(stage_dir, uri)  # config.yaml, metrics.jsonl, model/ (+ TensorBoard from rank 0)
    metrics = read_metrics(stage_dir)
    return StageResult(stage, stage_dir, model_dir, metrics, time.time() - start)


def worker_resources(cfg: LbrConfig) -> dict:
    """CPUs per worker, plus one unit of `scaling.worker_resource` (a custom node resource) when set, so a
    cluster can pin Train workers to the nodes that carry it (e.g. one worker per node)."""
    res = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.worker_resource:
        res[cfg.scaling.worker_resource] = 1
    return res


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_config(cfg: LbrConfig) -> None:
    print("[lbr] resolved config:\n" + "\n".join("    " + line for line in to_yaml(cfg).splitlines()), flush=True)


__all__ = ["ensure_ray", "run_stage", "StageResult", "print_config", "LbrError"]
