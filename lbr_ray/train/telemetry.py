"""Step metrics (loss, lr, tokens/s, step time), console progress, TensorBoard, collapse monitor (no Ray)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

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
                 t0: float | None = None):
        self.stage, self.rank, self.t0 = stage, rank, t0
        self.first_step_s: float | None = None  # seconds from the command's start to the first finished step
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.tokens = 0, 0
        self.t_window = time.perf_counter()
        self.bar = self.writer = None
        if rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc=stage, dynamic_ncols=True, mininterval=1.0)
            if tb_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tb_dir))

    def add(self, values: dict[str, torch.Tensor], tokens: int) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.tokens += tokens
        if self.first_step_s is None and self.t0 is not None:
            self.first_step_s = time.time() - self.t0

    def flush(self, step: int, lr: float, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.tokens))]).cpu()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)  # one sync per log step: sum over ranks
            vec[:-1] /= dist.get_world_size()
        elapsed = time.perf_counter() - self.t_window
        metrics = {k: float(vec[i]) / max(1, self.count) for i, k in enumerate(keys)}
        metrics.update(step=step, lr=lr, tokens_per_s=float(vec[-1]) / elapsed,
                       step_time_s=elapsed / max(1, self.count), steps_per_s=self.count / elapsed)
        if self.first_step_s is not None:
            metrics["first_step_s"] = self.first_step_s
        self.sums, self.count, self.tokens, self.t_window = {}, 0, 0, time.perf_counter()
        return metrics

    def show(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        step = int(metrics["step"])
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "tokens_per_s")})
            self.bar.refresh()
        log.info("%s step %d %s", self.stage, step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))
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
