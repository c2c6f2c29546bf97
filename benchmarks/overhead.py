"""Framework overhead: the same model, batches, optimizer and steps through `lbr train --stage ib-gl` (Ray Train +
Ray Data + DeepSpeed ZeRO-2, 1 and 2 workers) and through a plain torch loop in one process.

Reports the steady-state step time of each (median over the logging windows after the first), their ratio, and
the time to the first step broken down into the milestones each run records (driver: preflight, Ray start, data
summary pass; workers: process start, model build, self-check, DeepSpeed init, first batch, first step). Runs are
interleaved (plain, 1 worker, 2 workers, plain, ...) and the load average is recorded next to each, because the
machine may be shared.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"


def plain_loop(steps: int, log_every: int, t0: float) -> dict:
    """The IB-GL step of `lbr train` without Ray or DeepSpeed: same model, objective, optimizer, schedule, clipping,
    texts, tokenizer and batch size; rows in a seeded shuffle of the stage-1 texts."""
    import torch

    sys.path.insert(0, str(ROOT))
    from lbr_ray.config import load_config
    from lbr_ray.data.readers import read_all
    from lbr_ray.data.split import split_of, text_key
    from lbr_ray.layout import SequenceBuilder, pad_rows
    from lbr_ray.recipes.ib_gl import IBGLObjective
    from lbr_ray.recipes.setup import build_model
    from lbr_ray.train.deepspeed import optimizer_and_schedule

    marks = {"imports": time.time() - t0}
    cfg = load_config(CONFIG, [f"ib_gl.max_steps={steps}"])
    torch.manual_seed(cfg.run.seed)
    model, tok = build_model(cfg)
    marks["model"] = time.time() - t0
    pairs = list(read_all(cfg.data.pairs, "pairs"))
    held = {text_key(r["positive"]) for r in pairs if split_of(r["query"], cfg.data.split) != "train"}
    texts = [t for r in pairs if split_of(r["query"], cfg.data.split) == "train" for t in (r["query"], r["positive"])]
    texts += [r["text"] for r in read_all(cfg.data.corpus, "corpus") if text_key(r["text"]) not in held]
    random.Random(cfg.run.seed).shuffle(texts)
    st = cfg.ib_gl
    builder = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)
    rows = builder.stage1_rows(texts[: steps * st.batch_size], st.target, ib=True)
    marks["data"] = time.time() - t0
    objective = IBGLObjective(model, st.alpha, ib=True)
    opt, sched = optimizer_and_schedule(objective, st)
    times, tokens = [], 0
    for step in range(steps):
        chunk = rows[step * st.batch_size: (step + 1) * st.batch_size]
        start = time.perf_counter()
        ids, seg = pad_rows([r[0] for r in chunk], [r[1] for r in chunk], tok.pad_token_id)
        out = objective({"ib_ids": ids, "ib_seg": seg})
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), st.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(out["tokens"])
        times.append(time.perf_counter() - start)
        if step == 0:
            marks["first_step"] = time.time() - t0
    windows = [sum(times[i: i + log_every]) / log_every for i in range(0, steps, log_every)]
    return {"startup_s": marks, "first_step_s": marks["first_step"], "window_step_time_s": windows,
            "step_time_s": statistics.median(windows[1:]), "tokens_per_s": tokens / sum(times)}


def lbr_run(workers: int, steps: int, log_every: int, out: Path, extra: list[str], root: Path = ROOT) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "train", "--stage", "ib-gl", "--config", str(CONFIG),
           "--num-workers", str(workers), "--output", str(out), "--set", f"ib_gl.max_steps={steps}",
           "--set", f"ib_gl.log_every={log_every}", "--set", f"ib_gl.checkpoint_every={10 * steps}", *extra]
    start = time.time()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "ib_gl" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    startup = {**{f"driver_{k}": v for k, v in summary.get("startup_driver_s", {}).items()},
               **{k[len("startup_"):-2]: v for k, v in rows[0].items() if k.startswith("startup_")}}
    return {"workers": workers, "wall_s": wall, "startup_s": startup, "first_step_s": rows[0].get("first_step_s"),
            "window_step_time_s": [r["step_time_s"] for r in rows],
            "step_time_s": statistics.median(r["step_time_s"] for r in rows[1:]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
            "mfu": statistics.median(r["mfu"] for r in rows[1:]) if "mfu" in rows[-1] else None,
            "console_lines": len(proc.stdout.splitlines()) + len(proc.stderr.splitlines())}


def load() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for the lbr runs")
    ap.add_argument("--base", default=None, help="another checkout (e.g. before a change): its 1-worker run too")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # child process: the plain loop
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.steps, args.log_every, float(os.environ["OVERHEAD_T0"]))))
        return
    runs = []
    extra = [x for kv in args.set for x in ("--set", kv)]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for who in ["plain"] + [f"lbr{w}" for w in args.workers.split(",")] + (["base1"] if args.base else []):
                before = load()
                if who == "plain":
                    t0 = time.time()
                    proc = subprocess.run([sys.executable, __file__, "--plain", "--steps", str(args.steps),
                                           "--log-every", str(args.log_every)], capture_output=True, text=True, cwd=ROOT,
                                          env={**os.environ, "OVERHEAD_T0": str(t0), "PYTHONPATH": str(ROOT)})
                    if proc.returncode != 0:
                        raise RuntimeError(proc.stderr[-3000:])
                    res = {"workers": 0, "wall_s": time.time() - t0, **json.loads(proc.stdout.splitlines()[-1])}
                elif who == "base1":
                    res = lbr_run(1, args.steps, args.log_every, Path(tmp) / f"{who}-{rep}", extra, Path(args.base))
                else:
                    res = lbr_run(int(who[3:]), args.steps, args.log_every, Path(tmp) / f"{who}-{rep}", extra)
                res.update(run=who, repeat=rep, loadavg_before=before, loadavg_after=load())
                print(json.dumps({k: v for k, v in res.items() if k != "window_step_time_s"}), flush=True)
                runs.append(res)
    plain = statistics.median(r["step_time_s"] for r in runs if r["run"] == "plain")
    ratios = {who: statistics.median(r["step_time_s"] for r in runs if r["run"] == who) / plain
              for who in {r["run"] for r in runs if r["run"] != "plain"}}
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "steps": args.steps, "base": args.base,
           "log_every": args.log_every, "overrides": args.set,
           "step_time_ratio_vs_plain": ratios, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({"step_time_ratio_vs_plain": ratios}))


if __name__ == "__main__":
    main()
