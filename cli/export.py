"""`lbr export`: a trained model as a merged Hugging Face + sentence-transformers folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder, stage folder, checkpoint or model folder.")],
    to: Annotated[Path, typer.Option("--to", help="New output folder.")],
    k: Annotated[Optional[int], typer.Option(help="Pin the number of bottleneck tokens (needed when k follows R).")] = None,
) -> None:
    """Export a trained model: loads with AutoModelForCausalLM, SentenceTransformer and lbr_ray.Encoder."""
    from lbr_ray.export.sentence_transformers import export as run_export

    out = run_export(checkpoint, to, k)
    typer.echo(f"exported to {out}: SentenceTransformer('{out}').encode(texts)")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
