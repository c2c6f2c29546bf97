"""IBGenerativeLoss: next-token cross-entropy on target tokens under the IB mask (+ alpha * LM loss on input)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lbr_ray.layout import X, Y


class IBGenerativeLoss(nn.Module):
    """L = CE(y | sink, b, y_<t) + alpha * CE(x | x_<t).

    Rows without target tokens (the gl-cl ablation's plain LM rows) contribute CE on x with weight 1.
    Packed rows need nothing special: the token after a unit is the next unit's sink, which is never scored.
    Only the positions that predict a scored token go through the LM head, so large vocabularies stay cheap.
    """

    def __init__(self, alpha: float = 0.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, model, ids: torch.Tensor, seg: torch.Tensor, ib: bool = True,
                packed: bool = False) -> dict[str, torch.Tensor]:
        hidden = model.hidden(ids, seg, ib=ib, packed=packed)  # [B, T, H]
        return self.from_hidden(hidden, model.lm_head, ids, seg)

    def from_hidden(self, hidden, lm_head, ids, seg) -> dict[str, torch.Tensor]:
        nxt_seg, nxt_ids = seg[:, 1:], ids[:, 1:]  # the token each position predicts
        h = hidden[:, :-1]
        out = {"head_rows": seg.new_zeros(())}
        has_target = bool((nxt_seg == Y).any())
        for name, segment in (("target_loss", Y), ("input_loss", X)):
            where = nxt_seg == segment  # [B, T-1]
            if not where.any() or (name == "input_loss" and has_target and self.alpha == 0):
                out[name] = hidden.new_zeros(())
                continue
            out["head_rows"] = out["head_rows"] + where.sum()
            logits = lm_head(h[where]).float()  # [N, V]
            out[name] = F.cross_entropy(logits, nxt_ids[where])
        input_weight = self.alpha if has_target else 1.0
        out["loss"] = out["target_loss"] + input_weight * out["input_loss"]
        out["tokens"] = (nxt_seg == Y).sum() if has_target else (nxt_seg == X).sum()
        return out

    def get_config_dict(self) -> dict:
        return {"alpha": self.alpha}


def scored_counts(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, input) positions of rows `seg` that IBGenerativeLoss can score: those before a Y / an X token."""
    nxt_seg = seg[:, 1:]
    return (nxt_seg == Y).sum(), (nxt_seg == X).sum()
