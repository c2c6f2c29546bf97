"""A finished sweep -> results table (CSV + Markdown + JSON), plots, best config YAMLs, the best trial's test eval.

<sweep>/results.{csv,md,json}  one row per trial: searched values, status, dev metrics, times, stage-1 reuse
<sweep>/*.png                   lbr_ray.tune.plots
<sweep>/best_config.yaml        the base config (full training steps) with the best values: `lbr train --config`
<sweep>/best_trial_config.yaml  exactly what the best trial trained with
<sweep>/best_test/report.*      the best trial's model on the test split (RetrievalEvaluator, as `lbr eval`)
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from lbr_ray.config import LbrConfig, save_config
from lbr_ray.tune.plots import LABEL, write_plots
from lbr_ray.tune.space import SHORT, final_config, k_max_for, searched, trial_config, trial_label, tuning_config

CSV_FIELDS = ("trial", "R", "k", "k_max", "temperature", "lora_r", "lr", "status", "step", "dev_recall@10",
              "dev_ndcg@10", "best_dev", "test_recall@10", "test_ndcg@10", "stage1", "stage1_key", "stage1_s",
              "stage1_train_s", "stage2_s", "trial_s")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def curve(frame, metric: str) -> list[tuple[int, float]]:
    """(step, value) per reported step; a restarted trial's repeated steps keep the latest value."""
    if frame is None or metric not in getattr(frame, "columns", ()) or "step" not in frame.columns:
        return []
    points = {int(s): float(v) for s, v in zip(frame["step"], frame[metric]) if v == v}
    return sorted(points.items())


def collect(cfg: LbrConfig, sweep: Path, grid) -> tuple[list[dict], dict]:
    """One row per trial of the ResultGrid, in trial order, plus each trial's learning curve."""
    metric, max_steps = cfg.tune.metric, tuning_config(cfg).gr_cl.max_steps
    rows, curves = [], {}
    for res in grid:
        name = Path(res.path).name
        params = {k: v for k, v in (res.config or {}).items() if k in SHORT}
        tcfg = trial_config(cfg, params, sweep / "trials" / name)
        facts, m = _read_json(sweep / "trials" / name / "trial.json"), res.metrics or {}
        curves[name] = curve(res.metrics_dataframe, metric)
        step = m.get("step")
        status = ("error" if res.error else "completed" if step == max_steps
                  else "stopped (ASHA)" if step is not None else "no result")
        reused = facts.get("stage1_reused", m.get("stage1_reused"))
        b = tcfg.bottleneck
        rows.append({
            "trial": name, "label": trial_label(params), "params": params,
            "R": b.ratio if b.k is None else None, "k": b.k, "k_max": k_max_for(tcfg),
            "temperature": tcfg.gr_cl.temperature, "lora_r": tcfg.model.lora_r if tcfg.model.lora else None,
            "lr": tcfg.gr_cl.lr, "status": status, "step": step,
            "dev_recall@10": m.get("dev_recall@10"), "dev_ndcg@10": m.get("dev_ndcg@10"),
            "best_dev": max((v for _, v in curves[name]), default=None),
            "stage1": None if reused is None else "reused" if reused else "trained",
            "stage1_key": facts.get("stage1_key"), "stage1_s": facts.get("stage1_s", m.get("stage1_s")),
            "stage1_train_s": facts.get("stage1_train_s", m.get("stage1_train_s")),
            "stage2_s": facts.get("stage2_s"), "trial_s": m.get("time_total_s"),
            "model": facts.get("model") if facts.get("done") else None,
            "error": str(res.error).splitlines()[0][:300] if res.error else None,
        })
    rows.sort(key=lambda r: r["trial"])
    return rows, curves


def best_row(rows: list[dict], metric: str) -> dict | None:
    """The completed trial (a trained model exists) with the highest final dev metric; the first on ties."""
    done = [r for r in rows if r["status"] == "completed" and r["model"] and r.get(metric) is not None]
    return max(done, key=lambda r: r[metric]) if done else None


def reuse_summary(rows: list[dict]) -> dict:
    """What sharing stage 1 saved: the training time that reusing trials did not spend (seconds, and as a fraction
    of the trials' total time had every trial trained its own stage 1)."""
    trained = [r for r in rows if r["stage1"] == "trained"]
    reused = [r for r in rows if r["stage1"] == "reused"]
    saved = sum(r["stage1_train_s"] or 0.0 for r in reused)
    total = sum(r["trial_s"] or 0.0 for r in rows)
    return {"stage1_trained": len(trained), "stage1_reused": len(reused), "saved_s": saved,
            "trial_s_total": total, "saved_fraction": saved / (total + saved) if total + saved else 0.0}


def write_outputs(cfg: LbrConfig, sweep: Path, grid, final: bool = True) -> dict:
    """Table, plots and JSON always; the best configs and the best trial's test evaluation once the sweep is
    complete (`final`), not after an interruption."""
    rows, curves = collect(cfg, sweep, grid)
    metric = cfg.tune.metric
    best = best_row(rows, metric) if final else None
    test = {}
    if best is not None:
        save_config(final_config(cfg, best["params"], sweep / "best"), sweep / "best_config.yaml")
        save_config(trial_config(cfg, best["params"], sweep / "trials" / best["trial"]),
                    sweep / "best_trial_config.yaml")
        if cfg.tune.test_eval:
            test = evaluate_best(cfg, best, sweep / "best_test")
            best.update(test)
    sessions = [json.loads(line) for line in (sweep / "sessions.jsonl").read_text().splitlines() if line.strip()] \
        if (sweep / "sessions.jsonl").is_file() else []
    doc = {"metric": metric, "search": cfg.tune.search, "space": {k: list(v) for k, v in searched(cfg.tune).items()},
           "asha": {"on": cfg.tune.asha, "grace_period": cfg.tune.grace_period,
                    "reduction_factor": cfg.tune.reduction_factor},
           "steps": {"ib_gl": tuning_config(cfg).ib_gl.max_steps, "gr_cl": tuning_config(cfg).gr_cl.max_steps},
           "wall_s": sum(s["wall_s"] for s in sessions), "sessions": sessions, "reuse": reuse_summary(rows),
           "finished": final, "best": best, "test": test, "trials": rows, "curves": curves}
    (sweep / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    _write_csv(rows, sweep / "results.csv")
    (sweep / "results.md").write_text(markdown(doc))
    doc["plots"] = [str(p) for p in write_plots(rows, curves, metric, sweep)]
    print(f"[lbr] tune: wrote {sweep}/results.md, results.csv, results.json, "
          f"{', '.join(Path(p).name for p in doc['plots'])}" + (", best_config.yaml" if best else ""), flush=True)
    return doc


def evaluate_best(cfg: LbrConfig, best: dict, out: Path) -> dict:
    """The best trial's model on the test split of the config's data, one eval set per domain folder, through the
    `lbr eval` machinery (RetrievalEvaluator: cached encoding, FAISS search, metrics, report files)."""
    from lbr_ray.data.readers import resolve_paths
    from lbr_ray.eval.encode import load_encoder
    from lbr_ray.eval.evaluator import EvalOptions, RetrievalEvaluator
    from lbr_ray.eval.report import write_reports
    from lbr_ray.eval.sets import build_eval_set_from_files

    t = cfg.tune
    pairs, corpus = defaultdict(list), defaultdict(list)
    for f in resolve_paths(cfg.data.pairs, "pairs"):
        pairs[Path(f).parent.name].append(f)
    for f in resolve_paths(cfg.data.corpus, "corpus") if cfg.data.corpus else []:
        corpus[Path(f).parent.name].append(f)
    first = resolve_paths(cfg.data.pairs, "pairs")[0]
    opts = EvalOptions(domains=tuple(pairs), data_root=str(Path(first).parent.parent), num_workers=t.eval_workers,
                       max_queries=t.test_max_queries, max_corpus=t.test_max_corpus,
                       cache_dir=str(out / "embedding_cache"), seed=cfg.run.seed, split=cfg.data.split)
    ev = RetrievalEvaluator(opts, log=lambda msg: print(f"[lbr] tune test eval: {msg}", flush=True))
    for domain, files in pairs.items():
        ev.sets[domain] = build_eval_set_from_files(files, corpus.get(domain, []), domain=domain,
                                                    split=cfg.data.split, max_queries=t.test_max_queries,
                                                    max_corpus=t.test_max_corpus, seed=cfg.run.seed, which="test")
    results = ev.evaluate(load_encoder(best["model"]), f"best trial {best['trial']}")
    write_reports(results, out, title=f"Test split: best trial {best['trial']} ({best['label']})")
    alls = [d["rows"][0] for d in results["domains"].values()]
    return {"test_recall@10": sum(r["recall@10"] for r in alls) / len(alls),
            "test_ndcg@10": sum(r["ndcg@10"] for r in alls) / len(alls),
            "test_queries": sum(r["n_queries"] for r in alls), "test_domains": list(results["domains"])}


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()})


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(doc: dict) -> str:
    rows, metric, reuse, best = doc["trials"], doc["metric"], doc["reuse"], doc["best"]
    size = "R" if any(r["R"] is not None for r in rows) else "k"
    extra = [c for c in ("lora_r", "lr") if any(k.endswith(c) for k in doc["space"])]
    space = " x ".join(f"{SHORT[k]} {v}" for k, v in doc["space"].items()) or "the base config"
    asha = doc["asha"]
    lines = [
        "# Tune sweep", "",
        f"{doc['search']} search over {space}; metric: {LABEL.get(metric, metric)} (GR-CL's in-training dev set, "
        f"maximised); " + (f"ASHA on GR-CL steps (grace {asha['grace_period']}, reduction factor "
                           f"{asha['reduction_factor']:g})" if asha["on"] else "no early stopping")
        + f". Trials: stage 1 {doc['steps']['ib_gl']} steps, stage 2 {doc['steps']['gr_cl']} steps.", "",
        f"Wall time: {doc['wall_s']:.0f} s ({len(doc['sessions'])} session(s)). Stage 1 trained "
        f"{reuse['stage1_trained']} times and reused {reuse['stage1_reused']} times: reuse saved "
        f"{reuse['saved_s']:.0f} s, {100 * reuse['saved_fraction']:.0f}% of the "
        f"{reuse['trial_s_total'] + reuse['saved_s']:.0f} s the trials would have taken each training its own "
        "stage 1.", "",
        "Test metrics are computed only for the best trial (its final model on the test split); every other "
        "column is per trial. `k max`: bottleneck tokens of the longest admissible input.", "",
    ]
    head = ["trial", size] + (["k max"] if size == "R" else []) + ["temperature"] + extra + [
        "status", "steps", "dev R@10", "dev NDCG@10", "test R@10", "test NDCG@10", "stage 1", "stage-1 s", "trial s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"], f"{r['R']:g}" if size == "R" else str(r["k"])]
        cells += [str(r["k_max"])] if size == "R" else []
        cells += [f"{r['temperature']:g}"] + [f"{r[c]:g}" for c in extra]
        cells += [r["status"], _f(r["step"]), _f(r["dev_recall@10"]), _f(r["dev_ndcg@10"]),
                  _f(r.get("test_recall@10")), _f(r.get("test_ndcg@10")), r["stage1"] or "-",
                  _f(r["stage1_s"], 1), _f(r["trial_s"], 1)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not doc.get("finished", True):
        lines += ["", "The sweep was interrupted before every trial ended: `lbr tune --output DIR --resume` "
                  "continues it."]
    if best:
        lines += ["", f"Best: {best['trial']} ({best['label']}), {LABEL.get(metric, metric)} {best[metric]:.4f}"
                  + (f"; test R@10 {best['test_recall@10']:.4f}, NDCG@10 {best['test_ndcg@10']:.4f} "
                     f"({best['test_queries']} test queries)" if "test_recall@10" in best else "")
                  + ". `best_config.yaml` = the base config with these values (`lbr train --stage all --config "
                  "best_config.yaml`); `best_trial_config.yaml` = what the trial ran."]
    errors = [r for r in rows if r["error"]]
    lines += [f"- {r['trial']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


__all__ = ["write_outputs", "collect", "best_row", "reuse_summary", "evaluate_best", "markdown", "curve"]
