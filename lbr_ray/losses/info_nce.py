"""InfoNCELoss: query -> positive over all positives of the global batch (+ hard negatives), / temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lbr_ray.losses.distributed import all_gather_with_grad, rank_and_world


class InfoNCELoss(nn.Module):
    """logits = q @ [P_global ; N_global]^T / tau, label = this rank's offset + i.

    Anchors (queries) stay local; candidates (positives, hard negatives) are gathered from every worker with
    gradients, so the negative pool grows with the number of workers. The loss is the mean over local queries;
    DDP/DeepSpeed averaging of gradients across ranks then equals the gradient of the global-batch mean.
    `symmetric` adds the positive -> query direction.
    """

    def __init__(self, temperature: float = 0.02, symmetric: bool = False, gather: bool = True):
        super().__init__()
        self.temperature, self.symmetric, self.gather = temperature, symmetric, gather

    def forward(self, q: torch.Tensor, p: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """q, p: [N, D] L2-normalised; negatives: [N * h, D] or None."""
        rank, _ = rank_and_world() if self.gather else (0, 1)
        gather = all_gather_with_grad if self.gather else (lambda t: t)
        p_all = gather(p)  # [W * N, D]
        cands = p_all if negatives is None or negatives.numel() == 0 else torch.cat([p_all, gather(negatives)])
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        loss = F.cross_entropy(q @ cands.T / self.temperature, labels)
        if self.symmetric:
            q_all = gather(q)
            loss = (loss + F.cross_entropy(p @ q_all.T / self.temperature, labels)) / 2
        return loss

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature, "symmetric": self.symmetric, "gather": self.gather}
