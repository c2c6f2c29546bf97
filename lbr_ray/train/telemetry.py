"""Step metrics (loss, lr, tokens/s, TFLOP/s and MFU, step time, peak GPU memory), console progress, TensorBoard,
collapse monitor (no Ray)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lbr_ray.losses.distributed import all_reduce_sum

log = logging.getLogger("lbr_ray")


def embedding_stats(emb: torch.Tensor) -> dict[str, float]:
    """Std over the batch (mean over dims) and mean pairwise cosine of L2-normalised embeddings [N, D]."""
    emb = emb.detach().float()
    n = emb.shape[0]
    sim = emb @ emb.T
    mean_cos = float((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1)))
    return {"emb_std": float(emb.std(0).mean()), "emb_mean_cos": mean_cos}


class Telemetry:
    """Accumulates per-step values without syncing; `flush` averages over the window (and over ranks)."""

    def __init__(self, stage: str, max_steps: int, rank: int, tb_dir: Path | None, start_step: int = 0,
                 t0: float | None = None, bar: bool = True, peak_flops: float | None = None,
                 marks: dict[str, float] | None = None):
        self.stage, self.rank, self.t0 = stage, rank, t0
        self.first_step_s: float | None = None  # seconds from the command's start to the first finished step
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.tokens = 0, 0
        self.flops: torch.Tensor | None = None  # model FLOPs of the window (lbr_ray.train.flops), summed
        self.peak_flops = peak_flops  # one device's peak FLOP/s, for MFU
        self.marks = marks  # start-up milestones (seconds since t0), reported once with the first metrics
        self.t_window = time.perf_counter()
        self.bar = self.writer = None
        self.max_steps = max_steps
        if rank == 0:
            if bar:  # quiet runs: the driver prints the metric lines instead (train.console)
                from tqdm import tqdm

                self.bar = tqdm(total=max_steps, initial=start_step, desc=stage, dynamic_ncols=True, mininterval=1.0)
            if tb_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tb_dir))

    def add(self, values: dict[str, torch.Tensor], tokens: int) -> None:
        flops = values.pop("flops", None)
        if flops is not None:
            flops = flops.detach().double()
            self.flops = flops if self.flops is None else self.flops + flops
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.tokens += tokens
        if self.first_step_s is None and self.t0 is not None:
            self.first_step_s = time.time() - self.t0

    def flush(self, step: int, lr: float, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        flops = self.flops if self.flops is not None else torch.zeros((), dtype=torch.float64)
        vec = torch.stack([self.sums[k].double().cpu() for k in keys]
                          + [torch.tensor(float(self.tokens), dtype=torch.float64), flops.cpu()])
        ranks = 1
        if dist.is_available() and dist.is_initialized():
            vec = all_reduce_sum(vec)  # one sync per log step: sum over ranks
            ranks = dist.get_world_size()
            vec[:-2] /= ranks
        elapsed = time.perf_counter() - self.t_window
        metrics = {k: float(vec[i]) / max(1, self.count) for i, k in enumerate(keys)}
        metrics.update(step=step, lr=lr, tokens_per_s=float(vec[-2]) / elapsed,
                       step_time_s=elapsed / max(1, self.count), steps_per_s=self.count / elapsed)
        if self.flops is not None:  # per device: the ranks' FLOPs summed, over the ranks
            metrics["tflops"] = float(vec[-1]) / ranks / elapsed / 1e12
            if self.peak_flops:
                metrics["mfu"] = metrics["tflops"] * 1e12 / self.peak_flops
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # the most this rank's GPU has held so far
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.first_step_s is not None:
            metrics["first_step_s"] = self.first_step_s
        if self.marks:
            metrics.update({f"startup_{k}_s": v for k, v in self.marks.items()})
            self.marks = None
        self.sums, self.count, self.tokens, self.flops, self.t_window = {}, 0, 0, None, time.perf_counter()
        return metrics

    def show(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        step = int(metrics["step"])
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "tokens_per_s", "mfu")})
            self.bar.refresh()
        log.info("%s step %d/%d %s", self.stage, step, self.max_steps,  # start-up milestones: metrics.jsonl
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step" and not k.startswith("startup_")))
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "step":
                    self.writer.add_scalar(f"{self.stage}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
