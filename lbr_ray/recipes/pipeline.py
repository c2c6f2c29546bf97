"""`lbr train`: stage 1 (IB-GL), stage 2 (GR-CL) or both, for the variants lbr / gl-cl / cl.

lbr   : IB-GL (bottleneck mask) then GR-CL from its merged weights
gl-cl : stage 1 without the mask (plain causal LM on the same texts), then GR-CL
cl    : GR-CL from the base model; with match_compute its stage 2 gets the two-stage variants' total compute
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lbr_ray import storage
from lbr_ray.config import LbrConfig, replace, to_dict
from lbr_ray.config.schema import STAGES
from lbr_ray.data import ray_data
from lbr_ray.errors import ConfigError
from lbr_ray.recipes.preflight import preflight
from lbr_ray.train.launcher import StageResult, check_output, ensure_ray, print_config, run_stage, stage_paths


def train(cfg: LbrConfig, stage: str = "ib-gl", init: str | None = None, address: str | None = None,
          t0: float | None = None, match_compute: bool = False,
          stage2_callbacks: list | None = None, quiet: bool = False, announce: bool = True) -> dict[str, StageResult]:
    """Run the requested stage(s) and write <output>/summary.json. `stage2_callbacks` go to the GR-CL trainer.
    `quiet`: the console shows lbr's progress, metrics, warnings and errors; the rest goes to log files.
    With GR-CL, the summary's `dev_vs_bm25` holds the model's dev R@10 next to BM25's on the same dev set, and
    `announce` prints it as one line (the CLI prints it itself, last, after Ray has flushed the workers' logs)."""
    t0 = t0 or time.time()
    if storage.is_remote(cfg.run.output) and not cfg.run.storage_endpoint and os.environ.get("AWS_ENDPOINT_URL"):
        cfg = replace(cfg, run={"storage_endpoint": os.environ["AWS_ENDPOINT_URL"]})  # workers get it with cfg
    storage.configure(cfg.run.storage_endpoint)
    if stage == "gr-cl" and init is None and cfg.run.variant != "cl":
        raise ConfigError("--stage gr-cl starts from a stage-1 model: pass --init RUN/ib_gl/model (or --variant cl)")
    if match_compute and cfg.run.variant != "cl":
        raise ConfigError("--match-compute is for --variant cl (the baseline given the two-stage compute)")
    print_config(cfg)
    if stage == "lm":
        from lbr_ray.recipes.lm import train_lm

        return train_lm(cfg, init, address, t0, quiet)
    stages = (["ib_gl"] if stage in ("ib-gl", "all") and cfg.run.variant != "cl" else []) + \
        (["gr_cl"] if stage in ("gr-cl", "all") else [])
    summary = preflight(cfg, init, tuple(stages))  # small local data: read once here, its summary returned
    for name in stages:
        check_output(cfg, name)
    startup = {"preflight": time.time() - t0}  # driver milestones, seconds since the command started
    ensure_ray(cfg, address, quiet)
    startup["ray"] = time.time() - t0
    if summary is None:  # large or remote data: one Ray Data pass (file:line errors or counted skips, split sizes)
        summary = ray_data.summarize(cfg)
        startup["data_summary"] = time.time() - t0
    for line in summary.lines():
        print(f"[lbr] data: {line}", flush=True)
    summary.require_training_pairs(cfg.data.pairs)
    results: dict[str, StageResult] = {}
    if stage in ("ib-gl", "all") and cfg.run.variant != "cl":
        from lbr_ray.recipes import ib_gl

        ds = {"train": ray_data.stage1_dataset(cfg, summary.heldout_keys)}
        results["ib_gl"] = run_stage(cfg, "ib_gl", ib_gl.train_fn, ds, t0=t0, quiet=quiet)
        _print_stage(cfg, results["ib_gl"])
        init = str(results["ib_gl"].model_dir)
        if storage.is_remote(cfg.run.output):  # workers on other nodes read stage 1's model from the storage
            init = storage.join(cfg.run.output, "ib_gl", "model")
    context = None
    if stage in ("gr-cl", "all"):
        results["gr_cl"], context = _run_gr_cl(cfg, init, t0, match_compute, stage2_callbacks, quiet,
                                               summary.heldout_keys)
    _write_summary(cfg, summary, results, time.time() - t0, startup, context)
    if context and announce:
        print(context["line"], flush=True)
    return results


def _run_gr_cl(cfg: LbrConfig, init: str | None, t0: float, match_compute: bool,
               callbacks: list | None = None, quiet: bool = False,
               heldout_keys: set[str] = frozenset()) -> tuple[StageResult, dict | None]:
    """GR-CL, then (when the run measured dev R@10) BM25 on the same dev set: (result, {..., "line"} or None)."""
    from lbr_ray.eval.sets import dev_eval_set
    from lbr_ray.recipes import gr_cl
    from lbr_ray.train.checkpoint import hf_dir

    if match_compute:
        steps = matched_steps(cfg, heldout_keys)
        print(f"[lbr] match-compute: cl gets {steps} stage-2 steps (= the two-stage variants' compute)", flush=True)
        cfg = replace(cfg, gr_cl={"max_steps": steps})
    init = str(hf_dir(init)) if init else None
    dev = dev_eval_set(cfg)
    dev_payload = {"queries": dev.queries, "docs": dev.doc_texts, "qrels": [q.tolist() for q in dev.qrels]}
    ds = {"train": ray_data.stage2_dataset(cfg, init or cfg.model.name, heldout_keys)}
    res = run_stage(cfg, "gr_cl", gr_cl.train_fn, ds, init=init, extra={"dev": dev_payload}, t0=t0,
                    callbacks=callbacks, quiet=quiet)
    _print_stage(cfg, res)
    devs = [m for m in res.metrics if "dev_recall@10" in m]
    if devs:
        first, last = devs[0], devs[-1]  # first: step 0's reference point unless gr_cl.eval_at_start is off
        start = f"{first['dev_recall@10']:.4f} at step {first['step']} -> " if first["step"] != last["step"] else ""
        print(f"[lbr] dev R@10: {start}{last['dev_recall@10']:.4f} at step {last['step']} "
              f"({len(dev.queries)} dev queries, {len(dev.doc_texts)} passages)", flush=True)
    return res, (bm25_context(devs[-1]["dev_recall@10"], dev) if devs else None)


def bm25_context(model_recall: float, dev) -> dict:
    """The trained model's dev R@10 next to BM25's on the same dev set, as one line a newcomer can read."""
    from lbr_ray.eval.baselines import bm25_dev_recall

    bm25 = bm25_dev_recall(dev.queries, dev.doc_texts, dev.qrels)
    verdict = "beats" if model_recall > bm25 else "does not beat"
    line = (f"[lbr] result: dev R@10 {model_recall:.3f} for this model vs {bm25:.3f} for BM25 (keyword search, "
            f"no training) on the same {len(dev.queries)} dev queries and {len(dev.doc_texts)} passages: the model "
            f"{verdict} BM25 (R@10 = share of each query's relevant passages found in its top 10)")
    return {"dev_recall@10": model_recall, "bm25_dev_recall@10": bm25, "dev_queries": len(dev.queries),
            "dev_passages": len(dev.doc_texts), "line": line}


def matched_steps(cfg: LbrConfig, heldout_keys: set[str] = frozenset(), sample: int = 512) -> int:
    """Stage-2 steps whose token count (forward+backward cost of a fixed model) equals stage 1 + stage 2 of the
    two-stage variants, from the mean token counts of the rows each stage builds (see `mean_row_tokens`)."""
    per_row1, per_row2 = mean_row_tokens(cfg, heldout_keys, sample)
    stage1_tokens = cfg.ib_gl.max_steps * cfg.ib_gl.batch_size * cfg.ib_gl.grad_accum * per_row1
    per_step2 = cfg.gr_cl.batch_size * cfg.gr_cl.grad_accum * per_row2
    return cfg.gr_cl.max_steps + round(stage1_tokens / per_step2)


def mean_row_tokens(cfg: LbrConfig, heldout_keys: set[str] = frozenset(), sample: int = 512) -> tuple[float, float]:
    """Mean tokens per stage-1 row (the lbr variant's IB rows) and per stage-2 pair (all its rows), measured on a
    deterministic sample of the records each stage reads, tokenized by the stages' own UDFs."""
    import hashlib
    import heapq
    import itertools

    from lbr_ray.data.readers import read_all
    from lbr_ray.data.split import split_of

    def pick(rows, key):  # the `sample` rows with the smallest sha1(seed, key): order-free and deterministic
        return heapq.nsmallest(sample, rows, key=lambda r: hashlib.sha1(f"{cfg.run.seed}:{key(r)}".encode()).digest())

    types = cfg.data.types
    train = [r for r in read_all(cfg.data.pairs, "pairs")
             if split_of(r["query"], cfg.data.split) == "train" and (not types or r["type"] in types)]
    if cfg.ib_gl.target == "pair":
        rows1 = pick([r for r in train if ray_data.keeps_pair_row(r, heldout_keys)], lambda r: r["query"])
    else:
        texts = (d for r in train for d in ray_data.pair_texts(r, heldout_keys))
        if cfg.ib_gl.use_corpus and cfg.data.corpus:  # streamed into the sample, never held as a list
            texts = itertools.chain(texts, ({"text": r["text"]} for r in read_all(cfg.data.corpus, "corpus")
                                            if ray_data.keeps_corpus_row(r, heldout_keys)))
        rows1 = pick(texts, lambda r: r["text"])
    lm_cfg = replace(cfg, run={"variant": "lbr"})  # the two-stage reference builds IB rows
    built1 = ray_data.TokenizeStage1(to_dict(lm_cfg))(ray_data.as_batch(rows1))
    rows2 = [{**r, "_file": "", "_line": 0} for r in pick(train, lambda r: r["query"] + r["positive"])]
    built2 = ray_data.TokenizeStage2(to_dict(cfg), cfg.model.name, heldout_keys)(ray_data.as_batch(rows2))
    per_row1 = sum(len(ids) for ids in built1["ib_ids"]) / len(built1["ib_ids"])  # per row: packed rows hold several
    per_row2 = sum(len(ids) for k, col in built2.items() if k.endswith("_ids") for ids in col) / len(rows2)
    return per_row1, per_row2


def _print_stage(cfg: LbrConfig, res: StageResult) -> None:
    last = res.last
    keys = ("loss", "tokens_per_s", "steps_per_s", "first_step_s", "dev_recall@10")
    figures = {k: round(last[k], 4) for k in keys if k in last}
    uri = stage_paths(cfg, res.stage)[1]  # a remote output: where the model is, then its local staging copy
    where = f"{uri}/model (local copy: {res.model_dir})" if uri else res.model_dir
    print(f"[lbr] {res.stage} done in {res.wall_s:.1f}s: {figures}; model: {where}", flush=True)


def _write_summary(cfg: LbrConfig, data, results: dict[str, StageResult], wall_s: float,
                   startup: dict | None = None, context: dict | None = None) -> None:
    remote = storage.is_remote(cfg.run.output)
    out = storage.staging_dir(cfg.run.output) if remote else Path(cfg.run.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev = {k: [m for m in r.metrics if "dev_recall@10" in m] for k, r in results.items()}
    doc = {"variant": cfg.run.variant, "wall_s": wall_s, "startup_driver_s": startup or {},
           "data": {"pairs_by_split": dict(data.pairs_by_split), "corpus": data.corpus,
                    "bad_records": data.bad, "bad_by_file": dict(data.bad_by_file),
                    "bad_examples": data.bad_examples},
           "stages": {k: {"model": storage.join(cfg.run.output, k, "model") if remote else str(r.model_dir),
                          "wall_s": r.wall_s, "last": r.last,
                          "dev": dev[k][-1] if dev[k] else None, "dev_step0": dev[k][0] if dev[k] else None}
                      for k, r in results.items()}}
    if context:
        doc["dev_vs_bm25"] = context
    (out / "summary.json").write_text(json.dumps(doc, indent=2, default=str))
    if remote:
        storage.upload_file(out / "summary.json", storage.join(cfg.run.output, "summary.json"))


__all__ = ["train", "matched_steps", "STAGES"]
