"""InfoNCELoss: query -> positive over all positives of the global batch (+ hard negatives), / temperature; a
candidate with the same text as the label, or another positive of the same query, is not a negative."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lbr_ray.losses.distributed import all_gather_nograd, all_gather_with_grad, rank_and_world


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

    def forward(self, q: torch.Tensor, p: torch.Tensor, negatives: torch.Tensor | None = None,
                keys: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """q, p: [N, D] L2-normalised; negatives: [N * h, D] or None; `keys`: optional int64 text keys of the rows
        ("q" [N], "p" [N], "n" [N * h]), so that the same text twice in a global batch is no false negative (as
        sentence-transformers and tevatron do): a candidate with the label's text, and the positive of another row
        with the same query, are masked out; in the symmetric term, likewise a query with this row's query text or
        with this row's positive."""
        rank, _ = rank_and_world() if self.gather else (0, 1)
        gather = all_gather_with_grad if self.gather else (lambda t: t)
        gather_keys = all_gather_nograd if self.gather else (lambda t: t)
        p_all = gather(p)  # [W * N, D]
        has_negs = negatives is not None and negatives.numel() > 0
        cands = torch.cat([p_all, gather(negatives)]) if has_negs else p_all
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        logits = q @ cands.T / self.temperature  # [N, W * N (+ W * N * h)]
        if keys is not None:
            q_keys, p_keys = gather_keys(keys["q"]), gather_keys(keys["p"])  # [W * N]
            cand_keys = torch.cat([p_keys, gather_keys(keys["n"])]) if has_negs else p_keys
            dup = _same_as_label(cand_keys, labels)
            dup[:, : len(q_keys)] |= _same_as_label(q_keys, labels)  # another positive of the same query
            logits = _mask(logits, dup, labels)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            back = p @ gather(q).T / self.temperature  # [N, W * N]
            if keys is not None:
                back = _mask(back, _same_as_label(q_keys, labels) | _same_as_label(p_keys, labels), labels)
            loss = (loss + F.cross_entropy(back, labels)) / 2
        return loss

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature, "symmetric": self.symmetric, "gather": self.gather}


def _same_as_label(keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, C]: candidate c's key equals row i's label's key."""
    return keys[None, :] == keys[labels][:, None]


def _mask(logits: torch.Tensor, dup: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-inf where `dup` marks a candidate other than the label."""
    dup[torch.arange(len(labels), device=labels.device), labels] = False
    return logits.masked_fill(dup, float("-inf"))
