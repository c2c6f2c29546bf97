"""`lbr tune`: parse options, build the config, call lbr_ray.tune.search.run_sweep."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import AddressOpt, ClusterOpt, SetOpt

EXAMPLES = """
Examples:

  lbr tune --config configs/demo.yaml --output runs/tune-demo

  lbr tune --config configs/demo.yaml --set tune.temperature=[0.01,0.05] --set tune.ratio=[8,32]

  lbr tune --config configs/demo.yaml --set tune.search=optuna --num-samples 12

  lbr tune --output runs/tune-demo --resume          # continue an interrupted sweep, finished trials kept
"""


def tune_command(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config with a tune: section (see "
                                                   "configs/demo.yaml). With --resume: default the sweep's saved "
                                                   "config.", show_default=False)] = None,
    overrides: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sweep folder (overrides tune.output).",
                                                   show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted sweep in --output "
                                         "(Tuner.restore): finished trials are kept, unfinished and failed ones "
                                         "run again.")] = False,
    num_samples: Annotated[Optional[int], typer.Option(help="Trials for random/optuna search; repeats of the grid "
                                                       "for grid search (overrides tune.num_samples).",
                                                       show_default=False)] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", "-n", help="Ray Train workers per trial "
                                                       "(overrides tune.workers_per_trial).",
                                                       show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Tune's, Ray's and the trials' own output "
                                          "on the console (by default: one line per trial; the rest goes to "
                                          "SWEEP/logs/ and the trials' folders).")] = False,
    address: AddressOpt = None,
    cluster: ClusterOpt = None,
) -> None:
    """Sweep R (or k) and the temperature with Ray Tune: two-stage trials, ASHA on dev R@10, shared stage 1.

    Each trial trains IB-GL (once per stage-1 config, shared by the trials that differ only in stage-2 settings)
    and GR-CL on Ray Train + DeepSpeed. Writes results.{md,csv,json}, plots, best_config.yaml and the best trial's
    test-split evaluation into the sweep folder.
    """
    t0 = time.time()
    if cluster or (address and address.startswith(("http://", "https://"))):
        from lbr_ray.cluster.jobs import submit_as_job

        raise typer.Exit(submit_as_job(sys.argv[1:], cluster=cluster, address=address))
    cfg = sweep_config(config, overrides, output, resume, num_samples=num_samples, num_workers=num_workers)
    from lbr_ray.tune.search import run_sweep  # imports Ray: after the config errors, which need none

    doc = run_sweep(cfg, resume=resume, address=address, t0=t0, quiet=not verbose)
    best = doc["best"]
    if best:
        test = f", test R@10 {best['test_recall@10']:.4f}" if "test_recall@10" in best else ""
        typer.echo(f"best: {best['trial']} ({best['label']}) {doc['metric']} {best[doc['metric']]:.4f}{test}")
    typer.echo(f"sweep done in {time.time() - t0:.0f}s: {Path(cfg.tune.output) / 'results.md'}")


def sweep_config(config: Optional[Path], overrides: list[str] | None, output: Optional[Path], resume: bool,
                 **options):
    """The YAML (or, for --resume without --config, the sweep's saved config) with --set and the options applied."""
    from lbr_ray.config import load_config
    from lbr_ray.errors import ConfigError

    opts = list(overrides or [])
    if output is not None:
        opts.append(f"tune.output={output}")
    mapping = {"num_samples": "tune.num_samples", "num_workers": "tune.workers_per_trial"}
    opts += [f"{mapping[k]}={v}" for k, v in options.items() if v is not None]
    if config is None:
        if not resume:
            raise ConfigError("--config is required (a YAML with a tune: section, e.g. configs/demo.yaml)")
        sweep = output or Path(load_config(None, opts).tune.output)
        config = sweep / "sweep_config.yaml"
        if not config.is_file():
            raise ConfigError(f"{sweep} holds no sweep to resume (no sweep_config.yaml): check --output")
    return load_config(config, opts)


def register(app: typer.Typer) -> None:
    app.command("tune", epilog=EXAMPLES)(tune_command)
