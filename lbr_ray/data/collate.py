"""Pad variable-length rows into batch tensors (no Ray). Right padding; seg = PAD (-1) on padding."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lbr_ray.model.masks import PAD


def pad_rows(ids: Sequence[Sequence[int]], segs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] lists -> ids [B, T] and seg [B, T] (T = longest row)."""
    length = max(len(r) for r in ids)
    out_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    out_seg = np.full((len(ids), length), PAD, dtype=np.int64)
    for i, (r, s) in enumerate(zip(ids, segs)):
        out_ids[i, : len(r)] = r
        out_seg[i, : len(s)] = s
    return torch.from_numpy(out_ids), torch.from_numpy(out_seg)


def collate_columns(batch: dict, prefixes: Sequence[str], pad_id: int) -> dict[str, torch.Tensor]:
    """Ray/numpy batch with `<p>_ids` / `<p>_seg` list columns -> padded tensors for each prefix; a `<p>_key`
    column (text keys) comes along as an int64 tensor."""
    out = {}
    for p in prefixes:
        out[f"{p}_ids"], out[f"{p}_seg"] = pad_rows(list(batch[f"{p}_ids"]), list(batch[f"{p}_seg"]), pad_id)
        if f"{p}_key" in batch:
            out[f"{p}_key"] = torch.as_tensor(np.asarray(batch[f"{p}_key"], dtype=np.int64))
    return out
