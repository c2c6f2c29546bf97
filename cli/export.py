"""`lbr export`: a trained model as a merged Hugging Face + sentence-transformers folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lbr_ray.export.fixed_k import DEFAULT_MAX_LOSS

EXAMPLES = """
Examples:

  lbr export runs/demo --to runs/demo-st              # R-based k: measures every fixed k, exports the best

  lbr export runs/demo --to runs/demo-st --k 1 --max-loss 0.05

  lbr export runs/demo --to runs/demo-st --k 4 --force   # export even though k=4 loses more than --max-loss
"""


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder, stage folder, checkpoint or model folder.")],
    to: Annotated[Path, typer.Option("--to", help="New output folder.")],
    k: Annotated[Optional[int], typer.Option(help="Pin the number of bottleneck tokens (default: with R-based k, "
                                             "the fixed k with the best dev R@10).", show_default=False)] = None,
    max_loss: Annotated[float, typer.Option(help="Refuse an export whose fixed k loses more than this dev R@10 "
                                            "(absolute) against the run's per-text k.")] = DEFAULT_MAX_LOSS,
    force: Annotated[bool, typer.Option("--force", help="Export even when the loss exceeds --max-loss.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="The run's config (its dev set); default: the config.yaml "
                                                   "saved next to the model.", show_default=False)] = None,
) -> None:
    """Export a trained model: loads with AutoModelForCausalLM, SentenceTransformer and lbr_ray.Encoder.

    sentence-transformers needs one fixed k. When the model's k follows R and varies with text length, export
    measures dev R@10 of the run's per-text k and of each fixed k on the run's dev set, prints the table and what
    the exported k loses, and refuses a loss above --max-loss unless --force (lbr_ray.Encoder keeps R exact).
    """
    from lbr_ray.export.sentence_transformers import export as run_export

    out = run_export(checkpoint, to, k, max_loss=max_loss, force=force, config=config, log=typer.echo)
    typer.echo(f"exported to {out}: SentenceTransformer('{out}').encode(texts)")


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EXAMPLES)(export)
