"""`lbr study`: parse options, build the study spec and config, call lbr_ray.tune.study.run_study."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import AddressOpt, ClusterOpt, SetOpt

EXAMPLES = """
Examples:

  lbr study --config configs/demo.yaml --target medical --variants lbr,gl-cl,cl,cl-mc --seeds 0,1,2
            --heldout biology,chemistry --output runs/study-medical

  lbr study --config configs/demo.yaml --target medical --variants lbr,cl --seeds 0,1 --heldout biology
            --set tune.ib_gl_steps=50 --set tune.gr_cl_steps=50 --test-max-queries 200 --output runs/study-small

  lbr study --output runs/study-medical --resume        # continue: finished cells are not rerun

  lbr study --config configs/smollm2-135m-medical.yaml --target medical --heldout biology --baselines bm25,minilm,base
            --test-max-queries 500 --test-max-corpus 5000 --output runs/study-smollm2-medical
            --results benchmarks/results/study_smollm2_medical --commit   # each finished cell committed

  lbr study --output runs/study-smollm2-medical --results benchmarks/results/study_smollm2_medical --resume --commit
            # (also on a fresh clone without runs/: the committed cells are skipped)

  lbr study --output runs/study-medical --rescore       # recompute the significance from the TREC runs
"""


def study_command(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Base YAML config (model, stages, "
                                                   "steps); its data is replaced by the target's.",
                                                   show_default=False)] = None,
    target: Annotated[Optional[str], typer.Option(help="Target domain folder under --data-root (trained and "
                                                  "tested on).", show_default=False)] = None,
    variants: Annotated[str, typer.Option(help="Comma-separated: lbr, gl-cl, cl, cl-mc (cl with "
                                          "--match-compute).")] = "lbr,gl-cl,cl,cl-mc",
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0,1,2",
    heldout: Annotated[str, typer.Option(help="Comma-separated domains evaluated but never trained on.")] = "",
    data_root: Annotated[Optional[Path], typer.Option(help="Folder of domain folders (default: the folder above "
                                                      "the domain folder of the config's first data.pairs entry, "
                                                      "itself a domain folder or a file in one).",
                                                      show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Study folder.", show_default=False)]
        = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the study in --output (Tuner.restore), or "
                                         "the one committed in --results (a fresh clone): finished cells are "
                                         "kept, unfinished ones run again.")] = False,
    results: Annotated[Optional[Path], typer.Option(help="A folder in the repository that receives each finished "
                                                    "cell's results (cell.json, metrics, gzipped top-20 TREC runs; "
                                                    "no checkpoints) and the report; --resume skips every cell "
                                                    "found there.", show_default=False)] = None,
    commit: Annotated[bool, typer.Option("--commit", help="git add + commit each cell's --results folder as it "
                                         "finishes (only those paths; the message names the cell and its test "
                                         "R@10).")] = False,
    baselines: Annotated[str, typer.Option(help="References scored on the same test sets, with their own TREC runs "
                                           "and paired tests: bm25, minilm, base (the config's model untrained)."
                                           )] = "bm25",
    test_max_queries: Annotated[Optional[int], typer.Option(help="Cap the test queries per domain (the same "
                                                            "sample in every cell).", show_default=False)] = None,
    test_max_corpus: Annotated[Optional[int], typer.Option(help="Cap the test corpus per domain (positives kept).",
                                                           show_default=False)] = None,
    eval_workers: Annotated[int, typer.Option(help="Encoder actors per cell evaluation (0 = in the cell's "
                                              "process).")] = 0,
    eval_dtype: Annotated[str, typer.Option(help="Compute dtype of the test encoding (cells and --baselines base): "
                                            "auto = bfloat16 where it is fast (as lbr eval's --dtype auto), "
                                            "float32 or bfloat16; saved with the study.")] = "auto",
    rescore: Annotated[bool, typer.Option("--rescore", help="Recompute the significance of the ended study in "
                                          "--output from its TREC runs (no training).")] = False,
    stat_test: Annotated[str, typer.Option(help="Paired test over queries: fisher (randomization) or student "
                                           "(paired t-test).")] = "fisher",
    max_p: Annotated[float, typer.Option(help="p-value at or below which a difference is called significant.")]
        = 0.05,
    overrides: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Tune's, Ray's and the cells' own output on "
                                          "the console (by default: one line per cell; the rest goes to "
                                          "STUDY/logs/ and the cells' folders).")] = False,
    address: AddressOpt = None,
    cluster: ClusterOpt = None,
) -> None:
    """Does LBR help? A variant x seed grid of real two-stage runs on a target domain (Ray Tune), each evaluated on
    the target's test split and held-out domains (TREC run files); mean +- std over seeds, significance of LBR
    minus each variant (paired over queries, each query's R@10 averaged over the seeds), results.{md,json,csv} and
    study.png."""
    t0 = time.time()
    if rescore:
        from lbr_ray.errors import ConfigError
        from lbr_ray.tune.study import rescore as rescore_study

        if output is None or config is not None or target is not None or resume or results or commit:
            raise ConfigError("--rescore recomputes the significance of an ended study: pass only --output")
        rescore_study(output)
        return
    if cluster or (address and address.startswith(("http://", "https://"))):
        from lbr_ray.cluster.jobs import submit_as_job

        raise typer.Exit(submit_as_job(sys.argv[1:], cluster=cluster, address=address))
    cfg, spec, folder = study_inputs(config, target, variants, seeds, heldout, data_root, output, resume,
                                     overrides, results=results, test_max_queries=test_max_queries,
                                     test_max_corpus=test_max_corpus, eval_workers=eval_workers, stat_test=stat_test,
                                     max_p=max_p, baselines=baselines, eval_dtype=eval_dtype)
    if commit and spec.results == "":
        from lbr_ray.errors import ConfigError

        raise ConfigError("--commit commits the --results folder: pass --results too")
    from lbr_ray.tune.study import run_study  # imports Ray: after the checks, which need none

    doc = run_study(cfg, spec, folder, resume=resume, address=address, t0=t0, quiet=not verbose, commit=commit)
    typer.echo(f"study done in {time.time() - t0:.0f}s ({doc['cells_done']} of {doc['cells_total']} cells): "
               f"{folder / 'results.md'}")


def study_inputs(config, target, variants, seeds, heldout, data_root, output, resume, overrides, results=None,
                 baselines="bm25", **options):
    """(config, spec, folder): from the options, or for --resume from the study's saved files (its folder, else the
    committed --results folder)."""
    from lbr_ray.config import load_config
    from lbr_ray.errors import ConfigError
    from lbr_ray.tune.study import StudySpec, check_spec, load_study, parse_list, study_config

    if output is None:
        raise ConfigError("--output is required (the study folder)")
    folder = output.expanduser().resolve()
    results = results.expanduser().resolve() if results else None
    if results is not None and (results == folder or folder in results.parents or results in folder.parents):
        raise ConfigError(f"--results {results} and --output {folder} must be separate folders")
    if resume:
        if config is not None or target is not None or overrides:
            raise ConfigError("--resume continues the study as it started: pass only --output (and --results)")
        if not (folder / "study.json").is_file() and not (results and (results / "study.json").is_file()):
            raise ConfigError(f"{folder} holds no study to resume (no study.json)"
                              + (f", nor does --results {results}" if results else "") + ": check --output")
        cfg, spec = load_study(folder, results)
        return cfg, spec, folder
    if config is None or target is None:
        raise ConfigError("--config and --target are required")
    try:
        seed_list = parse_list(seeds, int)
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    cfg = load_config(config, list(overrides or []))
    eval_dtype = options.pop("eval_dtype", "auto")
    if eval_dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"--eval-dtype must be auto, float32 or bfloat16, got {eval_dtype!r}")
    from lbr_ray.hardware import encode_dtype

    eval_dtype = encode_dtype(eval_dtype)
    if data_root is None:  # data.pairs names a domain folder (../shared/data/medical) or a file in one
        first = Path(cfg.data.pairs[0]).expanduser().resolve()
        data_root = (first if first.is_dir() else first.parent).parent
    spec = StudySpec(target=target, variants=parse_list(variants), seeds=seed_list, heldout=parse_list(heldout),
                     data_root=str(Path(data_root).resolve()), baselines=parse_list(baselines),
                     results=str(results) if results else "", eval_dtype=eval_dtype, **options)
    check_spec(spec)
    return study_config(cfg, spec, folder), spec, folder


def register(app: typer.Typer) -> None:
    app.command("study", epilog=EXAMPLES)(study_command)
