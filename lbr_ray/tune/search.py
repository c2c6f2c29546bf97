"""`lbr tune`: a Ray Tune sweep whose trials are real two-stage runs (Ray Train + DeepSpeed), ASHA on dev R@10.

Train V2 pattern (ray doc_code/train_tune_interop.py): the Tuner runs `train_trial` (the train driver function)
once per trial; it builds the stage TorchTrainers itself (run folders named after the trial, no timestamps, so
`Tuner.restore` finds them) and forwards GR-CL's dev metrics to Tune with a TuneReportCallback.

<sweep>/tune/                 Tune's experiment state (restore point)
<sweep>/stage1/<key>/         shared stage-1 models (lbr_ray.tune.stage1)
<sweep>/trials/<trial name>/  each trial's GR-CL run (gr_cl/, summary.json), trial.json, attempts.jsonl
<sweep>/sweep_config.yaml     the resolved base config (resume reads it)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from lbr_ray.config import LbrConfig, config_from_dict, load_config, replace, save_config, to_dict
from lbr_ray.errors import ConfigError
from lbr_ray.tune.cleanup import RecordPlacementGroup, ReleaseStoppedTrials, remove_recorded
from lbr_ray.tune.progress import TrialLines
from lbr_ray.tune.space import param_space, searched, trial_config, trial_label, tuning_config
from lbr_ray.tune.stage1 import ensure_stage1

EXPERIMENT = "tune"  # Tune's run name under the sweep folder (fixed: restore finds it)
DRIVER_CPUS = 0.01  # the trial driver only waits on its TorchTrainer; the Train workers hold the CPUs/GPUs


class DevMetricReport(TuneReportCallback):
    """Forwards rank 0's reports that carry the dev metric to Tune, once per step, with the trial's stage-1 facts.

    GR-CL reports loss rows, checkpoint rows and dev rows (step 0, every eval_every steps, the end); ASHA
    (time_attr = "step") and Tune's strict metric check need every result to carry the metric. The final step is
    not forwarded: the trial reports it itself once the Train run has ended (model saved, workers released), so a
    scheduler decision on the last result cannot kill a run that is still saving."""

    def __init__(self, metric: str, facts: dict, max_steps: int):
        super().__init__()
        self.metric, self.facts, self.max_steps, self.last_step = metric, facts, max_steps, -1

    def after_report(self, run_context, metrics, checkpoint):
        row = metrics[0] if metrics else {}
        step = row.get("step", -1)
        if self.metric not in row or step <= self.last_step or step >= self.max_steps:
            return
        self.last_step = step
        super().after_report(run_context, [{**result_row(row), **self.facts}], None)


def result_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("dev_") or k in ("step", "loss", "emb_std")}


def train_trial(params: dict, base: dict, sweep: str, quiet: bool = True) -> None:
    """One trial (the Tune trainable): stage 1 from the cache (trained here if missing), then GR-CL.
    `quiet`: the Train workers' output goes to the trial's log files (lbr_ray.train.console)."""
    from lbr_ray.recipes.pipeline import train

    name = tune.get_context().get_trial_name()
    trial_dir = Path(sweep) / "trials" / name
    trial_dir.mkdir(parents=True, exist_ok=True)
    cfg = trial_config(config_from_dict(base), params, trial_dir)
    with open(trial_dir / "attempts.jsonl", "a") as fh:  # a restored sweep must not re-run finished trials
        fh.write(json.dumps({"start": time.time(), "params": params}) + "\n")
    init, facts = None, {"stage1_reused": False, "stage1_s": 0.0, "stage1_train_s": 0.0}
    if cfg.run.variant != "cl":
        s1 = ensure_stage1(cfg, Path(sweep) / "stage1", quiet=quiet)
        init = str(s1.model_dir)
        facts = {"stage1_key": s1.key, "stage1_reused": s1.reused, "stage1_s": s1.trial_s,
                 "stage1_train_s": s1.train_s}
    gr_dir = trial_dir / "gr_cl"
    resume = any(gr_dir.glob("checkpoint_*"))  # a restarted trial continues its GR-CL run
    if not resume and gr_dir.exists():
        shutil.rmtree(gr_dir)
    _write_json(trial_dir / "trial.json", {"params": params, **facts, "done": False})
    start = time.time()
    steps = cfg.gr_cl.max_steps
    callbacks = [DevMetricReport(cfg.tune.metric, facts, steps), RecordPlacementGroup(trial_dir)]
    res = train(replace(cfg, run={"resume": resume}), stage="gr-cl", init=init, stage2_callbacks=callbacks,
                quiet=quiet)["gr_cl"]
    final = {**facts, "done": True, "stage2_s": time.time() - start, "model": str(res.model_dir)}
    _write_json(trial_dir / "trial.json", {"params": params, **final})
    last = [m for m in res.metrics if cfg.tune.metric in m and m.get("step") == steps]
    tune.report({**result_row(last[-1] if last else {"step": steps}), **final})


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)


def _trial_name(trial) -> str:
    """Deterministic: the trial's index in the sweep plus its searched values (e.g. 00003_R=32_temperature=0.05)."""
    index = trial.trial_id.rsplit("_", 1)[-1]
    return f"{index}_{trial_label(trial.config)}"


def trainable(cfg: LbrConfig, sweep: Path, quiet: bool = True):
    fn = tune.with_parameters(train_trial, base=to_dict(absolute_paths(cfg)), sweep=str(sweep), quiet=quiet)
    return tune.with_resources(fn, {"cpu": DRIVER_CPUS})


def absolute_paths(cfg: LbrConfig, root: str | None = None) -> LbrConfig:
    """Trials run in their trial folder (Tune's default working dir): make data and local model paths absolute,
    relative ones taken from `root` (default: the current folder)."""
    def absolute(spec: str) -> str:
        return os.path.abspath(os.path.join(root or os.getcwd(), os.path.expanduser(spec)))

    model = absolute(cfg.model.name) if os.path.exists(absolute(cfg.model.name)) else cfg.model.name
    return replace(cfg, model={"name": model}, data={"pairs": tuple(map(absolute, cfg.data.pairs)),
                                                     "corpus": tuple(map(absolute, cfg.data.corpus))})


def concurrency(cfg: LbrConfig) -> int:
    """tune.max_concurrent_trials, or (0) as many trials as the cluster's GPUs / CPUs hold at once."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    t, s = tuning_config(cfg), cfg.scaling
    res = ray.cluster_resources()
    if s.use_gpu:
        return max(1, int(res.get("GPU", 0)) // t.scaling.num_workers)
    return max(1, int((res.get("CPU", 1) - 1) // (t.scaling.num_workers * s.cpus_per_worker)))


def build_tuner(cfg: LbrConfig, sweep: Path, callbacks: list | None = None, quiet: bool = True) -> tune.Tuner:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    if t.asha:
        scheduler = ASHAScheduler(time_attr="step", max_t=tuning_config(cfg).gr_cl.max_steps,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    limit = concurrency(cfg)
    if t.search == "optuna":  # a Searcher: Tune wraps it in a ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg, tune_limit = OptunaSearch(seed=cfg.run.seed), limit
    else:  # grid / random: the generator itself limits (Tune ignores max_concurrent_trials for it)
        search_alg, tune_limit = BasicVariantGenerator(max_concurrent=limit, random_state=cfg.run.seed), None
    tune_config = tune.TuneConfig(metric=t.metric, mode="max", scheduler=scheduler, search_alg=search_alg,
                                  num_samples=t.num_samples, max_concurrent_trials=tune_limit,
                                  trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)
    lines = [TrialLines("tune", expected_trials(cfg), lambda c: f"trial {trial_label(c).replace('_', ' ')}")]
    callbacks = [ReleaseStoppedTrials(sweep / "trials"), *(lines if quiet else []), *(callbacks or [])]
    failures = tune.FailureConfig(max_failures=trial_failures(cfg))
    return tune.Tuner(trainable(cfg, sweep, quiet), param_space=param_space(cfg), tune_config=tune_config,
                      run_config=run_config(sweep, quiet, callbacks, failures))


def run_config(storage: Path, quiet: bool, callbacks: list, failures) -> tune.RunConfig:
    """Tune's RunConfig for a sweep or a study (quiet: lbr's trial lines instead of Tune's output)."""
    return tune.RunConfig(name=EXPERIMENT, storage_path=str(storage), callbacks=callbacks, failure_config=failures,
                          verbose=tune_verbosity(quiet))


def tune_verbosity(quiet: bool) -> int:
    """RunConfig.verbose. Quiet also selects Tune's older reporter (read by Tuner.fit, after Tuner.restore too),
    which prints nothing at 0; the default one prints an experiment box and TensorBoard hints whatever it says."""
    if quiet:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return 0 if quiet else 1


def trial_failures(cfg: LbrConfig) -> int:
    """tune.max_failures, else run.max_failures's rule: a failed trial is retried (from its checkpoints)."""
    from lbr_ray.train.launcher import max_failures

    return cfg.tune.max_failures if cfg.tune.max_failures is not None else max_failures(cfg)


def sweep_dir(cfg: LbrConfig) -> Path:
    return Path(cfg.tune.output).expanduser().resolve()


def saved_config(sweep: Path) -> LbrConfig:
    path = sweep / "sweep_config.yaml"
    if not path.is_file():
        raise ConfigError(f"{sweep} holds no sweep to resume (no sweep_config.yaml): check --output, or start "
                          "the sweep without --resume")
    return load_config(path)


def check_sweep_folder(cfg: LbrConfig, resume: bool) -> Path:
    """Resume needs the sweep's state and the same config; a fresh sweep needs an empty folder."""
    sweep = sweep_dir(cfg)
    started = tune.Tuner.can_restore(str(sweep / EXPERIMENT))
    if resume:
        saved = saved_config(sweep)
        diff = _differences(to_dict(replace(saved, tune={"output": cfg.tune.output})), to_dict(cfg))
        if diff:
            raise ConfigError(f"--resume: the config differs from the one the sweep in {sweep} started with "
                              f"({', '.join(diff[:6])}); resume without --config/--set, or start a new --output")
        if not started:
            raise ConfigError(f"{sweep / EXPERIMENT} holds no Tune state to resume: start the sweep without --resume")
    elif started or (sweep / "sweep_config.yaml").exists():
        raise ConfigError(f"{sweep} already holds a sweep: pass --resume to continue it, or choose another --output")
    steps = tuning_config(cfg).gr_cl.max_steps
    if cfg.tune.asha and cfg.tune.grace_period > steps:
        raise ConfigError(f"tune.grace_period={cfg.tune.grace_period} exceeds the trials' GR-CL steps ({steps})")
    return sweep


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y and key != "resume":
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out


def run_sweep(cfg: LbrConfig, resume: bool = False, address: str | None = None,
              callbacks: list | None = None, t0: float | None = None, quiet: bool = True) -> dict:
    """Run (or resume) the sweep, then write the table, plots, best config and the best trial's test eval.
    `quiet`: the console shows one line per trial; Ray's and the trials' output go to <sweep>/logs and the trials'
    folders."""
    from lbr_ray.recipes.preflight import preflight
    from lbr_ray.train.launcher import ensure_ray, print_config
    from lbr_ray.tune.analysis import write_outputs

    t0 = t0 or time.time()
    sweep = check_sweep_folder(cfg, resume)
    print_config(cfg)
    preflight(replace(cfg, run={"output": str(sweep)}))  # bad data, model or output: one line, before Ray
    sweep.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, sweep / "sweep_config.yaml")
    workers = tuning_config(cfg).scaling.num_workers * max(cfg.tune.max_concurrent_trials, 1)
    # sized for the concurrent trials
    ensure_ray(replace(cfg, scaling={"num_workers": workers}, run={"output": str(sweep)}), address, quiet)
    if resume:  # Tuner.restore brings back the first session's callbacks and console verbosity
        tune_verbosity(quiet)
        tuner = tune.Tuner.restore(str(sweep / EXPERIMENT), trainable=trainable(cfg, sweep, quiet),
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = build_tuner(cfg, sweep, callbacks, quiet)
    try:
        grid = tuner.fit()
    finally:  # an interrupted sweep's running trials were killed: free their workers' resources
        remove_recorded(sweep)
    finished = grid.num_terminated + grid.num_errors == len(grid) >= expected_trials(cfg)
    with open(sweep / "sessions.jsonl", "a") as fh:
        fh.write(json.dumps({"start": t0, "wall_s": time.time() - t0, "resume": resume, "finished": finished}) + "\n")
    if not finished:
        print(f"[lbr] tune: the sweep stopped before all trials ended; continue it with: lbr tune --output {sweep} "
              "--resume", flush=True)
    return write_outputs(cfg, sweep, grid, final=finished)


def expected_trials(cfg: LbrConfig) -> int:
    """Trials in the whole sweep: the grid's size times num_samples, or num_samples for random / optuna."""
    size = 1
    if cfg.tune.search == "grid":
        for values in searched(cfg.tune).values():
            size *= len(values)
    return size * cfg.tune.num_samples


__all__ = ["run_sweep", "build_tuner", "train_trial", "DevMetricReport", "saved_config", "sweep_dir", "EXPERIMENT"]
