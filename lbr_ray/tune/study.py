"""`lbr study`: does LBR help? A variant x seed grid on one target domain, every cell a real two-stage run, run by
Ray Tune (grid search, stage-1 cache by config hash, Tuner.restore), evaluated on the target's test split and on
held-out domains, with per-query TREC run files, mean +- std over seeds and paired significance over queries.

<study>/study.json            the study's spec (target, variants, seeds, held-out domains, eval caps, test)
<study>/sweep_config.yaml     the resolved base config (resume reads it)
<study>/tune/                 Tune's experiment state (restore point)
<study>/stage1/<key>/         stage-1 models by config hash (lbr_ray.tune.stage1): a restarted cell reuses its own
<study>/cells/<trial name>/   each cell: gr_cl/ run, summary.json, runs/<domain>.trec, test/report.*, cell.json
<study>/qrels/<domain>.trec   the judgements every cell's runs are scored against (one eval set per domain)
<study>/eval_sets.json        each test set's size and text hashes (every cell and baseline is scored on these)
<study>/<baseline>/<domain>.trec  bm25, minilm, base (the untrained model.name) on the same eval sets
<study>/results.{md,json,csv}, <study>/study.png
<results>/                    with --results: each finished cell's small files, committed as it ends (--commit), so
                              that --resume on a fresh clone skips those cells (lbr_ray.tune.results)

Variants: lbr, gl-cl, cl (lbr_ray.recipes.pipeline) and cl-mc (= cl with --match-compute: stage 2 gets the
two-stage variants' compute), each optionally with config overrides and its own seeds: `lbr+bottleneck.k=2@0`
(a k sweep point at seed 0), `cl+model.from_scratch=true` (a from-scratch control). Steps come from
tune.ib_gl_steps / tune.gr_cl_steps (default: the config's own).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lbr_ray.config import LbrConfig, config_from_dict, replace, save_config, to_dict
from lbr_ray.errors import ConfigError
from lbr_ray.tune.results import (RELATIVE, RESULTS_DEPTH, committed, committed_cells, git_commit, load_spec,
                                  portable_spec, run_file, save_cell, save_spec)

VARIANTS = {"lbr": ("lbr", False), "gl-cl": ("gl-cl", False), "cl": ("cl", False), "cl-mc": ("cl", True)}
STAT_TESTS = ("fisher", "student")
TEST_NAMES = {"fisher": "Fisher's randomization test (9,999 paired resamples)", "student": "the paired t-test"}
SPEC = "study.json"
CELL = "cell.json"
METRIC = "recall@10"
MIN_HARD = 20  # hard-type test queries a domain needs for its own column in the hard-types table
BASELINE_LABELS = {"bm25": "BM25", "minilm": "MiniLM (all-MiniLM-L6-v2)", "base": "base model, untrained"}


@dataclass(frozen=True)
class StudySpec:
    target: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    data_root: str
    heldout: tuple[str, ...] = ()
    test_max_queries: int | None = None  # caps of the test evaluation (deterministic samples, the same in every cell)
    test_max_corpus: int | None = None
    eval_workers: int = 0  # encoder actors of each cell's evaluation (0 = in the cell's driver process)
    eval_dtype: str = "float32"  # compute dtype of every cell's and the base baseline's test encoding (saved, so a
    # resumed grid encodes as it began; studies from before the field encoded in float32)
    stat_test: str = "fisher"  # lbr_ray.eval.trec.paired_test: fisher (randomization) or student (paired t-test)
    max_p: float = 0.05
    control: str = "lbr"  # significance of control minus each other variant
    baselines: tuple[str, ...] = ("bm25",)  # scored once on the same eval sets, compared with the control too
    results: str = ""  # the committed results folder (lbr_ray.tune.results), "" = none
    domains: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "domains", (self.target, *self.heldout))


def spec_from_dict(d: dict) -> StudySpec:
    d = {k: v for k, v in d.items() if k not in ("domains", RELATIVE)}
    for key in ("variants", "seeds", "heldout", "baselines"):
        if key in d:
            d[key] = tuple(d[key] or ())
    return StudySpec(**d)


def parse_list(text: str | None, kind=str) -> tuple:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return tuple(kind(t) for t in items)


def parse_variant(text: str) -> tuple[str, tuple[str, ...], tuple[int, ...] | None]:
    """'lbr+bottleneck.k=2@0/1' -> ('lbr', ('bottleneck.k=2',), (0, 1)): the variant, config overrides in --set
    syntax, and the seeds it runs (None: the study's --seeds)."""
    body, _, seeds = text.partition("@")
    name, *overrides = body.split("+")
    return name, tuple(overrides), tuple(int(s) for s in seeds.split("/")) if seeds else None


def grid_cells(spec: StudySpec) -> list[dict]:
    """The cells in run order: seed by seed over the variants that run every seed, then the variants pinned to
    seeds (`@0`), so that an interrupted study has whole seeds of the main grid first."""
    pinned = {v: parse_variant(v)[2] for v in spec.variants}
    cells = [{"variant": v, "seed": s} for s in spec.seeds for v in spec.variants if pinned[v] is None]
    return cells + [{"variant": v, "seed": s} for v in spec.variants if pinned[v] for s in pinned[v]]


def check_spec(spec: StudySpec) -> None:
    """Every problem with the grid at once, before Ray starts: unknown variants, no seeds, missing domain folders."""
    problems = []
    unknown = []
    for v in spec.variants:
        try:
            if parse_variant(v)[0] not in VARIANTS:
                unknown.append(v)
        except ValueError:
            problems.append(f"variant {v!r}: the seeds after @ must be integers separated by /")
    if unknown:
        problems.append(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)} (each may "
                        f"add +key=value overrides and @seeds)")
    if not spec.variants:
        problems.append("--variants is empty")
    if len(set(spec.variants)) != len(spec.variants) or len(set(spec.seeds)) != len(spec.seeds):
        problems.append("--variants and --seeds must not repeat a value")
    if not spec.seeds:
        problems.append("--seeds is empty")
    if spec.target in spec.heldout:
        problems.append(f"the target {spec.target!r} cannot also be a held-out domain")
    from lbr_ray.eval.baselines import BASELINES

    if set(spec.baselines) - set(BASELINES) or len(set(spec.baselines)) != len(spec.baselines):
        problems.append(f"--baselines must be distinct values of {', '.join(BASELINES)}, got "
                        f"{','.join(spec.baselines)}")
    if spec.stat_test not in STAT_TESTS:
        problems.append(f"--stat-test must be one of {', '.join(STAT_TESTS)}")
    if not 0 < spec.max_p < 1:
        problems.append("--max-p must be between 0 and 1")
    root = Path(spec.data_root)
    for domain in spec.domains:
        if not (root / domain).is_dir():
            problems.append(f"no domain folder {root / domain}")
        elif not any((root / domain).glob("pairs*")):
            problems.append(f"{root / domain} has no pairs* file")
    if problems:
        raise ConfigError(problems, "study")


def study_config(cfg: LbrConfig, spec: StudySpec, output: str | Path) -> LbrConfig:
    """The base config of every cell: the target's pairs and corpus (absolute paths), no ASHA, tune.output."""
    from lbr_ray.data.readers import resolve_paths
    from lbr_ray.tune.search import absolute_paths

    folder = Path(spec.data_root) / spec.target
    corpus = tuple(resolve_paths([str(folder)], "corpus")) if any(folder.glob("corpus*")) else ()
    cfg = replace(cfg, data={"pairs": tuple(resolve_paths([str(folder)], "pairs")), "corpus": corpus},
                  tune={"output": str(Path(output).expanduser().resolve()), "asha": False, "search": "grid",
                        "num_samples": 1})
    cfg = absolute_paths(cfg)
    for variant in spec.variants:  # a bad override stops here, before Ray starts
        cell_config(cfg, variant, spec.seeds[0] if spec.seeds else 0, Path(output))
    return cfg


def cell_config(base: LbrConfig, variant: str, seed: int, out: Path, root: str | None = None) -> tuple[LbrConfig, bool]:
    """(the config one cell trains with, match_compute). A relative path in the variant's overrides (e.g.
    `cl+data.pairs=runs/mined/medical.jsonl.gz`) is taken from `root`, the folder `lbr study` runs in."""
    from lbr_ray.config import with_overrides
    from lbr_ray.tune.search import absolute_paths
    from lbr_ray.tune.space import tuning_config

    name, overrides, _ = parse_variant(variant)
    name, match = VARIANTS[name]
    try:
        cfg = absolute_paths(with_overrides(tuning_config(base), overrides), root)
    except ConfigError as e:
        raise ConfigError(f"variant {variant!r}: {e}") from None
    cfg = replace(cfg, run={"seed": int(seed), "variant": name, "output": str(out), "resume": False})
    return cfg, match


def eval_options(cfg: LbrConfig, spec: StudySpec, cache: Path):
    from lbr_ray.eval.evaluator import EvalOptions

    # seed 0 for every cell: the same queries and corpus whatever the training seed, so runs pair query by query
    return EvalOptions(domains=spec.domains, data_root=str(Path(spec.data_root).resolve()),
                       num_workers=spec.eval_workers, max_queries=spec.test_max_queries,
                       max_corpus=spec.test_max_corpus, cache_dir=str(cache), seed=0, split=cfg.data.split)


@contextlib.contextmanager
def eval_threads(cfg: LbrConfig):
    """Torch threads of an in-process test evaluation (eval_workers 0): the CPUs the cell's Train workers held, now
    free (Ray starts the cell's driver with one thread: it only waited on them)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(before, int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def evaluate_cell(model_dir: Path, cfg: LbrConfig, spec: StudySpec, study: Path, cell: Path, tag: str) -> dict:
    """The cell's model on every domain's test split: report files, TREC runs, {domain: metrics of group all}."""
    from lbr_ray.eval.encode import load_encoder
    from lbr_ray.eval.evaluator import RetrievalEvaluator
    from lbr_ray.eval.report import write_reports
    from lbr_ray.eval.trec import write_qrels, write_run

    ev = RetrievalEvaluator(eval_options(cfg, spec, study / "embedding_cache"), keep_ranking=True,
                            log=lambda msg: print(f"[lbr] study {tag}: {msg}", flush=True))
    with eval_threads(cfg):
        results = ev.evaluate(load_encoder(str(model_dir), dtype=spec.eval_dtype), tag)
    out = {}
    for domain, res in results["domains"].items():
        eset = ev.eval_set(domain)
        write_run(eset, res.pop("top"), res.pop("scores"), cell / "runs" / f"{domain}.trec", tag)
        if not (study / "qrels" / f"{domain}.trec").is_file():
            write_qrels(eset, study / "qrels" / f"{domain}.trec")
        out[domain] = domain_metrics(res["rows"])
    write_reports(results, cell / "test", title=f"Test split: study cell {tag}")
    return out


def domain_metrics(rows: list[dict]) -> dict:
    """One domain's evaluation rows as a study keeps them (cells and baselines alike): group all's metrics, the
    number of hard-type queries and, where there are any, their R@10 (the lexically easy term_ctx and section pairs
    left out)."""
    groups = {r["group"]: r for r in rows}
    out = {k: v for k, v in groups["all"].items() if k not in ("group", "difficulty")}
    hard = groups.get("hard")
    out["hard_queries"] = hard["n_queries"] if hard else 0
    if hard:
        out[f"hard_{METRIC}"] = hard[METRIC]
    return out


def hard_metrics(eset, run: Path) -> dict:
    """domain_metrics' hard-type entries from a TREC run (a baseline that an older lbr scored on group all only)."""
    from lbr_ray.eval.trec import per_query, qrels_of, query_id, read_run

    hard = {query_id(q) for q, level in zip(eset.queries, eset.query_difficulty) if level == "hard"}
    if not hard:
        return {"hard_queries": 0}
    scores = per_query({q: rel for q, rel in qrels_of(eset).items() if q in hard}, read_run(run))
    return {"hard_queries": len(hard), f"hard_{METRIC}": sum(scores.values()) / len(scores)}


def study_cell(params: dict, base: dict, study: str, spec: dict, quiet: bool = True, commit: bool = False,
               root: str | None = None) -> None:
    """One cell (the Tune trainable): stage 1 from the cache (trained if missing), GR-CL, test evaluation; then its
    small files into the results folder (`commit`: and into git). A cell whose results are there already trains
    nothing. `quiet`: the Train workers' output goes to the cell's log files (lbr_ray.train.console)."""
    from ray import tune

    from lbr_ray.recipes.pipeline import train
    from lbr_ray.tune.cleanup import RecordPlacementGroup
    from lbr_ray.tune.search import _write_json
    from lbr_ray.tune.stage1 import ensure_stage1

    study, spec, params = Path(study), spec_from_dict(spec), params["cell"]
    name = tune.get_context().get_trial_name()
    cell = study / "cells" / name
    cell.mkdir(parents=True, exist_ok=True)
    with open(cell / "attempts.jsonl", "a") as fh:  # the resume test counts these: finished cells never rerun
        fh.write(json.dumps({"start": time.time(), "params": params}) + "\n")
    done = json.loads((cell / CELL).read_text()) if (cell / CELL).is_file() else {}
    if done.get("done"):  # Tune restarted a cell that had finished: report what it measured, train nothing
        tune.report(_report(done))
        return
    done = committed(spec.results, params["variant"], params["seed"])
    if done:  # finished in an earlier session (its results were committed): nothing to train
        tune.report(_report(done))
        return
    cfg, match = cell_config(config_from_dict(base), params["variant"], params["seed"], cell, root)
    start, init, facts = time.time(), None, {"stage1_reused": None, "stage1_s": 0.0}
    if cfg.run.variant != "cl":
        s1 = ensure_stage1(cfg, study / "stage1", quiet=quiet)
        init = str(s1.model_dir)
        facts = {"stage1_key": s1.key, "stage1_reused": s1.reused, "stage1_s": s1.trial_s}
    resume = any((cell / "gr_cl").glob("checkpoint_*"))  # a restarted cell continues its GR-CL run
    callbacks = [RecordPlacementGroup(cell)]  # an interrupted cell's workers are released (lbr_ray.tune.cleanup)
    res = train(replace(cfg, run={"resume": resume}), stage="gr-cl", init=init, match_compute=match,
                stage2_callbacks=callbacks, quiet=quiet, announce=False)["gr_cl"]
    summary = json.loads((cell / "summary.json").read_text())
    dev = [m for m in res.metrics if "dev_recall@10" in m]
    tag = f"{params['variant']}_seed{params['seed']}"
    test = evaluate_cell(res.model_dir, cfg, spec, study, cell, tag)
    doc = {"params": params, "variant": params["variant"], "seed": params["seed"], "done": True, **facts,
           "stage2_steps": res.last.get("step"), "cell_s": time.time() - start, "model": str(res.model_dir),
           "dev_recall@10": dev[-1]["dev_recall@10"] if dev else None,
           "dev_bm25_recall@10": (summary.get("dev_vs_bm25") or {}).get("bm25_dev_recall@10"), "test": test}
    _write_json(cell / CELL, doc)
    if spec.results:
        keep_cell(Path(spec.results), cell, doc, commit)
    tune.report(_report(doc))


def keep_cell(results: Path, cell: Path, doc: dict, commit: bool) -> None:
    """A finished cell's small files into the results folder, and (commit) exactly that folder into git, the commit
    message naming the cell and its test R@10."""
    folder = save_cell(results, cell, doc)
    if commit:
        scores = ", ".join(f"{d} {m[METRIC]:.4f}" for d, m in doc["test"].items())
        git_commit([folder], f"study {results.name}: cell {doc['variant']} seed {doc['seed']} done, test R@10 "
                             f"{scores}")


def _report(doc: dict) -> dict:
    row = {f"test_{d}_{METRIC}": m[METRIC] for d, m in doc["test"].items()}
    return {**row, "dev_recall@10": doc.get("dev_recall@10") or 0.0, "done": True}


def trainable(cfg: LbrConfig, spec: StudySpec, study: Path, quiet: bool = True, commit: bool = False):
    import os

    from ray import tune

    from lbr_ray.tune.search import DRIVER_CPUS

    fn = tune.with_parameters(study_cell, base=to_dict(cfg), study=str(study), spec=asdict(spec), quiet=quiet,
                              commit=commit, root=os.getcwd())
    return tune.with_resources(fn, {"cpu": DRIVER_CPUS})


def build_tuner(cfg: LbrConfig, spec: StudySpec, study: Path, callbacks: list | None = None, quiet: bool = True,
                cells: list[dict] | None = None, commit: bool = False):
    """The Tune grid over `cells` (default: every cell of the spec, in run order)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from lbr_ray.tune.cleanup import ReleaseStoppedTrials
    from lbr_ray.tune.search import concurrency, run_config, trial_failures

    space = {"cell": tune.grid_search(cells or grid_cells(spec))}  # one grid axis: the cells in run order
    tune_config = tune.TuneConfig(metric=f"test_{spec.target}_{METRIC}", mode="max",
                                  search_alg=BasicVariantGenerator(max_concurrent=concurrency(cfg)),
                                  num_samples=1, trial_name_creator=cell_name, trial_dirname_creator=cell_name)
    callbacks = [ReleaseStoppedTrials(study / "cells"), *console_lines(spec, quiet), *(callbacks or [])]
    failures = tune.FailureConfig(max_failures=trial_failures(cfg))
    return tune.Tuner(trainable(cfg, spec, study, quiet, commit), param_space=space, tune_config=tune_config,
                      run_config=run_config(study, quiet, callbacks, failures))


def console_lines(spec: StudySpec, quiet: bool) -> list:
    """Quiet: one console line per cell as it starts and ends (the cells' own output goes to log files)."""
    from lbr_ray.tune.progress import TrialLines

    order = {(c["variant"], c["seed"]): i + 1 for i, c in enumerate(grid_cells(spec))}
    total = len(order)

    def describe(config: dict) -> str:
        cell = config["cell"]
        index = order.get((cell["variant"], cell["seed"]), "?")
        return f"cell {index} of {total} ({cell['variant']} seed {cell['seed']})"

    return [TrialLines("study", total, describe)] if quiet else []


def cell_name(trial) -> str:
    """e.g. 00004_variant=lbr+bottleneck.k=2@0_seed=0 (file-name safe)."""
    import re

    cell = trial.config["cell"]
    index = trial.trial_id.rsplit("_", 1)[-1]
    return re.sub(r"[^\w.+=@-]", "-", f"{index}_variant={cell['variant']}_seed={cell['seed']}")


def check_study_folder(study: Path, resume: bool, results: str = "") -> bool:
    """Whether `study` holds Tune state to restore; bad combinations of --resume, --output and --results stop."""
    from ray import tune

    from lbr_ray.tune.search import EXPERIMENT

    started = tune.Tuner.can_restore(str(study / EXPERIMENT))
    from_results = bool(results) and (Path(results) / SPEC).is_file()
    if resume and not (study / SPEC).is_file() and not from_results:
        raise ConfigError(f"{study} holds no study to resume (no {SPEC}): check --output (or --results)")
    if resume and not started and not from_results:
        raise ConfigError(f"{study / EXPERIMENT} holds no Tune state to resume: start the study without --resume")
    if not resume and (started or (study / SPEC).exists()):
        raise ConfigError(f"{study} already holds a study: pass --resume to continue it, or choose another --output")
    if not resume and from_results:
        raise ConfigError(f"--results {results} already holds a study: pass --resume to continue it, or choose "
                          "another --results")
    return started


def load_study(study: Path, results: str | Path | None = None) -> tuple[LbrConfig, StudySpec]:
    """The study's config and spec: from its folder, else (a fresh clone) from its committed results folder."""
    if (study / SPEC).is_file():
        cfg, spec = load_spec(study)
        if results:
            spec["results"] = str(Path(results).expanduser().resolve())
    else:
        cfg, spec = load_spec(Path(results))
        cfg = replace(cfg, tune={"output": str(study)})
    return cfg, spec_from_dict(spec)


def run_study(cfg: LbrConfig, spec: StudySpec, study: str | Path, resume: bool = False,
              address: str | None = None, callbacks: list | None = None, t0: float | None = None,
              quiet: bool = True, commit: bool = False) -> dict:
    """Run (or resume) the grid, then write the table, significance and plot. `cfg` as made by study_config.
    With spec.results, cells committed there are not run (a fresh clone without `study` continues the grid), each
    cell that finishes is copied there (`commit`: and committed), and so is the report.
    `quiet`: the console shows one line per cell; Ray's and the cells' output go to <study>/logs and the cells'
    folders."""
    from ray import tune

    from lbr_ray.train.launcher import ensure_ray, print_config
    from lbr_ray.tune.cleanup import remove_recorded
    from lbr_ray.tune.search import EXPERIMENT, tune_verbosity
    from lbr_ray.tune.space import tuning_config

    t0 = t0 or time.time()
    study = Path(study).expanduser().resolve()
    results = Path(spec.results) if spec.results else None
    check_spec(spec)
    started = check_study_folder(study, resume, spec.results)
    methods = baseline_methods(cfg, spec)  # a baseline that cannot load stops here, before Ray
    print_config(cfg)
    study.mkdir(parents=True, exist_ok=True)
    if not (study / SPEC).is_file():
        save_config(cfg, study / "sweep_config.yaml")
        (study / SPEC).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    if results and not (results / SPEC).is_file():
        save_spec(results, cfg, asdict(spec))
        _commit(commit, [results / SPEC, results / "sweep_config.yaml"], f"study {results.name}: spec and config")
    check_eval_sets(cfg, spec, study, commit)
    pending = [c for c in grid_cells(spec) if not committed(results, c["variant"], c["seed"])]
    if started or pending or spec.eval_workers > 0:  # every cell committed: the report needs no Ray
        workers = tuning_config(cfg).scaling.num_workers * max(cfg.tune.max_concurrent_trials, 1)
        ensure_ray(replace(cfg, scaling={"num_workers": workers}, run={"output": str(study)}), address, quiet)
    run_baselines(cfg, spec, study, methods, commit)
    if started:  # Tuner.restore brings back the first session's callbacks and console verbosity
        tune_verbosity(quiet)
        tuner = tune.Tuner.restore(str(study / EXPERIMENT), trainable=trainable(cfg, spec, study, quiet, commit),
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = build_tuner(cfg, spec, study, callbacks, quiet, pending, commit) if pending else None
    if pending and len(pending) < len(grid_cells(spec)):
        print(f"[lbr] study: {len(grid_cells(spec)) - len(pending)} of {len(grid_cells(spec))} cells are done in "
              f"{results}; {len(pending)} to run", flush=True)
    grid = None
    if tuner is not None:
        try:
            grid = tuner.fit()
        finally:
            remove_recorded(study)
    expected = len(grid_cells(spec)) if started else len(pending)
    finished = grid is None or grid.num_terminated + grid.num_errors == len(grid) >= expected
    for folder in (study, results) if results else (study,):  # the results folder: every clone's sessions
        with open(folder / "sessions.jsonl", "a") as fh:
            fh.write(json.dumps({"start": t0, "wall_s": time.time() - t0, "resume": resume, "finished": finished})
                     + "\n")
    if not finished:
        where = f" --results {results}" if results else ""
        print(f"[lbr] study: stopped before every cell ended; continue with: lbr study --output {study}{where} "
              "--resume", flush=True)
    doc = write_results(cfg, spec, study, finished)
    if results:
        names = ["results.md", "results.json", "results.csv", "study.png"]
        for name in names:
            shutil.copyfile(study / name, results / name)
        _commit(commit, [results / n for n in (*names, "sessions.jsonl")],
                f"study {results.name}: report, {doc['cells_done']} of {doc['cells_total']} cells")
    return doc


def _commit(commit: bool, paths: list[Path], message: str) -> None:
    if commit:
        git_commit(paths, message)


def baseline_methods(cfg: LbrConfig, spec: StudySpec) -> dict:
    """{name: what lbr eval scores it with}: bm25; minilm (all-MiniLM-L6-v2 as `lbr eval --baseline minilm`);
    base = the config's model.name untrained, last-token pooled (CausalLMEncoder), cut at data.max_input_tokens
    and computed in the study's eval_dtype like the trained cells."""
    from lbr_ray.eval.baselines import BM25Retriever, base_ref, minilm_ref

    make = {"bm25": BM25Retriever, "minilm": minilm_ref,
            "base": lambda: base_ref(cfg.model.name, cfg.model.from_scratch, seed=cfg.run.seed,
                                     max_length=cfg.data.max_input_tokens, dtype=spec.eval_dtype)}
    return {name: make[name]() for name in spec.baselines}


def eval_set_facts(eset) -> dict:
    return {"queries": len(eset.queries), "passages": len(eset.doc_texts), "queries_sha1": eset.queries_hash,
            "corpus_sha1": eset.corpus_hash}


def check_eval_sets(cfg: LbrConfig, spec: StudySpec, study: Path, commit: bool = False) -> None:
    """Before any cell: each domain's test set, its size and text hashes in eval_sets.json and its qrels, in the
    study and the results folder. A set that differs from the one a folder was scored on stops the study (cells of
    different sessions must pair query by query)."""
    from lbr_ray.eval.evaluator import RetrievalEvaluator
    from lbr_ray.eval.trec import copy_trec, write_qrels

    ev = RetrievalEvaluator(eval_options(cfg, spec, study / "embedding_cache"), log=lambda msg: None)
    facts = {d: eval_set_facts(ev.eval_set(d)) for d in spec.domains}
    folders = [study] + ([Path(spec.results)] if spec.results else [])
    for folder in folders:
        known = json.loads((folder / "eval_sets.json").read_text()) if (folder / "eval_sets.json").is_file() else {}
        for d, f in facts.items():
            if d in known and known[d] != f:
                raise ConfigError(f"the {d} test set ({f['queries']} queries, {f['passages']} passages) is not the "
                                  f"one {folder} was scored on ({known[d]['queries']} queries, "
                                  f"{known[d]['passages']} passages, other texts): the data, the split or "
                                  "--test-max-* changed; start another study")
    for d in spec.domains:
        if not (study / "qrels" / f"{d}.trec").is_file():
            write_qrels(ev.eval_set(d), study / "qrels" / f"{d}.trec")
    (study / "eval_sets.json").write_text(json.dumps(facts, indent=2) + "\n")
    if spec.results:
        results = Path(spec.results)
        new = [copy_trec(study / "qrels" / f"{d}.trec", results / "qrels" / f"{d}.trec.gz") for d in spec.domains
               if not (results / "qrels" / f"{d}.trec.gz").is_file()]
        if new or not (results / "eval_sets.json").is_file():
            (results / "eval_sets.json").write_text(json.dumps(facts, indent=2) + "\n")
            _commit(commit, [results / "eval_sets.json", *new], f"study {results.name}: test sets and qrels")


def baseline_dir(spec: StudySpec, study: Path, name: str) -> Path:
    """Where a baseline's runs and metrics.json are: the results folder's copy if there is one, else the study's."""
    committed = Path(spec.results) / "baselines" / name if spec.results else None
    return committed if committed and (committed / "metrics.json").is_file() else study / name


def run_baselines(cfg: LbrConfig, spec: StudySpec, study: Path, methods: dict, commit: bool = False) -> None:
    """Each baseline on the same test sets as the cells, once per study: TREC runs and metrics.json in
    <study>/<name>/ and (gzipped) <results>/baselines/<name>/. A baseline that an older lbr scored on group all only
    gets its hard-type R@10 from its runs."""
    from lbr_ray.eval.evaluator import RetrievalEvaluator
    from lbr_ray.eval.trec import copy_trec, write_run

    ev = RetrievalEvaluator(eval_options(cfg, spec, study / "embedding_cache"), keep_ranking=True,
                            log=lambda msg: None)
    for name, method in methods.items():
        folder = baseline_dir(spec, study, name)
        fresh, older = not (folder / "metrics.json").is_file(), []
        if fresh:
            print(f"[lbr] study: baseline {name} on the test sets of {', '.join(spec.domains)}", flush=True)
            res = ev.evaluate(method, name)
            metrics = {}
            for domain, r in res["domains"].items():
                write_run(ev.eval_set(domain), r.pop("top"), r.pop("scores"), folder / f"{domain}.trec", name)
                metrics[domain] = domain_metrics(r["rows"])
        else:
            metrics = json.loads((folder / "metrics.json").read_text())
            older = [d for d in spec.domains if d in metrics and "hard_queries" not in metrics[d]]
            for domain in older:
                metrics[domain].update(hard_metrics(ev.eval_set(domain), run_file(folder, domain)))
        if fresh or older:
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        committed = Path(spec.results) / "baselines" / name if spec.results else None
        if committed and folder != committed:
            for domain in spec.domains:
                copy_trec(folder / f"{domain}.trec", committed / f"{domain}.trec.gz", RESULTS_DEPTH)
            shutil.copyfile(folder / "metrics.json", committed / "metrics.json")
            _commit(commit, [committed], f"study {Path(spec.results).name}: baseline {name} on the test sets")
        elif committed and older:
            _commit(commit, [committed], f"study {Path(spec.results).name}: baseline {name}, hard query types' "
                                         f"R@10 on {', '.join(older)} from its runs")


# --- analysis ----------------------------------------------------------------------------------------------------

def read_cells(study: Path, results: str = "") -> list[dict]:
    """The finished cells, each with `runs` (the folder of its TREC runs): the study's own and those committed to
    `results`; a cell in both is taken from `results`, so that every clone reports the same numbers."""
    cells = {}
    for path in sorted((study / "cells").glob(f"*/{CELL}")):
        doc = json.loads(path.read_text())
        if doc.get("done"):
            cells[(doc["variant"], doc["seed"])] = {**doc, "cell": path.parent.name, "runs": str(path.parent / "runs")}
    cells.update({(c["variant"], c["seed"]): c for c in committed_cells(results)})
    return list(cells.values())


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value, whose spread is unknown, not 0)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(cells: list[dict], spec: StudySpec) -> list[dict]:
    """One row per variant: seeds done, mean and std over seeds of test R@10 per domain and of dev R@10."""
    rows = []
    for variant in spec.variants:
        mine = [c for c in cells if c["variant"] == variant]
        row = {"variant": variant, "seeds": sorted(c["seed"] for c in mine)}
        for domain in spec.domains:
            row[domain] = mean_std([c["test"][domain][METRIC] for c in mine if domain in c["test"]])
            row[f"{domain}:hard"] = mean_std([c["test"][domain][f"hard_{METRIC}"] for c in mine
                                              if f"hard_{METRIC}" in c["test"].get(domain, {})])
        row["dev"] = mean_std([c["dev_recall@10"] for c in mine if c.get("dev_recall@10") is not None])
        rows.append(row)
    return rows


def significance(cells: list[dict], spec: StudySpec, study: Path) -> list[dict]:
    """Control (lbr) minus each other variant, per domain, on the seeds both finished: each query's R@10 averaged
    over those seeds, then a paired test over the queries (lbr_ray.eval.trec.paired_significance); then control
    minus each baseline (one run, scored on the same queries) over all of the control's seeds."""
    from lbr_ray.eval.trec import paired_significance, read_qrels, read_run

    if spec.control not in spec.variants:
        return []
    by = {(c["variant"], c["seed"]): c for c in cells}
    runs_of = {key: Path(c.get("runs") or study / "cells" / c["cell"] / "runs") for key, c in by.items()}
    out = []
    for domain in spec.domains:
        qrels_file = run_file(study / "qrels", domain)
        if spec.results and not qrels_file.is_file():  # a fresh clone: the committed judgements
            qrels_file = run_file(Path(spec.results) / "qrels", domain)
        if not qrels_file.is_file():
            continue
        qrels = read_qrels(qrels_file)
        for other in (*spec.variants, *spec.baselines):
            baseline = other in spec.baselines
            if other == spec.control:
                continue
            seeds = sorted(s for (v, s) in by if v == spec.control and (baseline or (other, s) in by))
            base_run = run_file(baseline_dir(spec, study, other), domain) if baseline else None
            if not seeds or (baseline and not base_run.is_file()):
                continue
            control = [read_run(run_file(runs_of[(spec.control, s)], domain)) for s in seeds]
            treated = [read_run(base_run)] if baseline else [
                read_run(run_file(runs_of[(other, s)], domain)) for s in seeds]
            test = paired_significance(qrels, control, treated, (spec.control, other), METRIC, spec.stat_test,
                                       spec.max_p)
            out.append({"domain": domain, "seeds": seeds, "baseline": baseline, **test})
    return out


def rescore(study: Path) -> dict:
    """Recompute the significance of a finished study from its TREC runs, without training or BM25, and rewrite
    results.json and results.md (e.g. a study whose p-values an older lbr computed over (seed, query) pairs)."""
    study = Path(study).expanduser().resolve()
    if not (study / "results.json").is_file():
        raise ConfigError(f"{study} holds no results.json to rescore: check --output (a study that has ended)")
    doc = json.loads((study / "results.json").read_text())
    if (study / SPEC).is_file():
        spec = spec_from_dict(load_spec(study)[1])
        doc["spec"] = recorded_spec(spec)
    else:  # results.json alone: its spec stays as recorded (relative paths and their marker kept)
        spec = spec_from_dict(doc["spec"])
    doc["significance"] = significance(read_cells(study, spec.results), spec, study)
    (study / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (study / "results.md").write_text(markdown(doc, spec))
    print(f"[lbr] study: rescored {len(doc['significance'])} comparisons into {study}/results.md, results.json",
          flush=True)
    return doc


def write_results(cfg: LbrConfig, spec: StudySpec, study: Path, finished: bool = True) -> dict:
    from lbr_ray.tune.space import tuning_config

    cells = sorted(read_cells(study, spec.results), key=lambda c: (str(c["variant"]), c["seed"]))
    rows = summarize(cells, spec)
    sig = significance(cells, spec, study)
    baselines, baselines_hard = {}, {}
    for name in spec.baselines:
        path = baseline_dir(spec, study, name) / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            baselines[name] = {d: m[METRIC] for d, m in metrics.items()}
            baselines_hard[name] = {d: m[f"hard_{METRIC}"] for d, m in metrics.items() if f"hard_{METRIC}" in m}
    sets = json.loads((study / "eval_sets.json").read_text()) if (study / "eval_sets.json").is_file() else {}
    log = Path(spec.results or study) / "sessions.jsonl"
    sessions = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    t = tuning_config(cfg)
    doc = {"spec": recorded_spec(spec), "finished": finished, "cells_done": len(cells),
           "cells_total": len(grid_cells(spec)), "metric": METRIC,
           "steps": {"ib_gl": t.ib_gl.max_steps, "gr_cl": t.gr_cl.max_steps}, "model": as_named(cfg.model.name),
           "wall_s": sum(s["wall_s"] for s in sessions), "sessions": sessions,
           "table": table(rows, spec), "bm25": baselines.get("bm25", {}), "baselines": baselines,
           "baselines_hard": baselines_hard, "eval_sets": sets, "significance": sig,
           "cells": [{k: c.get(k) for k in ("cell", "variant", "seed", "dev_recall@10", "dev_bm25_recall@10",
                                            "stage2_steps", "stage1_reused", "cell_s", "test")} for c in cells]}
    (study / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    _write_csv(rows, spec, study / "results.csv")
    (study / "results.md").write_text(markdown(doc, spec))
    doc["plot"] = str(plot(rows, baselines, spec, study / "study.png"))
    print(f"[lbr] study: wrote {study}/results.md, results.csv, results.json, study.png", flush=True)
    return doc


def recorded_spec(spec: StudySpec) -> dict:
    """The spec as results.json records it: with a results folder, as committed there (no machine's folders)."""
    return portable_spec(Path(spec.results), asdict(spec)) if spec.results else asdict(spec)


def as_named(path: str) -> str:
    """A path under the working directory, relative to it: a committed report names no machine's folders."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:  # a hub name, or a path elsewhere
        return path


def _columns(spec: StudySpec) -> tuple[str, ...]:
    return (*spec.domains, "dev", *[f"{d}:hard" for d in spec.domains])


def table(rows: list[dict], spec: StudySpec) -> list[dict]:
    """summarize's rows with each (mean, std) as a mapping (results.json, markdown)."""
    return [{**r, **{d: {"mean": r[d][0], "std": r[d][1]} for d in _columns(spec)}} for r in rows]


def _write_csv(rows: list[dict], spec: StudySpec, path: Path) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "seeds", *[f"{d}_{METRIC}_{s}" for d in _columns(spec) for s in ("mean", "std")]])
        for r in rows:
            w.writerow([r["variant"], " ".join(map(str, r["seeds"])),
                        *[None if x is None else round(x, 6) for d in _columns(spec) for x in r[d]]])


def _ms(pair) -> str:
    mean, std = pair
    return "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


def _label(name: str) -> str:
    return f"{BASELINE_LABELS.get(name, name)} (reference)"


def markdown(doc: dict, spec: StudySpec) -> str:
    cols = [f"{spec.target} (target)", *[f"{d} (held-out)" for d in spec.heldout]]
    resume = "`lbr study --output DIR " + ("--results DIR " if spec.results else "") + "--resume`"
    sets = doc.get("eval_sets") or {}
    lines = [f"# Does LBR help? Study on target {spec.target}", "",
             f"Cells done: {doc['cells_done']} of {doc['cells_total']}"
             + ("" if doc["finished"] else f" (interrupted: {resume} continues)")
             + f" · model {doc['model']} · steps: stage 1 {doc['steps']['ib_gl']}, stage 2 {doc['steps']['gr_cl']}"
             f" · wall time {doc['wall_s']:.0f} s", "",
             "Test R@10, mean ± std over seeds (sample std; a variant with one seed so far: its value); dev R@10 "
             "is the in-domain dev set of training."
             + (" Every cell and baseline is scored on the same test sets: " + ", ".join(
                 f"{d} {sets[d]['queries']:,} queries × {sets[d]['passages']:,} passages" for d in spec.domains
                 if d in sets) + "." if sets else "") + f" Test encoding in {spec.eval_dtype}.", "",
             "| variant | seeds | " + " | ".join(cols) + " | dev R@10 |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for r in doc["table"]:
        vals = [_ms((r[d]["mean"], r[d]["std"])) for d in spec.domains]
        lines.append(f"| {r['variant']} | {','.join(map(str, r['seeds'])) or '-'} | " + " | ".join(vals)
                     + f" | {_ms((r['dev']['mean'], r['dev']['std']))} |")
    references = doc["baselines"] if "baselines" in doc else {"bm25": doc["bm25"]}  # studies before issue 23
    for name, scores in references.items():
        lines.append(f"| {_label(name)} | - | " + " | ".join(f"{scores[d]:.4f}" if d in scores else "-"
                                                           for d in spec.domains) + " | - |")
    counts = {d: max((c["test"].get(d, {}).get("hard_queries", 0) for c in doc.get("cells", [])), default=0)
              for d in spec.domains}
    hard = [d for d in spec.domains if any(r[f"{d}:hard"]["mean"] is not None for r in doc["table"])
            and (counts[d] >= MIN_HARD or not doc.get("cells"))]
    if hard:
        lines += ["", "Hard query types only (without the lexically easy term_ctx and section pairs and the moderate "
                      f"HPO/GO term definitions; domains with at least {MIN_HARD} such test queries), test R@10:", "",
                  "| variant | " + " | ".join(f"{d} ({counts[d]} q)" if counts[d] else d for d in hard) + " |",
                  "|---|" + "---|" * len(hard)]
        lines += [f"| {r['variant']} | " + " | ".join(_ms((r[f'{d}:hard']['mean'], r[f'{d}:hard']['std']))
                                                      for d in hard) + " |" for r in doc["table"]]
        lines += [f"| {_label(name)} | " + " | ".join(f"{scores[d]:.4f}" if d in scores else "-" for d in hard) + " |"
                  for name, scores in doc.get("baselines_hard", {}).items() if any(d in scores for d in hard)]
    if doc["significance"]:
        test = TEST_NAMES.get(spec.stat_test, spec.stat_test)
        lines += ["", f"Significance of {spec.control} minus each variant on per-query R@10: each query's R@10 "
                      f"averaged over the seeds both ran, then {test} over the queries (max p {spec.max_p}); "
                      f"wins/ties/losses compare those per-query means. A reference's one run is compared with "
                      f"{spec.control}'s mean over all its seeds.", "",
                  "| domain | variant | seeds | queries | mean diff | wins/ties/losses | p | significant |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in doc["significance"]:
            name = _label(s["treatment"]) if s.get("baseline") else s["treatment"]
            lines.append(f"| {s['domain']} | {name} | {','.join(map(str, s['seeds']))} | {s['n_queries']} "
                         f"| {s['diff']:+.4f} | {s['wins']}/{s['ties']}/{s['losses']} | {s['p_value']:.4f} "
                         f"| {'yes' if s['significant'] else 'no'} |")
    lines += ["", "Per-query results: `cells/<cell>/runs/<domain>.trec` (TREC run files), judgements "
                  "`qrels/<domain>.trec`, references `<name>/<domain>.trec` (e.g. `bm25/`)"
              + (f"; committed copies (each query's top {RESULTS_DEPTH}, gzipped) under `cells/`, `qrels/`, "
                 "`baselines/` of the results folder." if spec.results else "."), ""]
    return "\n".join(lines)


def plot(rows: list[dict], baselines: dict, spec: StudySpec, path: Path) -> Path:
    """Test R@10 per variant (bars: mean over seeds, error bars: std), target and held-out domains side by side,
    each reference ({name: {domain: R@10}}, e.g. BM25) as a line per domain. Variants with no finished seed are left
    out; the legend sits beside the axes and the saved image grows to hold it."""
    import numpy as np

    from lbr_ray.tune.plots import _plt

    plt = _plt()
    rows = [r for r in rows if r["seeds"]]
    domains = list(spec.domains)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(2.2 * len(domains) + 3.5, 4.2))
    x = np.arange(len(domains))
    for i, r in enumerate(rows):
        means = [r[d][0] if r[d][0] is not None else np.nan for d in domains]
        stds = [r[d][1] if r[d][1] is not None else 0.0 for d in domains]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=f"{r['variant']} (n={len(r['seeds'])})")
    styles = {"bm25": ("black", "dashed"), "minilm": ("dimgray", "dotted"), "base": ("saddlebrown", "dashdot")}
    for name, scores in baselines.items():
        color, style = styles.get(name, ("gray", "solid"))
        for j, d in enumerate(domains):
            if d in scores:
                ax.hlines(scores[d], j - 0.45, j + 0.45, colors=color, linestyles=style,
                          label=BASELINE_LABELS.get(name, name) if j == 0 else None)
    ax.set_xticks(x, [f"{d}\n(target)" if d == spec.target else f"{d}\n(held-out)" for d in domains])
    ax.set_ylabel("test R@10")
    ax.set_ylim(0, 1.02)
    ax.set_title("Test R@10 per variant: mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["StudySpec", "VARIANTS", "parse_variant", "grid_cells", "check_spec", "study_config", "run_study",
           "write_results", "load_study", "parse_list", "significance", "summarize", "table", "rescore"]
