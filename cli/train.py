"""`lbr train`: parse options, build the config, call lbr_ray.recipes.pipeline.train."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import AddressOpt, ClusterOpt, ConfigOpt, NumWorkersOpt, OutputOpt, SetOpt
from lbr_ray.errors import ConfigError

EXAMPLES = """
Examples:

  lbr train --stage ib-gl --config configs/demo.yaml --num-workers 2

  lbr train --stage all --config configs/demo.yaml --set gr_cl.temperature=0.05

  lbr train --stage ib-gl --config configs/demo.yaml --output runs/demo --resume
"""


def config_with_options(config: Path, overrides: list[str] | None, **options):
    """Load the YAML, apply --set overrides, then the dedicated options (which win)."""
    from lbr_ray.config import load_config

    opts = list(overrides or [])
    mapping = {"num_workers": "scaling.num_workers", "output": "run.output", "resume": "run.resume",
               "variant": "run.variant", "data": "data.pairs"}
    for name, value in options.items():
        if value is not None and value is not False:
            opts.append(f"{mapping[name]}={value}")
    return load_config(config, opts)


def train(
    config: ConfigOpt,
    stage: Annotated[str, typer.Option(help="ib-gl (stage 1), gr-cl (stage 2) or all (both, one output folder).")] = "ib-gl",
    data: Annotated[Optional[str], typer.Option(help="Pairs file, folder or glob (overrides data.pairs).")] = None,
    num_workers: NumWorkersOpt = None,
    output: OutputOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="Stage-1 model or checkpoint to start gr-cl from.")] = None,
    variant: Annotated[Optional[str], typer.Option(help="lbr (default), gl-cl (stage 1 without the bottleneck mask) or cl (contrastive only).")] = None,
    match_compute: Annotated[bool, typer.Option("--match-compute", help="With --variant cl: give stage 2 the two-stage variants' total compute (tokens) as extra steps.")] = False,
    overrides: SetOpt = None,
    address: AddressOpt = None,
    cluster: ClusterOpt = None,
) -> None:
    """Train an LBR model: IB-GL (stage 1), GR-CL (stage 2) or both, on Ray Train + DeepSpeed."""
    t0 = time.time()
    if cluster or (address and address.startswith(("http://", "https://"))):
        from lbr_ray.cluster.jobs import submit_as_job

        raise typer.Exit(submit_as_job(sys.argv[1:], cluster=cluster, address=address))
    from lbr_ray.config.schema import STAGES

    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r} is not one of {list(STAGES)}")
    if data is not None:
        data = f"[{data}]"
    cfg = config_with_options(config, overrides, num_workers=num_workers, output=output, resume=resume,
                              variant=variant, data=data)
    from lbr_ray.recipes.pipeline import train as run_train  # imports Ray, torch: after the cheap checks
    run_train(cfg, stage=stage, init=str(init) if init else None, address=address, t0=t0,
              match_compute=match_compute, announce=False)
    print_result_last(Path(cfg.run.output))


def print_result_last(output: Path) -> None:
    """The run's closing line (dev R@10 next to BM25's), printed after Ray has shut down and flushed the workers'
    log lines, so it is the last thing on the console."""
    import json

    import ray

    ray.shutdown()
    summary = output.expanduser() / "summary.json"
    line = json.loads(summary.read_text()).get("dev_vs_bm25", {}).get("line") if summary.is_file() else None
    if line:
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EXAMPLES)(train)
