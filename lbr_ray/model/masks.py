"""The information-bottleneck visibility rule: one pure function of segment ids, used by every backend.

A row of a batch is `[sink][x_1..x_n][b_1..b_k][y_1..y_m][pad...]`, or several such units packed
(lbr_ray.layout), described by segment ids: SINK=0 (first token of a unit), X=1 (input), B=2 (bottleneck),
Y=3 (target), PAD=-1. Query i may attend to key j when j <= i (causal), both are in the same document (unit),
j is not padding, and not (i in Y and j in X); Y may see the sink only when `sink` is True.
With `ib=False` the rule is the plain causal mask (used for the gl-cl ablation and for embedding).
Padding queries attend only to themselves, so no softmax row is empty in any backend.
"""
from __future__ import annotations

import torch

from lbr_ray.layout import B, PAD, SINK, X, Y, documents

__all__ = ["SINK", "X", "B", "Y", "PAD", "allowed", "visibility", "dense_mask", "flex_block_mask"]


def allowed(seg_q: torch.Tensor, seg_k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
            ib: bool = True, sink: bool = True, doc_q: torch.Tensor | None = None,
            doc_k: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise visibility (broadcasting); shared by the dense mask and FlexAttention's mask_mod."""
    ok = (k_idx <= q_idx) & (seg_k != PAD) & (seg_q != PAD)
    if doc_q is not None:
        ok = ok & (doc_q == doc_k)
    if ib:
        ok = ok & ~((seg_q == Y) & (seg_k == X))
        if not sink:
            ok = ok & ~((seg_q == Y) & (seg_k == SINK))
    return ok | ((seg_q == PAD) & (q_idx == k_idx))


def visibility(seg: torch.Tensor, ib: bool = True, sink: bool = True) -> torch.Tensor:
    """Boolean [B, T, T] matrix allow[b, i, j] for a batch of segment ids [B, T]."""
    idx = torch.arange(seg.shape[1], device=seg.device)
    doc = documents(seg)
    return allowed(seg[:, :, None], seg[:, None, :], idx[:, None], idx[None, :], ib, sink,
                   doc[:, :, None], doc[:, None, :])


def dense_mask(seg: torch.Tensor, dtype: torch.dtype, ib: bool = True, sink: bool = True) -> torch.Tensor:
    """Additive [B, 1, T, T] mask (0 where allowed, dtype-min elsewhere) for HF eager/SDPA attention."""
    allow = visibility(seg, ib, sink)[:, None]
    return torch.zeros(allow.shape, dtype=dtype, device=seg.device).masked_fill(~allow, torch.finfo(dtype).min)


def flex_block_mask(seg: torch.Tensor, ib: bool = True, sink: bool = True):
    """FlexAttention BlockMask for the same rule; fully blocked tiles (most of Y x X, other documents) are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = seg.shape
    doc = documents(seg)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(seg[b, q_idx], seg[b, kv_idx], q_idx, kv_idx, ib, sink, doc[b, q_idx], doc[b, kv_idx])

    return create_block_mask(mask_mod, batch, None, length, length, device=seg.device)
