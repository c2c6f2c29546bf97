"""`lbr mine`: hard negatives for the training pairs (parse -> options -> lbr_ray.data.mine)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

EXAMPLES = """
Examples:

  lbr mine ../shared/data/medical --output runs/mined/medical-bm25.jsonl.gz            # BM25, default window

  lbr mine ../shared/data/medical --baseline minilm --output runs/mined/medical-minilm.jsonl.gz

  lbr mine data/demo/medical --model runs/demo --range-min 2 --range-max 100 --sampling random --negatives 8
           --output runs/mined/medical-demo.jsonl.gz

  then train with them: --set data.pairs=runs/mined/medical-minilm.jsonl.gz --set gr_cl.hard_negatives=1
"""

Panel = "Which candidates are negatives"


def mine_command(
    pairs: Annotated[list[str], typer.Argument(help="Pairs files, folders (their pairs* files) or globs.",
                                               show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The mined pairs, *.jsonl.gz (next to it: "
                                         "<name>.mine.json with the settings and counts).", show_default=False)],
    corpus: Annotated[Optional[list[str]], typer.Option(help="Corpus files/folders/globs of the candidate pool "
                                                        "(repeatable; default: the corpus* files of the PAIRS "
                                                        "folders).", show_default=False)] = None,
    baseline: Annotated[Optional[str], typer.Option(help="bm25 | minilm | base (with --model) ranks the pool; "
                                                    "default bm25 unless --model is given.",
                                                    show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="A trained lbr-ray or sentence-transformers folder ranks the "
                                                 "pool (with --baseline base: an HF causal LM).",
                                                 show_default=False)] = None,
    negatives: Annotated[int, typer.Option(help="Negatives per training pair, hardest first.",
                                           rich_help_panel=Panel)] = 4,
    range_min: Annotated[int, typer.Option(help="Skip this many best-ranked candidates (ranks count what is left "
                                           "after the query's own positives).", rich_help_panel=Panel)] = 0,
    range_max: Annotated[int, typer.Option(help="Consider candidates up to this rank.", rich_help_panel=Panel)] = 50,
    relative_margin: Annotated[Optional[float], typer.Option(
        help="Keep a candidate only if its score <= s_pos - |s_pos| x this (s_pos: the query's lowest positive "
        "score); negative = off.", rich_help_panel=Panel)] = 0.05,
    absolute_margin: Annotated[Optional[float], typer.Option(help="Keep a candidate only if its score <= s_pos - "
                                                             "this.", rich_help_panel=Panel,
                                                             show_default=False)] = None,
    max_score: Annotated[Optional[float], typer.Option(help="Keep a candidate only if its score <= this.",
                                                       rich_help_panel=Panel, show_default=False)] = None,
    sampling: Annotated[str, typer.Option(help="top: the best-ranked survivors; random: a seeded sample of them.",
                                          rich_help_panel=Panel)] = "top",
    fill: Annotated[str, typer.Option(help="random: a pair with fewer than --negatives mined gets random pool "
                                      "passages (counted in negatives_random); none: it keeps fewer.",
                                      rich_help_panel=Panel)] = "random",
    seed: Annotated[int, typer.Option(help="Seed of --sampling random and --fill random.",
                                      rich_help_panel=Panel)] = 0,
    split: Annotated[str, typer.Option(help="Which pairs are training pairs: default, or an lbr-ray config file "
                                       "(its data.split). Only those are mined; dev/test positives are never "
                                       "candidates.")] = "default",
    from_scratch: Annotated[bool, typer.Option(help="--baseline base: random weights (tiny test models).")] = False,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate texts to this many tokens (minilm/base).",
                                                      show_default=False)] = None,
    num_workers: Annotated[int, typer.Option("--num-workers", "-n", help="Encoder actors and search shards of a "
                                             "dense retriever (0 = in this process, no Ray).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Texts per encoder forward pass.")] = 64,
    cache_dir: Annotated[Optional[str], typer.Option(help="Embedding cache (default ~/.cache/lbr-ray/embeddings).",
                                                     show_default=False)] = None,
) -> None:
    """Mine hard negatives for the training-split pairs: rank a pool (corpus passages + training positives, never a
    dev/test positive) with BM25 or a model, drop the query's positives and likely false negatives (rank window,
    margin below the positive's score) and write the pairs with a `negatives` field (GR-CL's gr_cl.hard_negatives).
    Dev/test pairs are written unchanged."""
    from lbr_ray.data.mine import MineOptions, check_options, mine
    from lbr_ray.errors import ConfigError
    from lbr_ray.eval.baselines import BASELINES, retrieval_method
    from lbr_ray.eval.evaluator import resolve_split

    problems = []
    if baseline is not None and baseline not in BASELINES:
        problems.append(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline == "base" and not model:
        problems.append("--baseline base needs --model (an HF causal LM folder or .gguf file)")
    if baseline in ("bm25", "minilm") and model:
        problems.append(f"--baseline {baseline} takes no --model")
    if split == "model":
        problems.append("--split must be 'default' or an lbr-ray config file")
    if problems:
        raise ConfigError(problems, "options")
    split_cfg, _ = resolve_split(split, None)
    opts = MineOptions(negatives=negatives, range_min=range_min, range_max=range_max,
                       relative_margin=None if relative_margin is not None and relative_margin < 0
                       else relative_margin, absolute_margin=absolute_margin, max_score=max_score,
                       sampling=sampling, fill=fill, seed=seed, split=split_cfg, num_workers=num_workers,
                       batch_size=batch_size, cache_dir=cache_dir)
    check_options(opts)
    if corpus is None:  # a folder's corpus* files; files and globs name pairs only
        corpus = [p for p in pairs if Path(p).is_dir() and any(Path(p).glob("corpus*"))]
    method, name = retrieval_method(baseline or (None if model else "bm25"), model, from_scratch, max_length)
    mine(pairs, corpus, method, output, opts, name=name, command="lbr " + shlex.join(sys.argv[1:]),
         log=typer.echo)


def register(app: typer.Typer) -> None:
    app.command("mine", epilog=EXAMPLES)(mine_command)
