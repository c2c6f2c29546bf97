"""`lbr eval`: retrieval metrics of a model or a baseline on the domains' test splits (parse -> options -> lbr_ray)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import AddressOpt, ClusterOpt

EXAMPLES = """Examples:

  lbr eval --model runs/medical/model --domains medical,biology      # train on medical, test held-out biology

  lbr eval --baseline bm25 --domains medical,chemistry,code,biology --output runs/eval-bm25

  lbr eval --baseline minilm --index IVF256,Flat --index-params nprobe=16 --num-workers 2

  lbr eval --model runs/demo/gr_cl/model --corpus joint --index auto --index-memory 2G   # one corpus of every passage

  lbr eval --baseline base --model lbr_ray/assets/tiny-llama --from-scratch --max-queries 100 --max-corpus 1000
"""

Panel = "Speed and scale"


def eval_command(
    model: Annotated[Optional[str], typer.Option(help="Trained lbr-ray model folder (lbr_ray.json) or a "
                                                 "sentence-transformers folder; with --baseline base, an HF causal LM.",
                                                 show_default=False)] = None,
    domains: Annotated[str, typer.Option(help="Comma-separated domain folders under --data-root.")]
        = "medical,chemistry,code,biology",
    data_root: Annotated[Optional[str], typer.Option(help="Folder of <domain>/pairs*.jsonl.gz (+ corpus*). Default: "
                                                     "../shared/data if present, else the bundled data/demo.",
                                                     show_default=False)] = None,
    baseline: Annotated[Optional[str], typer.Option(help="bm25 | minilm | base instead of a trained model.",
                                                    show_default=False)] = None,
    from_scratch: Annotated[bool, typer.Option(help="--baseline base: random weights from the model's config "
                                               "(seeded; for tiny test models).")] = False,
    index: Annotated[str, typer.Option(help="FAISS factory string (Flat, IVF256,Flat, HNSW32, ...), exact, or auto "
                                       "(corpus scale: exact, IVF-Flat or IVF-PQ chosen from the corpus size and "
                                       "--index-memory, one trained quantizer shared by shards, saved and reused, "
                                       "nprobe tuned against exact search; docs/evaluation.md).",
                                       rich_help_panel=Panel)] = "Flat",
    index_params: Annotated[str, typer.Option(help="FAISS search parameters, e.g. nprobe=16 or efSearch=128; auto = "
                                              "the cheapest reaching recall@10 >= 0.99 vs exact search on a sample "
                                              "(reported with its speed-up over exact search).",
                                              rich_help_panel=Panel)] = "",
    index_memory: Annotated[Optional[str], typer.Option(help="Memory budget of --index auto's index, e.g. 4G "
                                                        "(default: a quarter of this machine's memory).",
                                                        rich_help_panel=Panel, show_default=False)] = None,
    corpus: Annotated[str, typer.Option(help="domain: each domain's queries against its own corpus; joint: every "
                                        "domain's test queries against one corpus of all their passages (corpus "
                                        "files and the positives of every split).", rich_help_panel=Panel)]
        = "domain",
    num_workers: Annotated[int, typer.Option("--num-workers", "-n", help="Encoder actors and search shards "
                                             "(0 = in this process, no Ray).", rich_help_panel=Panel)] = 2,
    batch_size: Annotated[Optional[int], typer.Option(help="Texts per encoder forward pass (default: 16 on CPUs, "
                                                      "64 on GPUs).", rich_help_panel=Panel, show_default=False)]
        = None,
    max_queries: Annotated[Optional[int], typer.Option(help="Cap the queries per domain (deterministic sample).",
                                                       rich_help_panel=Panel, show_default=False)] = None,
    max_corpus: Annotated[Optional[int], typer.Option(help="Cap the corpus per domain (positives are kept).",
                                                      rich_help_panel=Panel, show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate texts to this many tokens (minilm/base).",
                                                      rich_help_panel=Panel, show_default=False)] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype of a trained or base model: auto (bfloat16 where this "
                                       "machine runs it fast: a CPU with AVX512-BF16/AMX or a bf16 GPU; else "
                                       "float32), float32 or bfloat16.", rich_help_panel=Panel)] = "auto",
    cache_dir: Annotated[Optional[str], typer.Option(help="Embedding cache, a folder or an s3:// / gs:// URI "
                                                     "(default ~/.cache/lbr-ray/embeddings or $LBR_CACHE/embeddings).",
                                                     show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Which queries are the test split: model (the split recorded in the "
                                       "model's lbr_ray.json, else the default), default, or an lbr-ray config "
                                       "file (its data.split).")] = "model",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.{md,json,csv,png}.")]
        = Path("runs/eval"),
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="Use GPUs (default: when Ray sees any).",
                                                show_default=False)] = None,
    address: AddressOpt = None,
    cluster: ClusterOpt = None,
) -> None:
    """Evaluate retrieval (R@10, NDCG@10, MRR@10, R@100) per domain and pair type; write reports.

    Each domain's test queries rank its test positives plus its corpus passages. Passages are embedded by a Ray Data
    actor pool (cached by model and corpus hash) and searched in sharded FAISS indexes in parallel Ray actors.
    """
    if cluster or (address and address.startswith(("http://", "https://"))):  # run it as a Ray job there
        from lbr_ray.cluster.jobs import submit_as_job

        raise typer.Exit(submit_as_job(sys.argv[1:], cluster=cluster, address=address))
    from lbr_ray.errors import ConfigError
    from lbr_ray.eval.baselines import BASELINES, retrieval_method
    from lbr_ray.eval.evaluator import (EvalOptions, RetrievalEvaluator, default_cache_dir, resolve_data_root,
                                        resolve_split)
    from lbr_ray.eval.report import write_reports

    problems = []
    if baseline is not None and baseline not in BASELINES:
        problems.append(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline in (None, "base") and not model:
        problems.append("--model is required (or pass --baseline bm25|minilm)")
    if dtype not in ("auto", "float32", "bfloat16"):
        problems.append(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if num_workers < 0 or (batch_size is not None and batch_size < 1):
        problems.append("--num-workers must be >= 0 and --batch-size >= 1")
    if (max_queries is not None and max_queries < 1) or (max_corpus is not None and max_corpus < 1):
        problems.append("--max-queries and --max-corpus must be >= 1")
    names = tuple(d.strip() for d in domains.split(",") if d.strip())
    if not names:
        problems.append("--domains is empty")
    if problems:
        raise ConfigError(problems, "options")
    split_cfg, split_from = resolve_split(split, model if baseline is None else None)
    opts = EvalOptions(domains=names, data_root=resolve_data_root(data_root), index=index, index_params=index_params,
                       num_workers=num_workers, batch_size=batch_size, max_queries=max_queries,
                       max_corpus=max_corpus, cache_dir=str(cache_dir or default_cache_dir()), use_gpu=gpu,
                       address=address, split=split_cfg, index_memory=index_memory, corpus=corpus)
    from lbr_ray.hardware import encode_dtype

    dtype = encode_dtype(dtype, "cpu" if gpu is False else None)
    method, name = retrieval_method(baseline, model, from_scratch, max_length, threads=max(num_workers, 1),
                                    dtype=dtype)
    if baseline in (None, "base") and method.kind != "st":
        name += f" ({dtype})"
    typer.echo(f"lbr eval: {name} on {', '.join(names)} from {opts.data_root}")
    typer.echo(f"lbr eval: test queries from {split_from}: key {split_cfg.key}, bucket mod {split_cfg.modulus} in "
               f"{list(split_cfg.test_buckets)}")
    results = RetrievalEvaluator(opts, log=typer.echo).evaluate(method, name)
    if sys.argv[1:2] == ["eval"]:  # run from the console: record how the report was made
        results["command"] = "lbr " + shlex.join(sys.argv[1:])
    paths = write_reports(results, output)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EXAMPLES, no_args_is_help=False)(eval_command)
