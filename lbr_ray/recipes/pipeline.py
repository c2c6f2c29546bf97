"""`lbr train`: stage 1 (IB-GL), stage 2 (GR-CL) or both, for the variants lbr / gl-cl / cl.

lbr   : IB-GL (bottleneck mask) then GR-CL from its merged weights
gl-cl : stage 1 without the mask (plain causal LM on the same texts), then GR-CL
cl    : GR-CL from the base model; with match_compute its stage 2 gets the two-stage variants' total compute
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lbr_ray.config import LbrConfig, replace
from lbr_ray.config.schema import STAGES
from lbr_ray.data import ray_data
from lbr_ray.errors import ConfigError
from lbr_ray.train.launcher import StageResult, check_output, ensure_ray, print_config, run_stage


def train(cfg: LbrConfig, stage: str = "ib-gl", init: str | None = None, address: str | None = None,
          t0: float | None = None, match_compute: bool = False,
          stage2_callbacks: list | None = None, announce: bool = True) -> dict[str, StageResult]:
    """Run the requested stage(s) and write <output>/summary.json. `stage2_callbacks` go to the GR-CL trainer.
    With GR-CL, the summary's `dev_vs_bm25` holds the model's dev R@10 next to BM25's on the same dev set, and
    `announce` prints it as one line (the CLI prints it itself, last, after Ray has flushed the workers' logs)."""
    t0 = t0 or time.time()
    if stage == "gr-cl" and init is None and cfg.run.variant != "cl":
        raise ConfigError("--stage gr-cl starts from a stage-1 model: pass --init RUN/ib_gl/model (or --variant cl)")
    if match_compute and cfg.run.variant != "cl":
        raise ConfigError("--match-compute is for --variant cl (the baseline given the two-stage compute)")
    print_config(cfg)
    preflight(cfg, init)
    for name in (["ib_gl"] if stage in ("ib-gl", "all") and cfg.run.variant != "cl" else []) + \
            (["gr_cl"] if stage in ("gr-cl", "all") else []):
        check_output(cfg, name)
    ensure_ray(cfg, address)
    summary = ray_data.summarize(cfg)  # streams once: file:line errors or counted skips, split sizes
    for line in summary.lines():
        print(f"[lbr] data: {line}", flush=True)
    results: dict[str, StageResult] = {}
    if stage in ("ib-gl", "all") and cfg.run.variant != "cl":
        from lbr_ray.recipes import ib_gl

        ds = {"train": ray_data.stage1_dataset(cfg, summary.heldout_keys)}
        results["ib_gl"] = run_stage(cfg, "ib_gl", ib_gl.train_fn, ds, t0=t0)
        _print_stage(results["ib_gl"])
        init = str(results["ib_gl"].model_dir)
    context = None
    if stage in ("gr-cl", "all"):
        results["gr_cl"], context = _run_gr_cl(cfg, init, t0, match_compute, stage2_callbacks)
    _write_summary(cfg, summary, results, time.time() - t0, context)
    if context and announce:
        print(context["line"], flush=True)
    return results


def _run_gr_cl(cfg: LbrConfig, init: str | None, t0: float, match_compute: bool,
               callbacks: list | None = None) -> tuple[StageResult, dict | None]:
    """GR-CL, then (when the run measured dev R@10) BM25 on the same dev set: (result, {..., "line"} or None)."""
    from lbr_ray.eval.sets import dev_eval_set
    from lbr_ray.recipes import gr_cl
    from lbr_ray.train.checkpoint import hf_dir

    if match_compute:
        steps = matched_steps(cfg)
        print(f"[lbr] match-compute: cl gets {steps} stage-2 steps (= the two-stage variants' compute)", flush=True)
        cfg = replace(cfg, gr_cl={"max_steps": steps})
    init = str(hf_dir(init)) if init else None
    dev = dev_eval_set(cfg)
    dev_payload = {"queries": dev.queries, "docs": dev.doc_texts, "qrels": [q.tolist() for q in dev.qrels]}
    ds = {"train": ray_data.stage2_dataset(cfg, init or cfg.model.name)}
    res = run_stage(cfg, "gr_cl", gr_cl.train_fn, ds, init=init, extra={"dev": dev_payload}, t0=t0,
                    callbacks=callbacks)
    _print_stage(res)
    devs = [m for m in res.metrics if "dev_recall@10" in m]
    if devs:
        print(f"[lbr] dev R@10: {devs[0]['dev_recall@10']:.4f} at step {devs[0]['step']} -> "
              f"{devs[-1]['dev_recall@10']:.4f} at step {devs[-1]['step']} "
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


def matched_steps(cfg: LbrConfig, sample: int = 512) -> int:
    """Stage-2 steps whose token count (forward+backward cost of a fixed model) equals stage 1 + stage 2 of the
    two-stage variants, from the mean token counts of a deterministic sample of each stage's rows."""
    from lbr_ray.data.readers import read_all
    from lbr_ray.data.split import split_of
    from lbr_ray.data.tokenize import SequenceBuilder
    from lbr_ray.model.bottleneck import load_tokenizer

    tok = load_tokenizer(cfg.model.name, cfg.bottleneck.k_max)
    sb = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)
    train = [r for r in read_all(cfg.data.pairs, "pairs") if split_of(r["query"], cfg.data.split) == "train"]
    rows = train[:sample]
    stage1 = sb.stage1_rows([r["positive"] for r in rows], cfg.ib_gl.target, ib=True)
    per_row1 = sum(len(ids) for ids, _ in stage1) / len(stage1)
    per_row2 = sum(len(ids) for ids, _ in sb.embed_rows([r["query"] for r in rows] + [r["positive"] for r in rows]))
    per_row2 = per_row2 / len(rows)  # query + positive
    stage1_tokens = cfg.ib_gl.max_steps * cfg.ib_gl.batch_size * cfg.ib_gl.grad_accum * per_row1
    per_step2 = cfg.gr_cl.batch_size * cfg.gr_cl.grad_accum * per_row2
    return cfg.gr_cl.max_steps + round(stage1_tokens / per_step2)


def preflight(cfg: LbrConfig, init: str | None = None) -> None:
    """Fail in seconds, before Ray starts: data paths exist, the model and tokenizer load, init is a model."""
    from transformers import AutoConfig

    from lbr_ray.data.readers import resolve_paths
    from lbr_ray.model.bottleneck import load_tokenizer, resolve_model_path
    from lbr_ray.train.checkpoint import hf_dir

    resolve_paths(cfg.data.pairs, "pairs")
    if cfg.data.corpus:
        resolve_paths(cfg.data.corpus, "corpus")
    name = str(hf_dir(init)) if init else cfg.model.name
    load_tokenizer(name, cfg.bottleneck.k_max)
    try:
        AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a model config from {name!r} ({str(e).splitlines()[0]})") from None


def _print_stage(res: StageResult) -> None:
    last = res.last
    keys = ("loss", "tokens_per_s", "steps_per_s", "first_step_s", "dev_recall@10")
    figures = {k: round(last[k], 4) for k in keys if k in last}
    print(f"[lbr] {res.stage} done in {res.wall_s:.1f}s: {figures}; model: {res.model_dir}", flush=True)


def _write_summary(cfg: LbrConfig, data, results: dict[str, StageResult], wall_s: float,
                   context: dict | None = None) -> None:
    out = Path(cfg.run.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev = {k: [m for m in r.metrics if "dev_recall@10" in m] for k, r in results.items()}
    doc = {"variant": cfg.run.variant, "wall_s": wall_s,
           "data": {"pairs_by_split": dict(data.pairs_by_split), "corpus": data.corpus,
                    "bad_records": data.bad, "bad_by_file": dict(data.bad_by_file),
                    "bad_examples": data.bad_examples},
           "stages": {k: {"model": str(r.model_dir), "wall_s": r.wall_s, "last": r.last,
                          "dev": dev[k][-1] if dev[k] else None, "dev_step0": dev[k][0] if dev[k] else None}
                      for k, r in results.items()}}
    if context:
        doc["dev_vs_bm25"] = context
    (out / "summary.json").write_text(json.dumps(doc, indent=2, default=str))


__all__ = ["train", "matched_steps", "STAGES"]
