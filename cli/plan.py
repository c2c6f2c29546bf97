"""`lbr plan`: per-GPU memory and tokens per step of a config, and whether it fits (parse -> lbr_ray.plan)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.options import ConfigOpt, SetOpt

EXAMPLES = """
Examples:

  lbr plan --config configs/qwen2.5-0.5b-medical.yaml --num-workers 4 --gpu-memory 80GiB

  lbr plan --config configs/demo.yaml --set ib_gl.batch_size=64
"""


def plan_command(
    config: ConfigOpt,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", "-n", help="Train workers (GPUs); default "
                                                       "scaling.num_workers.", show_default=False)] = None,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Memory of one GPU, e.g. 80GiB (default: "
                                                      "scaling.gpu_memory, else this machine's first GPU).",
                                                      show_default=False)] = None,
    overrides: SetOpt = None,
) -> None:
    """Estimate per-GPU memory (parameters, gradients, optimizer for the ZeRO stage, activations, logits) and
    tokens per step of both stages; say whether it fits and what to change if not. Exit 1 when it does not fit."""
    from lbr_ray.config import load_config
    from lbr_ray.errors import ConfigError
    from lbr_ray.plan import plan, resolve_gpu_memory

    cfg = load_config(config, list(overrides or []))
    try:
        gpu = resolve_gpu_memory(cfg, gpu_memory)
    except ValueError as e:
        raise ConfigError(f"--gpu-memory: {e}") from None
    plans = plan(cfg, workers=num_workers, gpu_bytes=gpu)
    for p in plans:
        typer.echo("\n".join(p.lines()))
    if gpu is None:
        typer.echo("(no GPU memory given: pass --gpu-memory 80GiB to check the fit)")
    if any(p.fits is False for p in plans):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("plan", epilog=EXAMPLES)(plan_command)
