"""GradCache's price and pay-off on this machine: peak memory per worker against the global batch, the GR-CL step
with and without gr_cl.cache_chunk, and the step time of each (issue 24).

Runs `--workers` processes (gloo on CPU, NCCL on GPUs) that train the config's GR-CL stage through lbr's own step
(GRCLObjective, DeepSpeed engine from lbr_ray.train.deepspeed, the plain step or recipes.gr_cl.cached_step), on the
demo pairs tokenized as the GR-CL data path does. For each batch size per worker, every timed step runs once plain
and once cached, interleaved, on the same batch and engine. Memory: on CPU the peak resident set size (RSS) of each
worker during its steps, sampled every millisecond, with glibc returning freed tensors to the system at once
(MALLOC_MMAP_THRESHOLD_), so one run's peak does not hide the next one's; on a GPU, torch's peak allocated memory.
The load average is recorded: timings on a shared machine are noisy, their ratio (measured side by side) less so.

    DS_ACCELERATOR=cpu python benchmarks/gradcache.py --out benchmarks/results/gradcache_cpu.json
    python benchmarks/gradcache.py --config benchmarks/gpu_suite.yaml --set model.name=DIR --workers 1 \\
        --batches 64,256,1024 --chunk 32 --out gradcache_gpu.json          # on a GPU
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from queue import Empty

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


class PeakRSS:
    """Samples this process's resident set size every `period` seconds; `peak()` since the last `reset()`."""

    def __init__(self, period: float = 0.001):
        self.period, self.page, self.lock = period, os.sysconf("SC_PAGE_SIZE"), threading.Lock()
        self._peak = self.rss()
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while True:
            with self.lock:  # a reset between reading and writing the peak would be undone
                self._peak = max(self._peak, self.rss())
            time.sleep(self.period)

    def reset(self) -> None:
        with self.lock:
            self._peak = self.rss()

    def peak(self) -> int:
        with self.lock:
            return max(self._peak, self.rss())


def batches(cfg, tokenizer_path: str, rows: int, rank: int, world: int) -> dict:
    """`rows` demo pairs per worker through GR-CL's tokenizer UDF and collate (this worker's slice)."""
    from lbr_ray.config import to_dict
    from lbr_ray.data.ray_data import TokenizeStage2
    from lbr_ray.layout import collate_columns
    from lbr_ray.model.bottleneck import load_tokenizer

    n = rows * world
    with gzip.open(ROOT / "data/demo/medical/pairs.jsonl.gz", "rt") as f:
        records = [json.loads(line) for _, line in zip(range(n), f)]
    raw = {"query": [r["query"] for r in records], "positive": [r["positive"] for r in records]}
    g = cfg.gr_cl
    if g.hard_negatives:
        raw.update(negatives=[[records[(i + 7) % n]["positive"]] for i in range(n)], _file=["demo"] * n,
                   _line=list(range(n)))
    prefixes = ["q", "p"] + [f"n{h}" for h in range(g.hard_negatives)] + (["ib"] if g.gen_weight > 0 else [])
    pad = load_tokenizer(tokenizer_path, cfg.bottleneck.k_max).pad_token_id
    full = collate_columns(TokenizeStage2(to_dict(cfg), tokenizer_path)(raw), prefixes, pad)
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in full.items()}


def worker(rank: int, world: int, port: int, args, queue) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from lbr_ray.config import load_config
    from lbr_ray.layout import PAD
    from lbr_ray.recipes.gr_cl import GRCLObjective, cached_step
    from lbr_ray.recipes.setup import build_model
    from lbr_ray.train.deepspeed import initialize
    from lbr_ray.train.loop import plain_forward_backward

    cfg = load_config(args.config, [*args.set, f"gr_cl.cache_chunk={args.chunk}", "gr_cl.lr=0.000001"])
    torch.manual_seed(cfg.run.seed)
    model, _ = build_model(cfg)
    engine = initialize(GRCLObjective(model, cfg), cfg.deepspeed, cfg.gr_cl, world)
    device = next(model.parameters()).device
    sampler = None if cuda else PeakRSS()
    rows_out = []
    for per_worker in args.batches + args.cached_only:
        batch = {k: v.to(device) for k, v in batches(cfg, cfg.model.name, per_worker, rank, world).items()}
        modes = {"plain": plain_forward_backward, "cached": cached_step}
        if per_worker in args.cached_only:  # batches the plain step cannot hold
            modes.pop("plain")
        times = {m: [] for m in modes}
        peaks = {m: 0 for m in modes}
        base = {}
        for step in range(args.steps + 1):  # step 0 warms up (allocator, DeepSpeed buckets)
            for mode, fn in (modes.items() if step % 2 else reversed(modes.items())):
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base[mode] = torch.cuda.memory_allocated()
                else:
                    base[mode] = sampler.rss()
                    sampler.reset()
                start = time.perf_counter()
                fn(engine, batch)
                engine.step()
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak()
                if step:
                    times[mode].append(seconds)
                    peaks[mode] = max(peaks[mode], peak)
        tokens = int(sum((batch[k] != PAD).sum() for k in batch if k.endswith("_seg")))
        for mode in modes:
            rows_out.append({"rank": rank, "per_worker": per_worker, "global_batch": per_worker * world, "mode": mode,
                             "chunk": args.chunk if mode == "cached" else None, "tokens_per_worker": tokens,
                             "peak_mib": peaks[mode] / MIB, "before_step_mib": base[mode] / MIB,
                             "step_s": statistics.median(times[mode]), "step_times_s": times[mode]})
    queue.put(rows_out)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    p.add_argument("--set", action="append", default=[], help="config override, e.g. gr_cl.hard_negatives=1")
    p.add_argument("--batches", default="16,64,256", help="rows per worker, comma-separated")
    p.add_argument("--cached-only", default="", help="rows per worker measured with GradCache only, e.g. 1024")
    p.add_argument("--chunk", type=int, default=16, help="gr_cl.cache_chunk of the cached runs")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and batch (after one warm-up)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.batches, args.cached_only = ([int(b) for b in t.split(",") if b] for t in (args.batches, args.cached_only))
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 10))  # freed tensors go back to the OS at once
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before, start = os.getloadavg(), time.time()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.workers, port, args, queue)) for r in range(args.workers)]
    for proc in procs:
        proc.start()
    rows, done = [], 0
    while done < len(procs):  # a worker that dies (its traceback above) ends the benchmark instead of the wait
        try:
            rows += queue.get(timeout=5)
            done += 1
        except Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                sys.exit("a worker failed")
    for proc in procs:
        proc.join(timeout=60)
    table = [{"global_batch": r["global_batch"], "per_worker": r["per_worker"], "peak_mib_cached": r["peak_mib"],
              "step_growth_mib_cached": r["peak_mib"] - r["before_step_mib"], "step_s_cached": r["step_s"]}
             for r in rows if r["per_worker"] in args.cached_only and r["rank"] == 0]
    for per_worker in args.batches:
        mine = {m: [r for r in rows if r["per_worker"] == per_worker and r["mode"] == m] for m in ("plain", "cached")}
        plain, cached = (max(mine[m], key=lambda r: r["peak_mib"]) for m in ("plain", "cached"))
        table.append({"global_batch": per_worker * args.workers, "per_worker": per_worker,
                      "peak_mib_plain": plain["peak_mib"], "peak_mib_cached": cached["peak_mib"],
                      "step_growth_mib_plain": plain["peak_mib"] - plain["before_step_mib"],
                      "step_growth_mib_cached": cached["peak_mib"] - cached["before_step_mib"],
                      "step_s_plain": max(r["step_s"] for r in mine["plain"]),
                      "step_s_cached": max(r["step_s"] for r in mine["cached"])})
        table[-1]["step_time_ratio"] = table[-1]["step_s_cached"] / table[-1]["step_s_plain"]
        paired = [c / p for p, c in zip(mine["plain"][0]["step_times_s"], mine["cached"][0]["step_times_s"])]
        table[-1]["step_time_ratio_paired_median"] = statistics.median(paired)  # step i plain next to step i cached
    table.sort(key=lambda r: r["per_worker"])
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
           "machine": f"{os.uname().machine}, {os.cpu_count()} CPUs", "workers": args.workers,
           "threads_per_worker": args.threads if args.device == "cpu" else None, "config": args.config,
           "overrides": args.set, "chunk": args.chunk, "steps": args.steps, "wall_s": time.time() - start,
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "table": table, "rows": rows}
    for r in table:
        if "peak_mib_plain" not in r:
            print(f"global batch {r['global_batch']:5d} ({r['per_worker']} per worker): cached only, peak "
                  f"{r['peak_mib_cached']:.0f} MiB, step {r['step_s_cached']:.2f} s")
            continue
        print(f"global batch {r['global_batch']:5d} ({r['per_worker']} per worker): peak "
              f"{'RSS' if args.device == 'cpu' else 'GPU'} per worker {r['peak_mib_plain']:.0f} MiB plain, "
              f"{r['peak_mib_cached']:.0f} MiB cached (step growth {r['step_growth_mib_plain']:.0f} / "
              f"{r['step_growth_mib_cached']:.0f} MiB); step {r['step_s_plain']:.2f} s / {r['step_s_cached']:.2f} s "
              f"(x{r['step_time_ratio']:.2f}; step by step x{r['step_time_ratio_paired_median']:.2f})")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
