"""`lbr train`: parse options, build the config, call lbr_ray.recipes.pipeline.train."""
from __future__ import annotations

import json
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

  lbr train --stage lm --config configs/study/base-general.yaml      # pre-train a base model on a domain mixture
"""


def config_with_options(config: Path, overrides: list[str] | None, **options):
    """Load the YAML, apply --set overrides, then the dedicated options (which win)."""
    from lbr_ray.config import load_config

    opts = list(overrides or [])
    mapping = {"num_workers": "scaling.num_workers", "output": "run.output", "resume": "run.resume",
               "variant": "run.variant"}
    for name, value in options.items():
        if value is not None and value is not False:
            opts.append(f"{mapping[name]}={value}")
    return load_config(config, opts)


def data_overrides(data: str, overrides: list[str]) -> list[str]:
    """`--data` means exactly the data named: its pairs, and the corpus files in that folder (none if it has
    none), never the config's own corpus; an explicit `--set data.corpus=...` still wins."""
    from lbr_ray.data.readers import resolve_paths
    from lbr_ray.errors import DataError

    opts = [f"data.pairs={json.dumps([data])}"]
    if not any(o.split("=", 1)[0].strip() == "data.corpus" for o in overrides):
        try:
            has_corpus = any(Path(f).name.startswith("corpus") for f in resolve_paths(data, "corpus"))
        except DataError:
            has_corpus = False
        opts.append(f"data.corpus={json.dumps([data] if has_corpus else [])}")
    return opts + overrides


def train(
    config: ConfigOpt,
    stage: Annotated[str, typer.Option(help="ib-gl (stage 1), gr-cl (stage 2), all (both, one output folder) or lm "
                                            "(causal-LM pre-training on the lm.sources mixture).")] = "ib-gl",
    data: Annotated[Optional[str], typer.Option(help="Pairs file, folder, glob, s3:// URI or `datasets` save_to_disk "
                                                "folder: replaces data.pairs, and data.corpus by the folder's corpus* "
                                                "files (none if it has none).")] = None,
    num_workers: NumWorkersOpt = None,
    output: OutputOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")] = False,
    init: Annotated[Optional[str], typer.Option(help="Stage-1 model or checkpoint to start gr-cl from.")] = None,
    variant: Annotated[Optional[str], typer.Option(help="lbr (default), gl-cl (stage 1 without the bottleneck mask) or cl (contrastive only).")] = None,
    match_compute: Annotated[bool, typer.Option("--match-compute", help="With --variant cl: give stage 2 the two-stage variants' total compute (tokens) as extra steps.")] = False,
    overrides: SetOpt = None,
    address: AddressOpt = None,
    cluster: ClusterOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's, DeepSpeed's and the workers' own output on the console (by default it goes to the run's log files: RUN/logs/, RUN/<stage>/logs/).")] = False,
) -> None:
    """Train an LBR model: IB-GL (stage 1), GR-CL (stage 2) or both, on Ray Train + DeepSpeed."""
    t0 = time.time()
    if cluster or (address and address.startswith(("http://", "https://"))):
        from lbr_ray.cluster.jobs import submit_as_job

        raise typer.Exit(submit_as_job(sys.argv[1:], cluster=cluster, address=address))
    from lbr_ray.config.schema import STAGES

    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r} is not one of {list(STAGES)}")
    overrides = list(overrides or [])
    if data is not None:
        overrides = data_overrides(data, overrides)
    cfg = config_with_options(config, overrides, num_workers=num_workers, output=output, resume=resume,
                              variant=variant)
    from lbr_ray.recipes.pipeline import train as run_train  # imports Ray, torch: after the cheap checks
    run_train(cfg, stage=stage, init=str(init) if init else None, address=address, t0=t0,
              match_compute=match_compute, quiet=not verbose, announce=False)
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
