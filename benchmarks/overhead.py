"""Framework overhead: the same model, batches, optimizer and steps through `lbr train --stage ib-gl` (Ray Train +
Ray Data + DeepSpeed ZeRO-2, 1 and 2 workers) and through a plain torch loop in one process.

All runs train on the same batches in the same order: a first child process draws the first `--steps` batches from
the stage's own Ray Data pipeline and worker-side iterator (as a 1-worker `lbr train` sees them) and the in-process
loops load them; `tokens` in each run's record lets the two be compared. Besides the plain torch loop, the same
loop through DeepSpeed's engine in one process (no Ray) separates DeepSpeed's cost from Ray's.

Reports the steady-state step time of each (median over the logging windows of the run's second half; the median
after the first window is kept too), their ratio, and the time to the first step broken down into the milestones
each run records (driver: preflight with the data summary, Ray start; workers: process start, model build,
self-check, DeepSpeed init, first batch, first step). `--set` overrides apply to every loop (e.g. a larger model).
Runs are interleaved (plain, deepspeed, 1 worker, 2 workers, plain, ...) and the load average is recorded next to
each, because the machine may be shared. On a GPU (`--config` a GPU config, or `--set scaling.use_gpu=true`) the
in-process loops train on the GPU too, and every run reports its MFU and peak GPU memory. `--lbr-run DIR` takes an
`lbr train` run already made with the same config, seed and steps as the lbr side (its stream is the one drawn here).

    python benchmarks/overhead.py --out benchmarks/results/overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_batches(steps: int, path: Path, config: Path, overrides: list[str]) -> dict:
    """The first `steps` batches `lbr train --stage ib-gl` (1 worker) trains on, in its order: the same Ray Data
    pipeline (seeded global shuffle, tokenizer UDF) and the same worker-side iterator (local shuffle buffer and seed,
    padding collate), saved to `path` so the in-process loops train on exactly these rows."""
    import ray
    import torch

    sys.path.insert(0, str(ROOT))
    from lbr_ray.config import load_config
    from lbr_ray.config.load import pack_length
    from lbr_ray.data import ray_data
    from lbr_ray.layout import PAD
    from lbr_ray.model.bottleneck import load_tokenizer
    from lbr_ray.train.worker import PadCollate

    start = time.time()
    cfg = load_config(config, [*overrides, f"ib_gl.max_steps={steps}"])
    st = cfg.ib_gl
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False  # as launcher.ensure_ray
    ds = ray_data.stage1_dataset(cfg, ray_data.summarize(cfg).heldout_keys)
    pad = load_tokenizer(cfg.model.name, cfg.bottleneck.k_max).pad_token_id
    it = ds.iter_torch_batches(batch_size=st.batch_size, collate_fn=PadCollate(["ib"], pad, pack_length(cfg)),
                               drop_last=True, local_shuffle_buffer_size=4 * st.batch_size,
                               local_shuffle_seed=cfg.run.seed)  # as WorkerRun.batches, epoch 0
    batches = [b for _, b in zip(range(steps), it)]
    ray.shutdown()
    torch.save(batches, path)
    return {"batches": len(batches), "tokens": sum(int((b["ib_seg"] != PAD).sum()) for b in batches),
            "seconds": time.time() - start}


def plain_loop(steps: int, log_every: int, t0: float, batches_path: Path, config: Path, overrides: list[str],
               deepspeed: bool = False) -> dict:
    """The IB-GL step of `lbr train` without Ray (and without DeepSpeed unless `deepspeed`): same model, objective,
    optimizer, schedule, clipping and batches (make_batches, moved to the model's device), torch's default thread
    count. On a GPU the plain loop's torch AdamW updates the model's own (bf16) weights, where DeepSpeed's bf16
    keeps float32 master weights: the same forward and backward, a lighter optimizer step."""
    import torch

    sys.path.insert(0, str(ROOT))
    from lbr_ray.config import load_config
    from lbr_ray.model.bottleneck import DTYPES
    from lbr_ray.recipes.ib_gl import IBGLObjective
    from lbr_ray.recipes.setup import build_model
    from lbr_ray.train.deepspeed import initialize, optimizer_and_schedule
    from lbr_ray.train.flops import device_peak_flops

    marks = {"imports": time.time() - t0}
    cfg = load_config(config, [*overrides, f"ib_gl.max_steps={steps}"])
    torch.manual_seed(cfg.run.seed)
    model, tok = build_model(cfg)
    marks["model"] = time.time() - t0
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in torch.load(batches_path)]
    marks["data"] = time.time() - t0
    st = cfg.ib_gl
    objective = IBGLObjective(model, st.alpha, ib=True, packed=st.pack)
    if deepspeed:  # one process, world 1: DeepSpeed's engine (ZeRO, gloo) without Ray
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("OVERHEAD_PORT", "29533"),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        engine = initialize(objective, cfg.deepspeed, st, world=1)  # as `lbr train` with 1 worker
        marks["deepspeed"] = time.time() - t0
    else:
        opt, sched = optimizer_and_schedule(objective, st)
    times, tokens, flops = [], 0, 0.0
    for step, batch in enumerate(batches[:steps]):
        start = time.perf_counter()
        if deepspeed:
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
        else:
            out = objective(batch)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(objective.parameters(), st.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        tokens += int(out["tokens"])  # a host sync: the step's GPU work is done
        flops += float(out["flops"])
        times.append(time.perf_counter() - start)
        if step == 0:
            marks["first_step"] = time.time() - t0
    windows = [sum(times[i: i + log_every]) / log_every for i in range(0, steps, log_every)]
    peak = device_peak_flops(device, DTYPES[cfg.model.dtype], cfg.scaling.peak_tflops)
    return {"startup_s": marks, "first_step_s": marks["first_step"], "window_step_time_s": windows,
            "step_time_s": statistics.median(windows[1:]), "steady_step_time_s": steady(windows),
            "tokens_per_s": tokens / sum(times), "tokens": tokens, "torch_threads": torch.get_num_threads(),
            "mfu": flops / sum(times) / peak if peak else None, "device": str(device),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def lbr_run(workers: int, steps: int, log_every: int, out: Path, config: Path, extra: list[str],
            root: Path = ROOT) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "train", "--stage", "ib-gl", "--config", str(config),
           "--num-workers", str(workers), "--output", str(out), "--set", f"ib_gl.max_steps={steps}",
           "--set", f"ib_gl.log_every={log_every}", "--set", f"ib_gl.checkpoint_every={10 * steps}", *extra]
    start = time.time()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": pythonpath(root)})
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **run_record(out, proc.stdout),
            "console_lines": len(proc.stdout.splitlines()) + len(proc.stderr.splitlines())}


def run_record(out: Path, console: str = "") -> dict:
    """Step times, tokens/s, MFU, peak memory and start-up milestones of the IB-GL stage of the `lbr train` run in
    `out`."""
    import yaml

    rows = [json.loads(line) for line in (out / "ib_gl" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    steps_in = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + rows, rows)]
    rank0 = out / "ib_gl" / "logs" / "rank0.log"  # the worker's own output (quiet runs)
    threads = re.search(r"rank 0 of \d+ on node \w+, (\d+) torch threads",
                        console + (rank0.read_text(errors="replace") if rank0.exists() else ""))
    startup = {**{f"driver_{k}": v for k, v in summary.get("startup_driver_s", {}).items()},
               **{k[len("startup_"):-2]: v for k, v in rows[0].items() if k.startswith("startup_")}}
    workers = yaml.safe_load((out / "ib_gl" / "config.yaml").read_text())["scaling"]["num_workers"]
    return {"workers": workers, "startup_s": startup, "first_step_s": rows[0].get("first_step_s"),
            "window_step_time_s": [r["step_time_s"] for r in rows],
            "step_time_s": statistics.median(r["step_time_s"] for r in rows[1:]),
            "steady_step_time_s": steady([r["step_time_s"] for r in rows]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
            "mfu": statistics.median(r["mfu"] for r in rows[1:]) if "mfu" in rows[-1] else None,
            "peak_mem_gib": rows[-1].get("peak_mem_gib"),
            "tokens": round(sum(r["tokens_per_s"] * r["step_time_s"] * n for r, n in zip(rows, steps_in))),
            "torch_threads": int(threads.group(1)) if threads else None}


def pythonpath(root: Path) -> str:
    """`root` first, then the caller's PYTHONPATH (e.g. packages installed with pip --target on the GPU machine)."""
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)


def steady(windows: list[float]) -> float:
    """The steady-state step time: the median window of the run's second half. A `lbr train` run's first windows
    are slowed by Ray's processes that start next to its first steps (Ray Train's and Ray Data's helper actors,
    each importing Ray on the same cores), so the ratio is taken where they are done."""
    return statistics.median(windows[len(windows) // 2:])


def load() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="the run's config")
    ap.add_argument("--steps", type=int, default=150)  # the demo's IB-GL stage
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", action="append", default=[],
                    help="config overrides for every loop (e.g. a larger model: model.name=...)")
    ap.add_argument("--base", default=None, help="another checkout (e.g. before a change): its runs too")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the in-process DeepSpeed loop")
    ap.add_argument("--lbr-run", type=Path, default=None,
                    help="an `lbr train` run of the same config, seed and steps already made (e.g. by the GPU suite): "
                         "its IB-GL stage is the lbr side, instead of starting runs (--workers, --base unused)")
    ap.add_argument("--child", choices=["batches", "plain", "deepspeed"], help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args()
    if args.child == "batches":
        print(json.dumps(make_batches(args.steps, Path(args.batches), args.config.resolve(), args.set)))
        return
    if args.child:
        print(json.dumps(plain_loop(args.steps, args.log_every, float(os.environ["OVERHEAD_T0"]), Path(args.batches),
                                    args.config.resolve(), args.set, deepspeed=args.child == "deepspeed")))
        return
    runs = []
    extra = [x for kv in args.set for x in ("--set", kv)]
    config = args.config.resolve()

    def child(kind: str, batches: Path) -> dict:
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--config", str(config),
                               "--steps", str(args.steps), "--log-every", str(args.log_every),
                               "--batches", str(batches), *extra],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "OVERHEAD_T0": str(t0), "PYTHONPATH": pythonpath(ROOT)})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return {"wall_s": time.time() - t0, **json.loads(proc.stdout.splitlines()[-1])}

    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.pt"
        data = child("batches", batches)  # the lbr runs' own first batches, in their order
        print(json.dumps({"batches": data}), flush=True)
        who_all = ["plain"] + ([] if args.no_deepspeed else ["deepspeed"]) + ([] if args.lbr_run else
            [f"{who}{w}" for who in ["lbr"] + (["base"] if args.base else []) for w in args.workers.split(",")])
        if args.lbr_run:  # the same batches in the same order: the run's stream is the one make_batches drew
            record = run_record(args.lbr_run.resolve())
            runs.append({**record, "run": f"lbr{record['workers']}", "repeat": 0, "source": str(args.lbr_run)})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "window_step_time_s"}), flush=True)
        for rep in range(args.repeats):
            for who in who_all:
                before = load()
                if who in ("plain", "deepspeed"):
                    res = {"workers": 0, **child(who, batches)}
                elif who.startswith("base"):
                    res = lbr_run(int(who[4:]), args.steps, args.log_every, Path(tmp) / f"{who}-{rep}", config, extra,
                                  Path(args.base))
                else:
                    res = lbr_run(int(who[3:]), args.steps, args.log_every, Path(tmp) / f"{who}-{rep}", config, extra)
                res.update(run=who, repeat=rep, loadavg_before=before, loadavg_after=load())
                print(json.dumps({k: v for k, v in res.items() if k != "window_step_time_s"}), flush=True)
                runs.append(res)
    def ratios(key: str) -> dict:
        plain = statistics.median(r[key] for r in runs if r["run"] == "plain")
        return {who: statistics.median(r[key] for r in runs if r["run"] == who) / plain
                for who in dict.fromkeys(r["run"] for r in runs if r["run"] != "plain")}
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "config": str(config), "steps": args.steps,
           "base": args.base, "log_every": args.log_every, "overrides": args.set, "batches": data,
           "step_time_ratio_vs_plain": ratios("steady_step_time_s"),
           "step_time_ratio_vs_plain_after_first_window": ratios("step_time_s"), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k.startswith("step_time_ratio")}))


if __name__ == "__main__":
    main()
