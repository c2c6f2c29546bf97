"""`lbr cluster up|down|status|validate FILE`: drive the cluster files in clusters/ (no logic here)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lbr_ray.errors import ConfigError

app = typer.Typer(
    name="cluster",
    help="Start, stop, inspect and check Ray clusters described by the files in clusters/.",
    no_args_is_help=True,
)

FileArg = Annotated[Path, typer.Argument(help="Cluster file: clusters/local.yaml, aws.yaml, gcp.yaml, kuberay/*.yaml.",
                                         show_default=False)]


@app.command(epilog="Examples: lbr cluster up clusters/local.yaml  |  lbr cluster up clusters/aws.yaml")
def up(file: FileArg) -> None:
    """Start the cluster: a head on 127.0.0.1 for local.yaml, Ray's launcher (`ray up`) otherwise."""
    from lbr_ray.cluster.launch import up as _up

    raise typer.Exit(_up(file))


@app.command(epilog="Example: lbr cluster down clusters/local.yaml")
def down(file: FileArg) -> None:
    """Stop the cluster (for local.yaml: only the head lbr started; other Ray instances are left alone)."""
    from lbr_ray.cluster.launch import down as _down

    raise typer.Exit(_down(file))


@app.command(epilog="Example: lbr cluster status clusters/local.yaml")
def status(file: FileArg) -> None:
    """Show whether the cluster is up, its dashboard address and its resources (exit 1 when down)."""
    from lbr_ray.cluster.launch import status as _status

    raise typer.Exit(_status(file))


@app.command(epilog="Example: lbr cluster validate clusters/aws.yaml")
def validate(file: FileArg) -> None:
    """Check a cluster file: launcher YAMLs against Ray's schema, KubeRay manifests for their required keys."""
    from lbr_ray.cluster.validate import validate_file

    try:
        what = validate_file(file)
    except ConfigError as e:
        typer.secho(f"{file}: INVALID", err=True, fg=typer.colors.RED)
        for problem in e.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{file}: valid {what}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="cluster")
