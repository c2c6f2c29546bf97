"""`lbr convert`: a GGUF file (llama.cpp's format) as an ordinary Hugging Face folder any config can name."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = """
Examples:

  lbr convert SmolLM2-135M-Instruct.Q4_1.gguf --to models/smollm2-135m

  (model.name: some.gguf in a config converts it once into ~/.cache/lbr-ray/gguf/ without this command)
"""


def convert_command(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf file of an architecture transformers reads (llama, "
                                              "qwen2, mistral, ...).", show_default=False)],
    to: Annotated[Path, typer.Option("--to", help="Output folder (replaced if it exists).")],
) -> None:
    """Convert a GGUF model into an HF safetensors folder (quantized weights dequantized to float32), then check
    that the folder's logits equal transformers' own GGUF load on a few texts."""
    from lbr_ray.model.gguf import convert

    typer.echo(f"lbr convert: reading {gguf_file} with transformers (quantized tensors dequantized to float32)")
    r = convert(gguf_file, to, option="GGUF_FILE")
    typer.echo(f"lbr convert: {r['architecture']}, {r['parameters'] / 1e6:.1f}M parameters, vocabulary {r['vocab']}, "
               f"{r['dtype']}; sha256 {r['sha256'][:16]}")
    typer.echo(f"lbr convert: checked: logits of the saved folder equal the GGUF load's on {r['checked_texts']} "
               f"texts (max |difference| {r['max_abs_logit_diff']:g})")
    typer.echo(f"wrote {to} (name it as model.name, or --model with --baseline base)")


def register(app: typer.Typer) -> None:
    app.command("convert", epilog=EXAMPLES)(convert_command)
