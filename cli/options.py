"""Option types shared by several commands (declared once, as in huggingface_hub's CLI)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/).", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key, e.g. --set gr_cl.temperature=0.05 (repeatable)."),
]
NumWorkersOpt = Annotated[
    Optional[int], typer.Option("--num-workers", "-n", help="Ray Train workers (overrides scaling.num_workers).")
]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder or s3:// / gs:// URI (overrides "
                                                "run.output).")]
AddressOpt = Annotated[
    Optional[str],
    typer.Option(
        "--address",
        help="Ray cluster to use instead of an embedded local Ray: a dashboard URL (http://host:8265) submits the "
        "command as a Ray job; host:port or 'auto' connects this process to that cluster.",
        rich_help_panel="Cluster",
    ),
]
ClusterOpt = Annotated[
    Optional[Path],
    typer.Option("--cluster", help="Cluster YAML from clusters/: submit the command there as a Ray job.",
                 rich_help_panel="Cluster"),
]
